"""CPU back end of the SAE ops: the sparsity of TopK used with MLX's CPU primitives and the BLAS.

Same interface and results as ``ReferenceOps`` (``ops.py``); it differs in how the work is done on a CPU:

* ``row_topk``: a two-stage selection, never a full partition of a row: the maximum of each block of
  ``TOPK_BLOCK`` latents, the k best blocks of each row (the k largest entries lie in at most k blocks),
  then a partition of those k blocks' entries only (k * TOPK_BLOCK candidates instead of F);
* ``decode`` / ``gather_dot``: batched [1,k] @ [k,D] products of the gathered decoder rows;
* ``latent_grads``: the per-latent sums as two BLAS GEMMs over a [B,F] coefficient matrix that holds the
  k kept entries of each row (MLX's CPU scatter-add of [B*k, D] rows is ~5x slower than the GEMM).
"""

from __future__ import annotations

import mlx.core as mx

from .ops import ReferenceOps

#: latents per block of the first selection stage
TOPK_BLOCK = 32


class CpuOps(ReferenceOps):
    name = "cpu-mlx"

    def row_topk(self, pre, k, dead=None, relu=True):
        B, F = pre.shape
        G = TOPK_BLOCK
        if dead is not None or F % G or F // G <= k:
            return super().row_topk(pre, k, dead, relu)
        n = F // G
        block_max = mx.max(pre.reshape(B, n, G), axis=-1)  # [B, n]
        blocks = mx.argpartition(block_max, n - k, axis=-1)[:, n - k:]  # the k best blocks of each row
        cand = (blocks[..., None] * G + mx.arange(G, dtype=blocks.dtype)).reshape(B, k * G)
        cand_vals = mx.take_along_axis(pre, cand, axis=-1)
        j = mx.argpartition(cand_vals, k * G - k, axis=-1)[:, k * G - k:]
        idx = mx.take_along_axis(cand, j, axis=-1).astype(mx.uint32)
        vals = mx.take_along_axis(cand_vals, j, axis=-1)
        vals = mx.maximum(vals, 0) if relu else mx.where(mx.isfinite(vals), vals, 0)
        return vals.astype(mx.float32), idx

    def batch_kth_largest(self, pre, n_keep):
        """Two-stage: the n_keep best blocks of TOPK_BLOCK entries by their maximum hold the n_keep largest
        entries (ties included), then a partition of those blocks' entries only."""
        acts = mx.maximum(pre, 0).reshape(-1)
        G = TOPK_BLOCK
        n = acts.shape[0]
        if n % G or n // G <= n_keep:
            return mx.min(mx.topk(acts, n_keep)).astype(mx.float32)
        blocks = acts.reshape(n // G, G)
        best = mx.argpartition(mx.max(blocks, axis=-1), n // G - n_keep)[n // G - n_keep:]
        cand = blocks[best].reshape(-1)
        return mx.min(mx.topk(cand, n_keep)).astype(mx.float32)

    def decode(self, vals, idx, W):
        return (vals[:, None, :] @ W[idx])[:, 0]

    def gather_dot(self, dY, idx, W):
        return (W[idx] @ dY[..., None])[..., 0]

    def latent_grads(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, xc, F, deterministic=True):
        C_dec = _coef_matrix(rows_dec, cols, coef_dec, Y.shape[0], F)
        dW_dec = C_dec.T @ Y.astype(mx.float32)  # [F, D]
        if coef_enc is None:
            return dW_dec, None, None
        C_enc = _coef_matrix(rows_enc, cols, coef_enc, xc.shape[0], F)
        return dW_dec, xc.astype(mx.float32).T @ C_enc, mx.sum(C_enc, axis=0)  # dW_enc [D, F], db_enc [F]


def _coef_matrix(rows: mx.array, cols: mx.array, coef: mx.array, n: int, F: int) -> mx.array:
    """[n, F] float32 holding coef_e at (rows_e, cols_e), summed where entries repeat, zero elsewhere."""
    flat = rows.astype(mx.int64) * F + cols.astype(mx.int64)
    return mx.zeros((n * F,), dtype=mx.float32).at[flat].add(coef.astype(mx.float32)).reshape(n, F)

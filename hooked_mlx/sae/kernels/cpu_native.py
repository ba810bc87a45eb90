"""CPU back end with native kernels: ``CpuOps`` whose sparse and optimizer primitives are multi-threaded C++
MLX primitives (``cpu_native.cpp``, built at first use by ``native_build``), nodes of the compiled step's
graph like any MLX op.

Why: MLX's CPU primitives run one thread each and its gathers, scatters and partitions are generic. The
native ones are written for these shapes:

* ``row_topk``: one scan per row keeping the k best (a threshold test per entry, no partition);
* ``decode`` / ``gather_dot``: k gathered decoder rows per batch row, summed or dotted in place;
* ``latent_grads``: entries grouped by latent (a stable counting sort), each latent's rows summed in input
  order (deterministic for any thread count), the encoder's [D,F] gradient written once, block by block;
* ``batch_entries``: BatchTopK's k*B entries from a two-stage cut (the best blocks of 32, then nth_element) and
  one parallel compaction; ``entries_decode`` / ``entries_dot`` decode and differentiate them sparsely;
* ``adam`` / ``adam_rows``: the update in one pass (the decoder's with the parallel-gradient removal and
  the renorm), reusing the old state's buffers when MLX can donate them; ``sq_norm`` one read.

So the trainer's update runs as the GPU back ends' does (``fused_optimizer``: clip and non-finite guard in
Adam's hyper-parameter vector). The encoder GEMM stays with MLX's BLAS. If the kernels cannot be built
(no C++ compiler) the pure-MLX ``CpuOps`` runs instead (``select.py`` warns).
"""

from __future__ import annotations

import mlx.core as mx

from . import native_build
from .cpu import CpuOps

_NONE = mx.array([])  # placeholder for an absent optional operand


class NativeCpuOps(CpuOps):
    name = "cpu"
    fused_optimizer = True
    sparse_batchtopk = True

    def __init__(self) -> None:
        self._k = native_build.load()

    def row_topk(self, pre, k, dead=None, relu=True):
        if pre.ndim != 2 or not 0 < k <= pre.shape[-1]:
            return super().row_topk(pre, k, dead, relu)
        return self._k.row_topk(pre, int(k), _NONE if dead is None else dead, dead is not None, bool(relu))

    def decode(self, vals, idx, W):
        return self._k.decode(vals, idx, W)

    def gather_dot(self, dY, idx, W):
        return self._k.gather_dot(dY, idx, W)

    def latent_grads(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, xc, F, deterministic=True):
        has_enc = coef_enc is not None
        dW_dec, dW_enc, db_enc = self._k.latent_grads(
            cols, rows_dec, coef_dec, Y, rows_enc if has_enc else _NONE, coef_enc if has_enc else _NONE,
            xc if has_enc else _NONE, int(F), has_enc)
        return (dW_dec, dW_enc, db_enc) if has_enc else (dW_dec, None, None)

    def batch_entries(self, pre, n_keep):
        if pre.ndim != 2 or not 0 < n_keep <= pre.size:
            return super().batch_entries(pre, n_keep)
        return self._k.batch_entries(pre, int(n_keep))

    def entries_decode(self, rows, cols, vals, W, n_rows):
        # the per-latent sums with the roles swapped: output row r gathers W's rows cols_e of the entries of r
        return self._k.latent_grads(rows, cols, vals, W, _NONE, _NONE, _NONE, int(n_rows), False)[0]

    def entries_dot(self, dY, rows, cols, W):
        return self._k.entries_dot(dY, rows, cols, W)

    def sq_norm(self, g, W=None):
        if W is not None and (g.ndim != 2 or W.shape != g.shape):
            return super().sq_norm(g, W)
        return self._k.sq_norm(g, _NONE if W is None else W, W is not None)

    def adam_rows(self, W, g, m, v, hp, remove_parallel, renorm, renorm_eps, lowp_dtype=None):
        if W.ndim != 2 or lowp_dtype is not None:
            return super().adam_rows(W, g, m, v, hp, remove_parallel, renorm, renorm_eps, lowp_dtype)
        return self._k.adam_rows(W, g, m, v, hp, bool(remove_parallel), bool(renorm), float(renorm_eps))

    def adam(self, p, g, m, v, hp, lowp_dtype=None):
        if lowp_dtype is not None:
            return super().adam(p, g, m, v, hp, lowp_dtype)
        return self._k.adam(p, g, m, v, hp)

"""CUDA back end of the fused SAE kernels (``mx.fast.cuda_kernel`` sources; see ``fused.py`` for the design).

Kernels:

* ``hk_row_topk``   one block per row: 8-bit radix select on order-preserving keys (2 passes for bf16
  pre-activations, 4 for fp32; histograms in shared memory with warp-aggregated atomics via
  ``__match_any_sync``), then one pass writing the entries above the threshold and the needed ties.
  No sort; the row is read 3 (bf16) or 5 (fp32) times, from L2 after the first.
* ``hk_radix_hist`` one radix pass over the flattened batch (BatchTopK threshold): block histograms,
  then global atomics; the bin choice between passes is a handful of MLX ops (no host sync).
* ``hk_decode``     x_hat[b] = sum_j v_bj W[idx_bj] (float4 rows; zero values skipped).
* ``hk_gather_dot`` dv[b,j] = dY[b] . W[idx_bj] (one warp per entry, dY row in shared memory).
* ``hk_latent_grads`` segmented per-latent sums (entries sorted by (latent, row): deterministic):
  dW_dec rows written directly, dW_enc columns through a shared-memory transpose (coalesced [D,F]
  writes), db_enc; dY / xc read as fp32 or bf16 (``LPY`` / ``LPX``; sums in fp32); ``hk_latent_grads_v4`` the
  float4 variant (the default); ``hk_latent_grads_atomic`` the scatter-add variant (atomics, nondeterministic
  order, fp32 operands).
* ``hk_adam_rows``  one block per decoder row: parallel-gradient removal, Adam, renormalisation.
* ``hk_sq_norms``   one block per row: |g_r|^2, or with W: |g_r|^2 - (g_r.W_r)^2 (2 - |W_r|^2) (the squared
  norm of the projected decoder gradient), float4 loads, no temporaries; the rows' sum is one small MLX sum.

The plain Adam for W_enc / b_enc / b_dec is MLX's compiled elementwise kernel (already one pass).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import gpu
from .cuda_sources import (
    ADAM_ROWS,
    DECODE,
    GATHER_DOT,
    HEADER,
    LATENT_GRADS,
    LATENT_GRADS_ATOMIC,
    LATENT_GRADS_V4,
    RADIX_HIST,
    ROW_TOPK,
    SQ_NORMS,
)
from .ops import ReferenceOps


def _k(name, inputs, outputs, source):
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=source, header=HEADER)


class CudaOps(ReferenceOps):
    """The CUDA kernels; anything not overridden is the pure-MLX reference op."""

    name = "cuda"
    fused_optimizer = True
    matmul_dtype = mx.bfloat16

    def __init__(self):
        if not mx.cuda.is_available():
            raise RuntimeError("MLX has no CUDA device here (mx.cuda.is_available() is False).")
        self._row_topk = _k("hk_row_topk", ["pre", "dead"], ["vals", "idx"], ROW_TOPK)
        self._radix = _k("hk_radix_hist", ["keys", "prefix"], ["hist"], RADIX_HIST)
        self._decode = _k("hk_decode", ["vals", "idx", "W"], ["out"], DECODE)
        self._gdot = _k("hk_gather_dot", ["dY", "idx", "W"], ["out"], GATHER_DOT)
        self._lg = _k("hk_latent_grads", ["offsets", "rows_dec", "rows_enc", "coef_dec", "coef_enc", "Y", "X"],
                      ["dW_dec", "dW_enc", "db_enc"], LATENT_GRADS)
        self._lg4 = _k("hk_latent_grads_v4", ["offsets", "rows_dec", "rows_enc", "coef_dec", "coef_enc", "Y", "X"],
                       ["dW_dec", "dW_enc", "db_enc"], LATENT_GRADS_V4)
        # "v1": one d per thread, 32 latents per block; "v4": float4 per thread, 16 latents per block
        # v4 was the faster at both benchmark shapes on the H100 (benchmarks/results/sae_kernels.md)
        self.lg_variant = os.environ.get("HOOKED_MLX_SAE_LG", "v4")
        self.lowp_backward = os.environ.get("HOOKED_MLX_SAE_LOWP_BWD", "1") != "0"
        self._lga = _k("hk_latent_grads_atomic", ["cols", "rows_dec", "rows_enc", "coef_dec", "coef_enc", "Y", "X"],
                       ["dW_dec", "dW_enc", "db_enc"], LATENT_GRADS_ATOMIC)
        self._adam_rows = _k("hk_adam_rows", ["W", "G", "M", "V", "hp"], ["W_out", "M_out", "V_out"], ADAM_ROWS)
        self._sq_norms = _k("hk_sq_norms", ["G", "W"], ["out"], SQ_NORMS)

    # -- selection ------------------------------------------------------------------------------------
    def row_topk(self, pre, k, dead=None, relu=True):
        B, F = pre.shape
        bf16 = pre.dtype == mx.bfloat16
        if not bf16 and pre.dtype != mx.float32:
            pre = pre.astype(mx.float32)
        nt = 1024 if F >= 65536 else 512
        d = mx.zeros((1,), mx.float32) if dead is None else dead.astype(mx.float32)
        vals, idx = self._row_topk(
            inputs=[pre, d], template=[("K", int(k)), ("F", int(F)), ("BF16", bf16), ("HAS_DEAD", dead is not None),
                                       ("RELU", bool(relu))],
            grid=(B * nt, 1, 1), threadgroup=(nt, 1, 1), output_shapes=[(B, k), (B, k)],
            output_dtypes=[mx.float32, mx.uint32])
        return vals, idx

    def acts_keys(self, pre):
        return pre.reshape(-1)  # keys of relu(pre) are computed on the fly by the histogram kernel

    def radix_histogram(self, keys, prefix, shift):
        kind = 0 if keys.dtype == mx.uint32 else (2 if keys.dtype == mx.bfloat16 else 1)
        if kind == 1 and keys.dtype != mx.float32:
            keys = keys.astype(mx.float32)
        n = keys.size
        nt = 256
        blocks = max(1, min(132 * 8, (n + nt - 1) // nt))
        (hist,) = self._radix(
            inputs=[keys.reshape(-1), prefix.astype(mx.uint32)], template=[("KIND", kind), ("SHIFT", int(shift))],
            grid=(blocks * nt, 1, 1), threadgroup=(nt, 1, 1), output_shapes=[(256,)], output_dtypes=[mx.uint32],
            init_value=0)
        return hist

    # -- decoder ----------------------------------------------------------------------------------------
    def decode(self, vals, idx, W):
        B, kk = vals.shape
        F, D = W.shape
        if D % 4:
            return super().decode(vals, idx, W)
        nt = min(1024, max(32, D // 4))
        (out,) = self._decode(inputs=[vals.astype(mx.float32), idx.astype(mx.uint32), W],
                              template=[("KK", int(kk)), ("D", int(D))], grid=(B * nt, 1, 1), threadgroup=(nt, 1, 1),
                              output_shapes=[(B, D)], output_dtypes=[mx.float32])
        return out

    def gather_dot(self, dY, idx, W):
        B, kk = idx.shape
        F, D = W.shape
        if D % 4 or D > 8192:
            return super().gather_dot(dY, idx, W)
        (out,) = self._gdot(inputs=[dY.astype(mx.float32), idx.astype(mx.uint32), W],
                            template=[("KK", int(kk)), ("D", int(D))], grid=(B * 256, 1, 1), threadgroup=(256, 1, 1),
                            output_shapes=[(B, kk)], output_dtypes=[mx.float32])
        return out

    def latent_grads(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, xc, F, deterministic=True):
        D = Y.shape[-1]
        has_enc = coef_enc is not None
        cols = cols.astype(mx.uint32)
        X = xc if has_enc else Y
        ce = coef_enc if has_enc else coef_dec
        if not deterministic:
            Y, X = Y.astype(mx.float32), X.astype(mx.float32)  # the atomic variant reads float32
            outs = self._lga(inputs=[cols, rows_dec.astype(mx.uint32), rows_enc.astype(mx.uint32), coef_dec, ce, Y, X],
                             template=[("F", int(F)), ("D", int(D)), ("HAS_ENC", has_enc)],
                             grid=(cols.size * 256, 1, 1), threadgroup=(256, 1, 1),
                             output_shapes=[(F, D), (D, F) if has_enc else (1,), (F,) if has_enc else (1,)],
                             output_dtypes=[mx.float32] * 3, init_value=0)
            return (outs[0], outs[1], outs[2]) if has_enc else (outs[0], None, None)
        ins = gpu.sorted_entries(cols, rows_dec, rows_enc, coef_dec, ce, Y.shape[0], F) + [Y, X]
        tmpl = [("F", int(F)), ("D", int(D)), ("HAS_ENC", has_enc), ("LPY", Y.dtype == mx.bfloat16),
                ("LPX", X.dtype == mx.bfloat16)]
        shapes = [(F, D), (D, F), (F,)] if has_enc else [(F, D), (1,), (1,)]
        if self.lg_variant == "v4" and D % 4 == 0:
            TL = 16
            dW_dec, dW_enc, db_enc = self._lg4(inputs=ins, template=tmpl + [("TL", TL)],
                                               grid=(((F + TL - 1) // TL) * 64, (D + 255) // 256, 1),
                                               threadgroup=(64, 1, 1), output_shapes=shapes,
                                               output_dtypes=[mx.float32] * 3)
        else:
            grid = (((F + 31) // 32) * 256, (D + 255) // 256, 1)
            dW_dec, dW_enc, db_enc = self._lg(inputs=ins, template=tmpl, grid=grid, threadgroup=(256, 1, 1),
                                              output_shapes=shapes, output_dtypes=[mx.float32] * 3)
        return (dW_dec, dW_enc, db_enc) if has_enc else (dW_dec, None, None)

    # -- optimizer ------------------------------------------------------------------------------------------
    def adam_rows(self, W, g, m, v, hp, remove_parallel, renorm, renorm_eps):
        F, D = W.shape
        if D > 16384:
            return super().adam_rows(W, g, m, v, hp, remove_parallel, renorm, renorm_eps)
        hp9 = mx.concatenate([hp.astype(mx.float32), mx.array([renorm_eps], mx.float32)])
        W2, m2, v2 = self._adam_rows(
            inputs=[W, g, m, v, hp9], template=[("D", int(D)), ("REMOVE_PAR", bool(remove_parallel)),
                                                ("RENORM", bool(renorm))],
            grid=(F * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[W.shape] * 3,
            output_dtypes=[mx.float32] * 3)
        return W2, m2, v2

    def sq_norm(self, g, W=None):
        out = gpu.sq_norm(self._sq_norms, g, W)
        return super().sq_norm(g, W) if out is None else out

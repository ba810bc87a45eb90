"""The GPU back end of the SAE ops, shared by CUDA and Metal: one launcher class (``GpuOps``) over a table of
kernel sources. A back end (``cuda.py``, ``metal.py``) gives only its sources (``SOURCES``, ``HEADER``), the kernel
factory (``mx.fast.cuda_kernel`` / ``mx.fast.metal_kernel``) and a few tuning constants; every launch (inputs,
template, grid, output shapes) is written once, here.

Kernels (one entry each in a back end's ``SOURCES``; what each computes is in ``cuda.py``'s docstring):
``row_topk``, ``radix_hist``, ``decode``, ``gather_dot``, ``latent_grads`` (and optionally ``latent_grads_v4``,
the float4 variant, and ``latent_grads_atomic``, the scatter-add variant), ``adam_rows``, ``sq_norms``, and
``seg_fill`` / ``seg_order`` (a deterministic counting sort of the entries by latent for ``latent_grads``), and
optionally ``adam`` (the elementwise Adam with the low-precision copy in the same pass; else MLX's compiled one)
and ``bt_counts`` / ``bt_compact`` / ``entries_dot`` (BatchTopK's entries kept sparse: ``sparse_batchtopk``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import mlx.core as mx

from .ops import ReferenceOps, row_view


class KernelSpec(NamedTuple):
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str
    atomic: bool = False  # outputs updated with atomics (Metal must be told; CUDA need not)


_LG_IN = ("offsets", "rows_dec", "rows_enc", "coef_dec", "coef_enc", "Y", "X")
_LG_OUT = ("dW_dec", "dW_enc", "db_enc")


def specs(row_topk: str, radix_hist: str, decode: str, gather_dot: str, latent_grads: str, adam_rows: str,
          sq_norms: str, seg_fill: str, seg_order: str, latent_grads_v4: str | None = None,
          latent_grads_atomic: str | None = None, adam: str | None = None, bt_counts: str | None = None,
          bt_compact: str | None = None, entries_dot: str | None = None) -> dict[str, KernelSpec]:
    """A back end's kernel table from its sources (the names and argument lists are the same on every GPU)."""
    table = {
        "row_topk": KernelSpec(("pre", "dead"), ("vals", "idx"), row_topk),
        "radix_hist": KernelSpec(("keys", "prefix"), ("hist",), radix_hist, atomic=True),
        "decode": KernelSpec(("vals", "idx", "W"), ("out",), decode),
        "gather_dot": KernelSpec(("dY", "idx", "W"), ("out",), gather_dot),
        "latent_grads": KernelSpec(_LG_IN, _LG_OUT, latent_grads),
        "adam_rows": KernelSpec(("W", "G", "M", "V", "hp"), ("W_out", "M_out", "V_out", "W_lp"), adam_rows),
        "sq_norms": KernelSpec(("G", "W"), ("out",), sq_norms),
        "seg_fill": KernelSpec(("cols", "rows", "offsets"), ("slot_e", "slot_r", "fill"), seg_fill, atomic=True),
        "seg_order": KernelSpec(("slot_e", "slot_r", "cols", "offsets"), ("order",), seg_order),
    }
    if latent_grads_v4 is not None:
        table["latent_grads_v4"] = KernelSpec(_LG_IN, _LG_OUT, latent_grads_v4)
    if latent_grads_atomic is not None:
        table["latent_grads_atomic"] = KernelSpec(("cols",) + _LG_IN[1:], _LG_OUT, latent_grads_atomic, atomic=True)
    if adam is not None:
        table["adam"] = KernelSpec(("P", "G", "M", "V", "hp"), ("P_out", "M_out", "V_out", "P_lp"), adam)
    if bt_counts is not None and bt_compact is not None and entries_dot is not None:  # the sparse BatchTopK path
        table["bt_counts"] = KernelSpec(("pre", "thresh"), ("counts",), bt_counts)
        table["bt_compact"] = KernelSpec(("pre", "thresh", "off", "take"), ("rows", "cols", "vals"), bt_compact)
        table["entries_dot"] = KernelSpec(("dY", "rows", "cols", "W"), ("out",), entries_dot)
    return table


class GpuOps(ReferenceOps):
    """The GPU kernels; anything not overridden is the pure-MLX reference op. Subclasses set ``name``,
    ``SOURCES``, ``HEADER``, ``available`` and ``make_kernel``, and may tune the constants below."""

    fused_optimizer = True
    matmul_dtype = mx.bfloat16
    SOURCES: dict[str, KernelSpec] = {}
    HEADER = ""
    #: the radix-histogram kernel reads bfloat16 values itself (else they are converted to float32 first)
    radix_bf16 = False
    #: most thread groups of the radix-histogram kernel
    radix_max_groups = 1024
    #: candidate capacity of the row top-k prefilter (``ROW_TOPK``'s ``PF``; at least the threads per row)
    topk_cap = 2048

    @staticmethod
    def available() -> bool:
        raise NotImplementedError

    def make_kernel(self, name: str, spec: KernelSpec) -> Any:
        raise NotImplementedError

    def topk_threads(self, F: int) -> int:
        """Threads per row of the row top-k kernel."""
        return 1024

    def __init__(self):
        if not self.available():
            raise RuntimeError(f"MLX has no {self.name} device here.")
        self.k = {name: self.make_kernel(f"hk_{name}", spec) for name, spec in self.SOURCES.items()}
        # "v1": one d per thread, 32 latents per block; "v4": float4 per thread, 16 latents per block (the faster at
        # both benchmark shapes on the H100, benchmarks/results/sae_kernels.md), where the back end has it
        self.lg_variant = os.environ.get("HOOKED_MLX_SAE_LG", "v4")
        #: the per-latent gradient sums read bf16 copies of dY and xc (fp32 sums); HOOKED_MLX_SAE_LOWP_BWD=0: fp32
        self.lowp_backward = os.environ.get("HOOKED_MLX_SAE_LOWP_BWD", "1") != "0"
        #: decode and the gathered dot products read a bf16 copy of W_dec (fp32 sums); HOOKED_MLX_SAE_LOWP_DEC=0: fp32
        self.decoder_dtype = None if os.environ.get("HOOKED_MLX_SAE_LOWP_DEC", "1") == "0" else mx.bfloat16
        #: latents the float4 gradient kernel works on at once per block (its block is (64, lg_rows); 2 was the
        #: fastest of 1, 2, 4, 8 at both benchmark shapes on the H200: benchmarks/profile_trainer_step.py)
        self.lg_rows = int(os.environ.get("HOOKED_MLX_SAE_LG_ROWS", "2"))
        #: how latent_grads orders its entries by latent: "argsort" (MLX's sort; measured in the trainer) or "count"
        #: (the counting-sort kernels; checked on the H200, not yet timed in the trainer): HOOKED_MLX_SAE_SORT
        self.entry_sort = os.environ.get("HOOKED_MLX_SAE_SORT", "argsort")
        if self.entry_sort not in ("argsort", "count"):
            raise ValueError(f"HOOKED_MLX_SAE_SORT={self.entry_sort!r} is not a sort; use argsort or count.")
        #: BatchTopK keeps the batch's entries as a sparse list (the back end's bt_* kernels) with
        #: HOOKED_MLX_SAE_SPARSE_BTK=1. Off by default until the kernels have run on a GPU: they are CPU-tested
        #: through their layout arithmetic only, and a kernel failing the first-use self-check would send the whole
        #: back end to the reference ops. Off: the dense mask, measured (1.13x sparsify at S1).
        self.sparse_batchtopk = "bt_compact" in self.k and os.environ.get("HOOKED_MLX_SAE_SPARSE_BTK", "0") == "1"
        #: the elementwise Adam in the back end's kernel, where it has one (HOOKED_MLX_SAE_ADAM_KERNEL=0: MLX's
        #: compiled Adam, which updates donated buffers in place; the kernel was faster at S2, 23.8 against 25.7 ms)
        self.adam_kernel = os.environ.get("HOOKED_MLX_SAE_ADAM_KERNEL", "1") != "0"
        #: the row top-k's prefilter (HOOKED_MLX_SAE_TOPK_PF=0: the radix select over the whole row)
        self.topk_prefilter = os.environ.get("HOOKED_MLX_SAE_TOPK_PF", "1") != "0"

    # -- selection ------------------------------------------------------------------------------------
    def row_topk(self, pre, k, dead=None, relu=True):
        B, F = pre.shape
        bf16 = pre.dtype == mx.bfloat16
        if not bf16 and pre.dtype != mx.float32:
            pre = pre.astype(mx.float32)
        nt = self.topk_threads(F)
        pf = self.topk_prefilter and k <= nt and F >= 4 * nt
        d = mx.zeros((1,), mx.float32) if dead is None else dead.astype(mx.float32)
        vals, idx = self.k["row_topk"](
            inputs=[pre, d], template=[("K", int(k)), ("F", int(F)), ("BF16", bf16), ("HAS_DEAD", dead is not None),
                                       ("RELU", bool(relu)), ("PF", pf), ("CAP", max(self.topk_cap, nt))],
            grid=(B * nt, 1, 1), threadgroup=(nt, 1, 1), output_shapes=[(B, k), (B, k)],
            output_dtypes=[mx.float32, mx.uint32])
        return vals, idx

    def acts_keys(self, pre):
        # keys of relu(pre) are computed on the fly by the histogram kernel
        if pre.dtype == mx.float32 or (pre.dtype == mx.bfloat16 and self.radix_bf16):
            return pre.reshape(-1)
        return pre.astype(mx.float32).reshape(-1)

    def radix_histogram(self, keys, prefix, shift):
        bf16 = keys.dtype == mx.bfloat16 and self.radix_bf16
        kind = 0 if keys.dtype == mx.uint32 else (2 if bf16 else 1)
        if kind == 1 and keys.dtype != mx.float32:
            keys = keys.astype(mx.float32)
        n = keys.size
        nt = 256
        groups = max(1, min(self.radix_max_groups, (n + nt - 1) // nt))
        (hist,) = self.k["radix_hist"](
            inputs=[keys.reshape(-1), prefix.astype(mx.uint32)], template=[("KIND", kind), ("SHIFT", int(shift))],
            grid=(groups * nt, 1, 1), threadgroup=(nt, 1, 1), output_shapes=[(256,)], output_dtypes=[mx.uint32],
            init_value=0)
        return hist

    def batch_entries(self, pre, n_keep):
        """The exact cut (``batch_kth_largest``), each row's counts above and at it (``hk_bt_counts``), the rows'
        output offsets and tie shares (``batch_entry_layout``), then one ordered compaction per row
        (``hk_bt_compact``): the entries sorted by (row, column); ties at the cut go to the first rows."""
        B, F = pre.shape
        if (not self.sparse_batchtopk or not 0 < n_keep <= pre.size or pre.ndim != 2
                or pre.dtype not in (mx.float32, mx.bfloat16)):
            return super().batch_entries(pre, n_keep)
        bf16 = pre.dtype == mx.bfloat16
        th = self.batch_kth_largest(pre, n_keep).astype(mx.float32).reshape(1)
        (counts,) = self.k["bt_counts"](inputs=[pre, th], template=[("F", int(F)), ("BF16", bf16)],
                                        grid=(B * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(B, 2)],
                                        output_dtypes=[mx.int32])
        off, take = batch_entry_layout(counts, n_keep)
        rows, cols, vals = self.k["bt_compact"](
            inputs=[pre, th, off, take], template=[("F", int(F)), ("BF16", bf16)], grid=(B * 256, 1, 1),
            threadgroup=(256, 1, 1), output_shapes=[(n_keep,)] * 3, output_dtypes=[mx.uint32, mx.uint32, mx.float32])
        return rows, cols, vals

    def entries_decode(self, rows, cols, vals, W, n_rows):
        # the per-latent gradient kernel with the roles swapped: output row r sums the W rows cols_e of r's entries
        if not self.sparse_batchtopk or W.shape[-1] % 4:
            return super().entries_decode(rows, cols, vals, W, n_rows)
        out, _, _ = self.latent_grads(rows, cols, cols, vals.astype(mx.float32), None, _f32_or_bf16(W), None,
                                      int(n_rows))
        return out

    def entries_dot(self, dY, rows, cols, W):
        D = W.shape[-1]
        if not self.sparse_batchtopk or D % 4:
            return super().entries_dot(dY, rows, cols, W)
        W = _f32_or_bf16(W)
        n = rows.size
        (out,) = self.k["entries_dot"](
            inputs=[dY.astype(mx.float32), rows.astype(mx.uint32), cols.astype(mx.uint32), W],
            template=[("N", int(n)), ("D", int(D)), ("LPW", W.dtype == mx.bfloat16)],
            grid=(((n + 7) // 8) * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(n,)],
            output_dtypes=[mx.float32])
        return out

    # -- decoder ----------------------------------------------------------------------------------------
    def decode(self, vals, idx, W):
        B, kk = vals.shape
        F, D = W.shape
        if D % 4:
            return super().decode(vals, idx, W)
        nt = min(1024, max(32, D // 4))
        W = _f32_or_bf16(W)
        (out,) = self.k["decode"](inputs=[vals.astype(mx.float32), idx.astype(mx.uint32), W],
                                  template=[("KK", int(kk)), ("D", int(D)), ("LPW", W.dtype == mx.bfloat16)],
                                  grid=(B * nt, 1, 1),
                                  threadgroup=(nt, 1, 1), output_shapes=[(B, D)], output_dtypes=[mx.float32])
        return out

    def gather_dot(self, dY, idx, W):
        B, kk = idx.shape
        F, D = W.shape
        if D % 4 or D > 8192:
            return super().gather_dot(dY, idx, W)
        W = _f32_or_bf16(W)
        (out,) = self.k["gather_dot"](inputs=[dY.astype(mx.float32), idx.astype(mx.uint32), W],
                                      template=[("KK", int(kk)), ("D", int(D)), ("LPW", W.dtype == mx.bfloat16)],
                                      grid=(B * 256, 1, 1),
                                      threadgroup=(256, 1, 1), output_shapes=[(B, kk)], output_dtypes=[mx.float32])
        return out

    def latent_grads(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, xc, F, deterministic=True):
        D = Y.shape[-1]
        has_enc = coef_enc is not None
        cols = cols.astype(mx.uint32)
        X = xc if has_enc else Y
        ce = coef_enc if has_enc else coef_dec
        shapes = [(F, D), (D, F), (F,)] if has_enc else [(F, D), (1,), (1,)]
        if not deterministic and "latent_grads_atomic" in self.k:
            Y, X = Y.astype(mx.float32), X.astype(mx.float32)  # the atomic variant reads float32
            outs = self.k["latent_grads_atomic"](
                inputs=[cols, rows_dec.astype(mx.uint32), rows_enc.astype(mx.uint32), coef_dec, ce, Y, X],
                template=[("F", int(F)), ("D", int(D)), ("HAS_ENC", has_enc)], grid=(cols.size * 256, 1, 1),
                threadgroup=(256, 1, 1), output_shapes=shapes, output_dtypes=[mx.float32] * 3, init_value=0)
            return (outs[0], outs[1], outs[2]) if has_enc else (outs[0], None, None)
        if self.entry_sort == "count" or F * Y.shape[0] >= 2**32:  # (the argsort's key would overflow uint32)
            ins = self.sorted_entries(cols, rows_dec, rows_enc, coef_dec, ce, F) + [Y, X]
        else:
            ins = sorted_entries(cols, rows_dec, rows_enc, coef_dec, ce, Y.shape[0], F) + [Y, X]
        tmpl = [("F", int(F)), ("D", int(D)), ("HAS_ENC", has_enc), ("LPY", Y.dtype == mx.bfloat16),
                ("LPX", X.dtype == mx.bfloat16)]
        if self.lg_variant == "v4" and D % 4 == 0 and "latent_grads_v4" in self.k:
            TL, TY = 16, max(1, min(16, self.lg_rows))
            dW_dec, dW_enc, db_enc = self.k["latent_grads_v4"](
                inputs=ins, template=tmpl + [("TL", TL)],
                grid=(((F + TL - 1) // TL) * 64, ((D + 255) // 256) * TY, 1), threadgroup=(64, TY, 1),
                output_shapes=shapes, output_dtypes=[mx.float32] * 3)
        else:
            dW_dec, dW_enc, db_enc = self.k["latent_grads"](
                inputs=ins, template=tmpl, grid=(((F + 31) // 32) * 256, (D + 255) // 256, 1),
                threadgroup=(256, 1, 1), output_shapes=shapes, output_dtypes=[mx.float32] * 3)
        return (dW_dec, dW_enc, db_enc) if has_enc else (dW_dec, None, None)

    def sorted_entries(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, F: int) -> list[mx.array]:
        """The entries of ``latent_grads`` sorted by (latent, row, entry), for the segmented per-latent kernels
        (``hk_latent_grads*``): [offsets [F+1] int32 (latent f's entries are offsets[f]:offsets[f+1]), rows_dec,
        rows_enc (uint32), coef_dec, coef_enc]. The order within a latent is fixed, so the sums are deterministic.
        A counting sort: per-latent counts, their prefix sums, an atomic fill of each latent's segment
        (``hk_seg_fill``) and each entry's rank within its segment (``hk_seg_order``; a segment of n entries
        costs n^2 comparisons, spread over n threads), no comparison sort."""
        cols = cols.astype(mx.uint32)
        rows = rows_dec.astype(mx.uint32)
        n = cols.size
        counts = mx.zeros((F,), mx.int32).at[cols.astype(mx.int32)].add(1)
        offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
        grid = (((n + 255) // 256) * 256, 1, 1)
        slot_e, slot_r, _ = self.k["seg_fill"](
            inputs=[cols, rows, offsets], template=[("N", int(n))], grid=grid, threadgroup=(256, 1, 1),
            output_shapes=[(n,), (n,), (F,)], output_dtypes=[mx.uint32, mx.uint32, mx.int32], init_value=0)
        (order,) = self.k["seg_order"](
            inputs=[slot_e, slot_r, cols, offsets], template=[("N", int(n))], grid=grid, threadgroup=(256, 1, 1),
            output_shapes=[(n,)], output_dtypes=[mx.uint32])
        return [offsets, rows[order], rows_enc.astype(mx.uint32)[order], coef_dec[order], coef_enc[order]]

    # -- optimizer ------------------------------------------------------------------------------------------
    def adam_rows(self, W, g, m, v, hp, remove_parallel, renorm, renorm_eps, lowp_dtype=None):
        F, D = W.shape
        lowp = lowp_dtype is not None
        if D > 16384 or (lowp and lowp_dtype != mx.bfloat16) or any(a.dtype != mx.float32 for a in (W, g, m, v)):
            return super().adam_rows(W, g, m, v, hp, remove_parallel, renorm, renorm_eps, lowp_dtype)
        hp9 = mx.concatenate([hp.astype(mx.float32), mx.array([renorm_eps], mx.float32)])
        W2, m2, v2, W_lp = self.k["adam_rows"](
            inputs=[W, g, m, v, hp9], template=[("D", int(D)), ("REMOVE_PAR", bool(remove_parallel)),
                                                ("RENORM", bool(renorm)), ("LOWP", lowp),
                                                ("VEC", 4 if D % 4 == 0 else 1)],
            grid=(F * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[W.shape] * 3 + [W.shape if lowp else (1,)],
            output_dtypes=[mx.float32] * 3 + [mx.bfloat16])
        return (W2, m2, v2, W_lp) if lowp else (W2, m2, v2)

    def adam(self, p, g, m, v, hp, lowp_dtype=None):
        """One float4 pass (``hk_adam``), the bf16 copy of the new p written in it; the reference elsewhere.

        Measured on the H200 in the trainer (benchmarks/results/sae_trainer_h200*.json): the S2 step 23.8 ms with
        this kernel against 25.7 with MLX's compiled Adam (which also wrote the copy, and then peaked higher)."""
        lowp = lowp_dtype is not None
        if (not self.adam_kernel or "adam" not in self.k or p.size % 4 or any(a.dtype != mx.float32 for a in (p, g, m, v))
                or (lowp and lowp_dtype != mx.bfloat16)):
            return super().adam(p, g, m, v, hp, lowp_dtype)
        n = p.size
        outs = self.k["adam"](
            inputs=[p, g, m, v, hp.astype(mx.float32)], template=[("N", int(n)), ("LOWP", lowp)],
            grid=(((n // 4 + 255) // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[p.shape, p.shape, p.shape, p.shape if lowp else (1,)],
            output_dtypes=[mx.float32, mx.float32, mx.float32, mx.bfloat16])
        return (outs[0], outs[1], outs[2], outs[3]) if lowp else (outs[0], outs[1], outs[2])

    def sq_norm(self, g, W=None):
        """One 256-thread group per row (``hk_sq_norms``), then one small sum; the reference where the kernel does
        not apply (not float32; a W of another shape)."""
        rows = row_view(g) if W is None else g
        if rows.dtype != mx.float32 or (W is not None and (W.dtype != mx.float32 or W.shape != g.shape)):
            return super().sq_norm(g, W)
        R, C = rows.shape
        (out,) = self.k["sq_norms"](inputs=[rows, rows if W is None else W],
                                    template=[("C", int(C)), ("HAS_W", W is not None)], grid=(R * 256, 1, 1),
                                    threadgroup=(256, 1, 1), output_shapes=[(R,)], output_dtypes=[mx.float32])
        return mx.sum(out)


def batch_entry_layout(counts: mx.array, n_keep: int) -> tuple[mx.array, mx.array]:
    """Where each row's BatchTopK entries go, from ``counts`` [B, 2] int32 (per row: entries above the cut, entries
    at it): (off [B] int32, the row's first output slot; take [B] int32, how many of its entries at the cut it
    keeps). Every entry above the cut is kept; the n_keep - (their total) ties go to the first rows, in row order.
    The rows' entries are then contiguous, in row order: off is the exclusive prefix sum of above + take."""
    gt, eq = counts[:, 0], counts[:, 1]
    need = n_keep - mx.sum(gt)
    take = mx.clip(need - (mx.cumsum(eq) - eq), 0, eq).astype(mx.int32)
    kept = gt + take
    return (mx.cumsum(kept) - kept).astype(mx.int32), take


def _f32_or_bf16(W: mx.array) -> mx.array:
    return W if W.dtype in (mx.float32, mx.bfloat16) else W.astype(mx.float32)


def sorted_entries(cols, rows_dec, rows_enc, coef_dec, coef_enc, nrows: int, F: int) -> list[mx.array]:
    """``GpuOps.sorted_entries`` by MLX ops (an argsort of latent * nrows + row): its definition, which the device
    test compares the kernels with, and the order ``latent_grads`` uses by default."""
    cols = cols.astype(mx.uint32)
    order = mx.argsort(cols * nrows + rows_dec.astype(mx.uint32))
    counts = mx.zeros((F,), mx.int32).at[cols.astype(mx.int32)].add(1)
    offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
    return [offsets, rows_dec.astype(mx.uint32)[order], rows_enc.astype(mx.uint32)[order], coef_dec[order],
            coef_enc[order]]

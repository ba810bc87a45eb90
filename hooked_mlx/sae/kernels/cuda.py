"""CUDA back end of the fused SAE kernels: its sources (``cuda_sources.py``, ``cuda_sources_backward.py``) and
``mx.fast.cuda_kernel``; the launches are ``gpu.GpuOps``'s (see ``fused.py`` for the design).

Kernels:

* ``hk_row_topk``   one block per row: a prefilter, then an 8-bit radix select on order-preserving keys (2
  passes for bf16 pre-activations, 4 for fp32; histograms in shared memory with warp-aggregated atomics via
  ``__match_any_sync``), then one pass writing the entries above the threshold and the needed ties. The
  prefilter: the k-th largest of the threads' maxima bounds the row's k-th largest from below, so only the
  entries above it (usually a few hundred) are compacted into shared memory and selected from; the row is read
  twice. Where more than ``topk_cap`` entries pass (ties, dead masks), the select runs on the whole row.
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

* ``hk_seg_fill`` / ``hk_seg_order`` the entries sorted by (latent, row) for ``hk_latent_grads``: an atomic fill of
  each latent's segment, then each entry's rank within it (a deterministic counting sort, no comparison sort;
  ``HOOKED_MLX_SAE_SORT=count``: checked on the H200, not yet timed in the trainer, so MLX's argsort is the default).
* ``hk_bt_counts`` / ``hk_bt_compact`` BatchTopK's entries as a sparse list: after the exact cut (the radix passes
  above), each row's counts above and at the cut, then one ordered compaction per row (warp ballots), the entries
  sorted by (row, column), ties at the cut to the first rows. ``hk_entries_dot``: one warp per entry,
  dY[row] . W[col]. The entries are decoded by ``hk_latent_grads`` with the roles swapped (rows as segments).
* ``hk_adam``       the elementwise Adam for W_enc / b_enc / b_dec: one float4 pass, optionally writing the bf16
  copy of the new parameter in it (round to nearest even, as ``astype``). Unlike MLX's compiled Adam it cannot
  update donated buffers in place.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import cuda_sources as S
from . import cuda_sources_backward as SB
from .gpu import GpuOps, KernelSpec, specs


class CudaOps(GpuOps):
    """The CUDA kernels (``gpu.GpuOps`` launches them)."""

    name = "cuda"
    SOURCES = specs(row_topk=S.ROW_TOPK, radix_hist=S.RADIX_HIST, decode=S.DECODE, gather_dot=S.GATHER_DOT,
                    latent_grads=SB.LATENT_GRADS, latent_grads_v4=SB.LATENT_GRADS_V4,
                    latent_grads_atomic=SB.LATENT_GRADS_ATOMIC, adam_rows=SB.ADAM_ROWS, sq_norms=SB.SQ_NORMS,
                    seg_fill=SB.SEG_FILL, seg_order=SB.SEG_ORDER, adam=SB.ADAM, bt_counts=S.BT_COUNTS,
                    bt_compact=S.BT_COMPACT, entries_dot=S.ENTRIES_DOT)
    HEADER = S.HEADER
    radix_bf16 = True
    radix_max_groups = 132 * 8

    @staticmethod
    def available() -> bool:
        return mx.cuda.is_available()

    def make_kernel(self, name: str, spec: KernelSpec) -> Any:
        return mx.fast.cuda_kernel(name=name, input_names=list(spec.inputs), output_names=list(spec.outputs),
                                   source=spec.source, header=self.HEADER)

    def topk_threads(self, F: int) -> int:
        if F >= 4096:
            return 1024 if F >= 65536 else 512
        return max(64, min(512, 1 << max(0, (F // 4).bit_length() - 1)))  # at most a quarter of the row: prefilter

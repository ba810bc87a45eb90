"""Metal back end of the fused SAE kernels: its sources (``metal_sources.py``) and ``mx.fast.metal_kernel``; the
launches are ``gpu.GpuOps``'s, shared with CUDA (``cuda.py``).

Same algorithms: per-row 8-bit radix select (threadgroup histograms), radix passes over the flattened
batch for the BatchTopK threshold, float4 sparse decode, gathered dot products (``simd_sum``), segmented
per-latent gradients with a threadgroup transpose for dW_enc, and the one-pass decoder Adam + parallel
removal + renorm. Differences: no warp-match aggregation (plain threadgroup atomics) and only the
deterministic segmented gradient kernel (the scatter-add variant maps to it).

These sources have not been run on Apple hardware by this project: ``fused.get_ops`` runs the generic
self-check at first use and falls back to the reference ops, with a warning, if any kernel fails to
build or differs from the reference.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import metal_sources as S
from .gpu import GpuOps, KernelSpec, specs


class MetalOps(GpuOps):
    """The Metal kernels (``gpu.GpuOps`` launches them)."""

    name = "metal"
    SOURCES = specs(row_topk=S.ROW_TOPK, radix_hist=S.RADIX_HIST, decode=S.DECODE, gather_dot=S.GATHER_DOT,
                    latent_grads=S.LATENT_GRADS, adam_rows=S.ADAM_ROWS, sq_norms=S.SQ_NORMS,
                    seg_fill=S.SEG_FILL, seg_order=S.SEG_ORDER)
    HEADER = S.HEADER

    @staticmethod
    def available() -> bool:
        return mx.metal.is_available()

    def make_kernel(self, name: str, spec: KernelSpec) -> Any:
        return mx.fast.metal_kernel(name=name, input_names=list(spec.inputs), output_names=list(spec.outputs),
                                    source=spec.source, header=self.HEADER, atomic_outputs=spec.atomic)

"""Launch code shared by the GPU back ends (``cuda.py``, ``metal.py``): kernels that take the same inputs,
template and grid on both, so only the kernel object differs."""

from __future__ import annotations

import mlx.core as mx

from .ops import row_view


def sq_norm(kernel, g: mx.array, W: mx.array | None) -> mx.array | None:
    """``Ops.sq_norm`` by an ``hk_sq_norms`` kernel (one 256-thread group per row, then one small sum), or None
    where the kernel does not apply (not float32; a W of another shape): the caller then uses the reference."""
    rows = row_view(g) if W is None else g
    if rows.dtype != mx.float32 or (W is not None and (W.dtype != mx.float32 or W.shape != g.shape)):
        return None
    R, C = rows.shape
    (out,) = kernel(inputs=[rows, rows if W is None else W], template=[("C", int(C)), ("HAS_W", W is not None)],
                    grid=(R * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(R,)], output_dtypes=[mx.float32])
    return mx.sum(out)


def sorted_entries(cols, rows_dec, rows_enc, coef_dec, coef_enc, nrows: int, F: int) -> list[mx.array]:
    """The entries of ``Ops.latent_grads`` sorted by (latent, row), for the segmented per-latent kernels
    (``hk_latent_grads*``): [offsets [F+1] int32 (latent f's entries are offsets[f]:offsets[f+1]), rows_dec,
    rows_enc (uint32), coef_dec, coef_enc]. The order within a latent is fixed: the sums are deterministic."""
    cols = cols.astype(mx.uint32)
    order = mx.argsort(cols * nrows + rows_dec.astype(mx.uint32))
    counts = mx.zeros((F,), mx.int32).at[cols.astype(mx.int32)].add(1)
    offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
    return [offsets, rows_dec.astype(mx.uint32)[order], rows_enc.astype(mx.uint32)[order], coef_dec[order],
            coef_enc[order]]

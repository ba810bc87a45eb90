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

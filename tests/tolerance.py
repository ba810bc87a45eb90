"""Float comparisons that hold on any CPU and BLAS: tolerances scale with the values compared.

Two code paths (fused vs unfused attention, MKL vs OpenBLAS vs MLX's own GEMM, AVX-512 or not) sum in
different orders, so float32 results differ by a few ulps of the *largest* value involved. A tolerance
``tol`` here means ``tol * max(1, max |desired|)``: as tight as an absolute tolerance for values of order
one, and relative for larger ones (logits of magnitude 5-30). Exact equality stays ``== 0`` / ``array_equal``
where the computation is truly the same.
"""

from __future__ import annotations

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "astype") and type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        x = x.astype(mx.float32)
    return np.asarray(x, dtype=np.float64)


def scale_of(desired) -> float:
    d = _np(desired)
    return max(1.0, float(np.nanmax(np.abs(d)))) if d.size else 1.0


def rel_maxdiff(actual, desired) -> float:
    """max |actual - desired| / max(1, max |desired|)."""
    a, d = _np(actual), _np(desired)
    return float(np.max(np.abs(a - d))) / scale_of(d) if d.size else 0.0


def assert_close(actual, desired, tol: float = 1e-5, err_msg: str = "") -> None:
    """``actual`` equals ``desired`` within ``tol * max(1, max |desired|)`` everywhere (NaNs must match)."""
    a, d = _np(actual), _np(desired)
    np.testing.assert_allclose(a, np.broadcast_to(d, a.shape) if d.ndim == 0 else d, rtol=0,
                               atol=tol * scale_of(d), err_msg=err_msg)

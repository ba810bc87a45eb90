"""Load an optimised BLAS before ``mlx.core`` on Linux.

The Linux ``mlx-cpu`` wheel links a bundled reference BLAS (netlib), which runs a float32 matmul at
~5-8 GFLOP/s on a small x86_64 machine. MLX resolves ``cblas_sgemm`` and friends through the dynamic
loader, so loading an optimised BLAS with ``RTLD_GLOBAL`` *before* ``import mlx.core`` makes MLX use it
(100-340 GFLOP/s on the same machine).

Sources, in the order they are tried:

1. ``$HOOKED_MLX_BLAS`` -- an explicit path to a shared library exporting ``cblas_sgemm``;
2. Debian's ``libopenblas0-pthread`` (``apt-get install libopenblas0-pthread``), the fastest one measured;
3. Intel MKL from PyPI (``pip install mkl``, pulled in by the ``hooked-mlx[cpu]`` extra): ``libmkl_rt.so.*``
   in the environment's ``lib/`` folder. It needs nothing from the system.

Set ``HOOKED_MLX_NO_BLAS=1`` to opt out. Nothing is done on macOS (Accelerate) or when MLX has another
backend. If ``mlx.core`` was already imported, a warning explains the fix (import order or LD_PRELOAD).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig
import warnings

#: the path of the BLAS this process loaded, or None
LOADED: str | None = None
_WARNED = False

_DEBIAN = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
]


def candidate_paths() -> list[str]:
    """Every BLAS this machine offers, in the order they are tried."""
    out: list[str] = []
    env = os.environ.get("HOOKED_MLX_BLAS")
    if env:
        out.append(env)
    out += [p for p in _DEBIAN if os.path.exists(p)]
    prefixes = {sys.prefix, sys.base_prefix, sysconfig.get_config_var("prefix") or sys.prefix}
    for pre in prefixes:
        out += sorted(glob.glob(os.path.join(pre, "lib", "libmkl_rt.so*")))
    return out


def load_blas() -> str | None:
    """Load the first working BLAS with RTLD_GLOBAL; return its path (None if none, or not applicable)."""
    global LOADED, _WARNED
    if LOADED is not None:
        return LOADED
    if not sys.platform.startswith("linux") or os.environ.get("HOOKED_MLX_NO_BLAS", "") not in ("", "0"):
        return None
    if "mlx.core" in sys.modules:
        if not _WARNED and not _preloaded():
            _WARNED = True
            warnings.warn(
                "hooked_mlx: mlx.core was imported before hooked_mlx, so MLX keeps its slow reference BLAS "
                "on this Linux CPU (~30x slower matmuls). Import hooked_mlx first, or start Python with "
                "LD_PRELOAD=<path to libopenblas.so.0 or libmkl_rt.so.3>. Set HOOKED_MLX_NO_BLAS=1 to silence.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    if "libmkl_rt" in "".join(candidate_paths()):
        # MKL's default Intel OpenMP layer uses every core; keep the user's choice if they set one.
        os.environ.setdefault("MKL_THREADING_LAYER", "INTEL")
        # Intel OpenMP threads spin 200 ms after each call by default; next to MLX's own threads (and any
        # other process) that spinning steals the cores: measured 3.4x slower SmolLM2 forwards on 2 cores.
        os.environ.setdefault("KMP_BLOCKTIME", "0")
    for path in candidate_paths():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _ = lib.cblas_sgemm  # AttributeError: not a CBLAS library
        except (OSError, AttributeError):
            continue
        LOADED = path
        return path
    return None


def _preloaded() -> bool:
    pre = os.environ.get("LD_PRELOAD", "")
    return "openblas" in pre or "mkl" in pre or "blas" in pre

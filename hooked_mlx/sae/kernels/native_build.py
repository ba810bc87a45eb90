"""Build and load the native CPU kernels (``cpu_native.cpp``) at first use.

The extension is compiled once per machine and set of versions with the system C++ compiler (``$CXX`` or
``c++``), against the installed MLX's headers and ``libmlx`` and nanobind's sources (nanobind is a
dependency; its ABI must be the one MLX's Python module was built with, which the self-check in
``select.py`` confirms before any use). The result is cached under ``$HOOKED_MLX_CACHE_DIR`` (default
``~/.cache/hooked_mlx``) in a folder named by a hash of everything that goes into it: the source, the MLX,
nanobind and Python versions, the compiler, its flags and (with ``-march=native``) the CPU's features.
Concurrent first uses (the processes of a distributed run) wait on one lock; the library is written under
a temporary name and renamed, so a half-built file is never loaded.

``HOOKED_MLX_CPU_NATIVE=0`` turns the native kernels off (the pure-MLX CPU ops run instead).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("cpu_native.cpp")
MODULE = "_hooked_mlx_cpu_kernels"


class NativeBuildError(RuntimeError):
    """The native CPU kernels could not be built or loaded (the message says why)."""


def cache_root() -> Path:
    root = os.environ.get("HOOKED_MLX_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "hooked_mlx"


def enabled() -> bool:
    return os.environ.get("HOOKED_MLX_CPU_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"no C++ compiler: running {cxx!r} failed ({e}); set CXX to one") from e


def _paths() -> dict[str, Path]:
    import mlx
    import nanobind

    mlx_dir = Path(list(mlx.__path__)[0])
    nb_dir = Path(nanobind.__file__).parent
    return {
        "mlx_include": mlx_dir / "include",
        "mlx_lib": mlx_dir / "lib",
        "nb_include": nb_dir / "include",
        "nb_robin_map": nb_dir / "ext" / "robin_map" / "include",
        "nb_src": nb_dir / "src",
        "py_include": Path(sysconfig.get_paths()["include"]),
    }


def _mlx_is_abi3() -> bool:
    import mlx.core as mx

    return ".abi3." in Path(mx.__file__ or "").name


def _flags(native: bool, openmp: bool) -> list[str]:
    # nanobind's type registry is shared only with modules of the same domain and ABI: MLX's Python module is
    # built with NB_DOMAIN mlx, and as a stable-ABI module (abi3) on Python 3.12+
    f = ["-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS",
         "-DNB_DOMAIN=mlx"]
    if _mlx_is_abi3():
        f.append("-DPy_LIMITED_API=0x030C0000")
    if native:
        f.append("-mcpu=native" if platform.machine() in ("arm64", "aarch64") and sys.platform == "darwin"
                 else "-march=native")
    if openmp:
        f.append("-fopenmp")
    return f


def _key(cxx: str, flags: list[str]) -> str:
    import mlx.core as mx
    import nanobind

    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), str(getattr(mx, "__version__", "?")).encode(), nanobind.__version__.encode(),
                 sys.implementation.cache_tag.encode(), _compiler_id(cxx).encode(), " ".join(flags).encode(),
                 _cpu_features().encode(), sysconfig.get_config_var("EXT_SUFFIX").encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compile(cxx: str, flags: list[str], out: Path, workdir: Path) -> None:
    p = _paths()
    for name in ("mlx_include", "mlx_lib", "nb_include", "nb_src"):
        if not p[name].is_dir():
            raise NativeBuildError(f"{name.replace('_', ' ')} folder {p[name]} is missing; reinstall mlx / nanobind")
    inc = [f"-I{p[k]}" for k in ("mlx_include", "nb_include", "nb_robin_map", "py_include")]
    objs, procs = [], []
    for src in (SOURCE, p["nb_src"] / "nb_combined.cpp"):
        obj = workdir / (src.stem + ".o")
        objs.append(obj)
        procs.append((src, subprocess.Popen([cxx, *flags, *inc, "-c", str(src), "-o", str(obj)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for src, proc in procs:
        log, _ = proc.communicate()
        if proc.returncode != 0:
            raise NativeBuildError(f"compiling {src.name} failed (exit {proc.returncode}):\n{log[-4000:]}")
    link = [cxx, *flags, "-shared", *map(str, objs), "-o", str(out), f"-L{p['mlx_lib']}", "-lmlx",
            f"-Wl,-rpath,{p['mlx_lib']}"]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    res = subprocess.run(link, capture_output=True, text=True)
    if res.returncode != 0:
        raise NativeBuildError(f"linking the native CPU kernels failed:\n{(res.stdout + res.stderr)[-4000:]}")


def _load(path: Path) -> ModuleType:
    import mlx.core  # noqa: F401  (registers mlx's array type with nanobind first)

    # GNU OpenMP's idle threads spin (up to GOMP_SPINCOUNT iterations) after each parallel loop, and on a
    # small machine they take the cores from the BLAS threads of the GEMM that follows (2 cores: the
    # encoder GEMM ran 3x slower). Read by libgomp when it loads, i.e. with this module, unless the process
    # had loaded it already.
    os.environ.setdefault("GOMP_SPINCOUNT", "0")

    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    if spec is None:
        raise NativeBuildError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _build(native: bool, openmp: bool) -> Path:
    cxx = os.environ.get("CXX", "c++")
    flags = _flags(native, openmp)
    folder = cache_root() / "cpu_kernels" / _key(cxx, flags)
    lib = folder / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no lock, the rename still keeps the file whole
            pass
        if lib.is_file():  # another process built it while this one waited
            return lib
        with tempfile.TemporaryDirectory(dir=folder) as work:
            tmp = Path(work) / lib.name
            _compile(cxx, flags, tmp, Path(work))
            os.replace(tmp, lib)
    return lib


@cache
def load() -> ModuleType:
    """The native kernel module, built on first use (about 15 s on 2 cores) and cached. Raises
    ``NativeBuildError`` (with the compiler's output) when no variant builds."""
    if not enabled():
        raise NativeBuildError("turned off by HOOKED_MLX_CPU_NATIVE=0")
    errors = []
    # -march=native and OpenMP first; then without each (a compiler without OpenMP gives one thread)
    for native, openmp in ((True, True), (False, True), (True, False), (False, False)):
        try:
            return _load(_build(native, openmp))
        except NativeBuildError as e:
            errors.append(str(e))
        except ImportError as e:
            errors.append(f"loading the built kernels failed: {e}")
        except OSError as e:  # e.g. a read-only cache folder: say where, and how to move it
            errors.append(f"{e}; set HOOKED_MLX_CACHE_DIR to a writable folder")
    raise NativeBuildError("no variant of the native CPU kernels builds; the first error was:\n" + errors[0])

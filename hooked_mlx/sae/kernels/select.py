"""Which ``Ops`` back end runs: the device's (CUDA, Metal, or the sparse CPU ops), self-checked at first use
against ``ReferenceOps``; a back end that fails to build or disagrees warns and falls back to the reference.
``HOOKED_MLX_SAE_KERNELS=cuda|metal|cpu|cpu-mlx|reference`` forces one (``cpu``: the native CPU kernels,
``cpu-mlx``: the CPU ops built from MLX primitives, which ``cpu`` falls back to when no C++ compiler builds
the native ones).
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx

from . import reference as R
from .native_build import NativeBuildError
from .native_build import enabled as native_build_enabled
from .ops import ReferenceOps, adam_hparams

REFERENCE_OPS = ReferenceOps()
#: the back ends by name: "cpu" is the native CPU kernels (the pure-MLX "cpu-mlx" ops when they cannot be built)
BACKENDS = ("cuda", "metal", "cpu", "cpu-mlx", "reference")
_CHOSEN: dict[str, ReferenceOps] = {}


def _gpu_ops(name: str) -> ReferenceOps:
    if name == "cpu":
        try:
            from .cpu_native import NativeCpuOps

            return NativeCpuOps()
        except NativeBuildError as e:
            if native_build_enabled():
                warnings.warn(f"hooked_mlx SAE kernels: the native CPU kernels are not available ({e}). Using "
                              "the pure-MLX CPU ops (correct, slower).", RuntimeWarning, stacklevel=4)
            name = "cpu-mlx"
    if name == "cpu-mlx":
        from .cpu import CpuOps

        return CpuOps()
    if name == "cuda":
        from .cuda import CudaOps

        return CudaOps()
    if name == "metal":
        from .metal import MetalOps

        return MetalOps()
    raise ValueError(f"Unknown SAE kernel back end {name!r}: expected one of {', '.join(BACKENDS)}.")


def _available() -> str:
    forced = os.environ.get("HOOKED_MLX_SAE_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"HOOKED_MLX_SAE_KERNELS={forced!r} is not a back end; use one of {', '.join(BACKENDS)}."
            )
        return forced
    if mx.default_device() == mx.cpu:
        return "cpu"
    try:
        if mx.cuda.is_available():
            return "cuda"
    except AttributeError:  # pragma: no cover - older MLX
        pass
    if mx.metal.is_available():
        return "metal"
    return "reference"


def self_check(ops: ReferenceOps, seed: int = 0) -> list[str]:
    """Compare every primitive of ``ops`` with the reference on a small problem; return the failures
    (empty = passed). Selection is compared as sets of values, so ties may be broken differently."""
    fails = []
    ref = REFERENCE_OPS
    key = mx.random.key(seed)
    k1, k2, k3, k4, k5, k6 = mx.random.split(key, 6)
    B, D, F, k = 8, 64, 512, 8
    x = mx.random.normal((B, D), key=k1)
    W_enc = mx.random.normal((D, F), key=k2) / D**0.5
    W_dec = mx.random.normal((F, D), key=k3)
    W_dec = W_dec / mx.linalg.norm(W_dec, axis=-1, keepdims=True)
    b_enc = 0.1 * mx.random.normal((F,), key=k4)
    dY = mx.random.normal((B, D), key=k5)
    dead = (mx.random.uniform(shape=(F,), key=k6) < 0.3).astype(mx.float32)

    def close(name, a, b, rtol, atol):
        try:
            a, b = mx.array(a), mx.array(b)
            mx.eval(a, b)
            if a.shape != b.shape or not mx.allclose(a.astype(mx.float32), b.astype(mx.float32), rtol=rtol,
                                                    atol=atol).item():
                err = mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item() if a.shape == b.shape \
                    else f"shape {a.shape} vs {b.shape}"
                fails.append(f"{name}: differs from the reference (max abs error {err})")
        except Exception as e:
            fails.append(f"{name}: raised {type(e).__name__}: {e}")

    def run(name, fn):
        try:
            out = fn()
            mx.eval(out)
            return out
        except Exception as e:
            fails.append(f"{name}: raised {type(e).__name__}: {e}")
            return None

    lo = 2e-2  # bf16 encoder
    pre_t = run("pre", lambda: ops.pre(x, W_enc, b_enc))
    if pre_t is not None:
        close("pre", pre_t, ref.pre(x, W_enc, b_enc), lo, lo)
    pre = ref.pre(x, W_enc, b_enc)
    for name, dd, relu in (("row_topk", None, True), ("row_topk(dead)", dead, True),
                           ("row_topk(dead, raw)", dead, False)):
        got = run(name, lambda dd=dd, relu=relu: ops.row_topk(pre, k, dd, relu))
        if got is not None:
            want = ref.row_topk(pre, k, dd, relu)
            close(name, mx.sort(got[0], axis=-1), mx.sort(want[0], axis=-1), 1e-6, 1e-6)
            src = pre if dd is None else mx.where(dd > 0, pre, -mx.inf)
            chk = mx.take_along_axis(src, got[1].astype(mx.int32), axis=-1)
            chk = mx.maximum(chk, 0) if relu else mx.where(mx.isfinite(chk), chk, 0)
            close(name + " indices", chk, got[0], 1e-6, 1e-6)
    # a tied row longer than the top-k prefilter's capacity (its fallback to the whole row) and one with few ties
    for name, src in (("row_topk(all tied)", mx.ones((2, 4096), mx.float32)),
                      ("row_topk(ties)", mx.round(4 * mx.random.normal((2, 4096), key=k5)) / 4)):
        got = run(name, lambda src=src: ops.row_topk(src, 16))
        if got is not None:
            close(name, mx.sort(got[0], axis=-1), mx.sort(ref.row_topk(src, 16)[0], axis=-1), 0, 0)
            close(name + " indices", mx.maximum(mx.take_along_axis(src, got[1].astype(mx.int32), axis=-1), 0), got[0],
                  0, 0)
    keys = ref.acts_keys(pre)
    top = (mx.max(keys) >> 24).astype(mx.uint32) << 24  # the highest occupied first digit
    for shift in (24, 16):
        prefix = top.reshape(1) if shift == 16 else mx.array([0], mx.uint32)
        got = run(f"radix_histogram({shift})", lambda prefix=prefix, shift=shift: ops.radix_histogram(ops.acts_keys(pre), prefix, shift))
        if got is not None:
            close(f"radix_histogram({shift})", got, ref.radix_histogram(keys, prefix, shift), 0, 0)
    got = run("batchtopk_threshold", lambda: ops.batch_kth_largest(pre, min(3 * B, B * F)))
    if got is not None:
        close("batchtopk_threshold", got, R.batchtopk_mask(mx.maximum(pre, 0), 3)[1], 0, 0)
    n_keep = 3 * B
    entries = run("batch_entries", lambda: ops.batch_entries(pre, n_keep))
    if entries is not None:
        want_e = ref.batch_entries(pre, n_keep)
        close("batch_entries", mx.sort(entries[2]), mx.sort(want_e[2]), 0, 0)
        at = mx.maximum(pre, 0)[entries[0].astype(mx.int32), entries[1].astype(mx.int32)]
        close("batch_entries indices", at, entries[2], 0, 0)
    er, ec, ev = ref.batch_entries(pre, n_keep)
    got = run("entries_decode", lambda: ops.entries_decode(er, ec, ev, W_dec, B))
    if got is not None:
        close("entries_decode", got, ref.entries_decode(er, ec, ev, W_dec, B), 1e-4, 1e-4)
    got = run("entries_dot", lambda: ops.entries_dot(dY, er, ec, W_dec))
    if got is not None:
        close("entries_dot", got, ref.entries_dot(dY, er, ec, W_dec), 1e-4, 1e-4)
    vals, idx = ref.row_topk(pre, k)
    got = run("decode", lambda: ops.decode(vals, idx, W_dec))
    if got is not None:
        close("decode", got, ref.decode(vals, idx, W_dec), 1e-4, 1e-4)
    got = run("gather_dot", lambda: ops.gather_dot(dY, idx, W_dec))
    if got is not None:
        close("gather_dot", got, ref.gather_dot(dY, idx, W_dec), 1e-4, 1e-4)
    Wd = ops.decoder_weights(W_dec)  # the copy the fused forward decodes with (bf16 on the GPU back ends)
    got = run("decode(decoder_weights)", lambda: ops.decode(vals, idx, Wd))
    if got is not None:
        close("decode(decoder_weights)", got, ref.decode(vals, idx, Wd.astype(mx.float32)), 1e-4, 1e-4)
    got = run("gather_dot(decoder_weights)", lambda: ops.gather_dot(dY, idx, Wd))
    if got is not None:
        close("gather_dot(decoder_weights)", got, ref.gather_dot(dY, idx, Wd.astype(mx.float32)), 1e-4, 1e-4)
    n = B * k
    cols = idx.reshape(-1)
    rows = mx.repeat(mx.arange(B, dtype=mx.uint32), k)
    cd = vals.reshape(-1)
    ce = mx.random.normal((n,), key=k1)
    dY16, x16 = dY.astype(mx.bfloat16), x.astype(mx.bfloat16)
    for det, lp in ((True, False), (False, False), (True, True)):
        Yc, Xc = (dY16, x16) if lp else (dY, x)
        nm0 = f"latent_grads(det={det}{', bf16 operands' if lp else ''})"
        got = run(nm0, lambda det=det, Yc=Yc, Xc=Xc: ops.latent_grads(cols, rows, rows, cd, ce, Yc, Xc, F, det))
        if got is not None:
            want = ref.latent_grads(cols, rows, rows, cd, ce, Yc.astype(mx.float32), Xc.astype(mx.float32), F)
            for nm, a, b in zip(("dW_dec", "dW_enc", "db_enc"), got, want):
                close(f"{nm0}.{nm}", a, b, 1e-4, 1e-4)
    got = run("enc_rows_sum", lambda: ops.enc_rows_sum(vals, idx, W_enc))
    if got is not None:
        close("enc_rows_sum", got, ref.enc_rows_sum(vals, idx, W_enc), 1e-4, 1e-4)
    hp = adam_hparams(1e-3, 0.9, 0.999, 1e-8, mx.array(3))
    g = mx.random.normal(W_dec.shape, key=k2)
    m = 0.1 * mx.random.normal(W_dec.shape, key=k3)
    v = mx.abs(mx.random.normal(W_dec.shape, key=k4)) * 1e-2
    got = run("adam_rows", lambda: ops.adam_rows(W_dec, g, m, v, hp, True, True, 1e-8))
    if got is not None:
        for nm, a, b in zip("Wmv", got, ref.adam_rows(W_dec, g, m, v, hp, True, True, 1e-8)):
            close(f"adam_rows.{nm}", a, b, 1e-5, 1e-6)
    got = run("adam_rows(lowp copy)", lambda: ops.adam_rows(W_dec, g, m, v, hp, True, True, 1e-8, mx.bfloat16))
    if got is not None:
        for nm, a, b in zip("Wmv", got[:3], ref.adam_rows(W_dec, g, m, v, hp, True, True, 1e-8)):
            close(f"adam_rows(lowp copy).{nm}", a, b, 1e-5, 1e-6)
        close("adam_rows(lowp copy).copy", got[3], got[0].astype(mx.bfloat16), 0, 0)
    for nm, args in (("sq_norm", (g,)), ("sq_norm(rows)", (g, W_dec)), ("sq_norm(vector)", (b_enc,))):
        got = run(nm, lambda args=args: ops.sq_norm(*args))
        if got is not None:
            close(nm, got, ref.sq_norm(*args), 1e-5, 1e-5)
    got = run("adam", lambda: ops.adam(W_dec, g, m, v, hp))
    if got is not None:
        for nm, a, b in zip("pmv", got, ref.adam(W_dec, g, m, v, hp)):
            close(f"adam.{nm}", a, b, 1e-5, 1e-6)
    got = run("adam(lowp copy)", lambda: ops.adam(W_dec, g, m, v, hp, mx.bfloat16))
    if got is not None:
        want = ref.adam(W_dec, g, m, v, hp, mx.bfloat16)
        for nm, a, b in zip("pmv", got[:3], want[:3]):
            close(f"adam(lowp copy).{nm}", a, b, 1e-5, 1e-6)
        close("adam(lowp copy).copy", got[3], got[0].astype(mx.bfloat16), 0, 0)  # round to nearest even
    return fails


def get_ops(name: str | None = None) -> ReferenceOps:
    """The ops object of back end ``name`` (default: the best available), self-checked once."""
    name = name or _available()
    if name == "reference":
        return REFERENCE_OPS
    if name not in _CHOSEN:
        try:
            ops = _gpu_ops(name)
            fails = self_check(ops)
        except Exception as e:  # any failure means: do not use this back end
            fails = [f"could not build the {name} kernels: {type(e).__name__}: {e}"]
        if fails:
            warnings.warn(
                f"hooked_mlx SAE kernels: the {name} back end failed its self-check against the pure-MLX "
                f"reference ({'; '.join(fails[:4])}{' ...' if len(fails) > 4 else ''}). Falling back to the "
                f"reference kernels (correct, slower). Please report this with your MLX version "
                f"({getattr(mx, '__version__', '?')}) and device.",
                RuntimeWarning,
                stacklevel=3,
            )
            ops = REFERENCE_OPS
        _CHOSEN[name] = ops
    return _CHOSEN[name]


def backend() -> str:
    """The back end in use: "cuda" | "metal" | "reference" (after the self-check)."""
    return get_ops().name


def resolve_ops(ops) -> ReferenceOps:
    if ops is None:
        return get_ops()
    if isinstance(ops, str):
        return get_ops(ops)
    return ops

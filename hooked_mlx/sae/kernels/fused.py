"""Fused TopK-SAE training kernels: one interface, three back ends (CUDA, Metal, pure-MLX reference).

The interface
-------------
* ``topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead=None, k_aux=None)`` -> ``TopKOut`` with
  ``x_hat`` [B,D], the kept ``vals`` / ``idx`` [B,k], and (AuxK on) ``e_hat`` [B,D] = the top-``k_aux``
  dead latents decoded without bias, ``aux_vals`` / ``aux_idx`` [B,k_aux]. It is an ``mx.custom_function``:
  the forward never keeps the [B,F] pre-activations, and the ``.vjp`` is sparse:

  - d vals        = gathered dot products  dY_b . W_dec[idx_bj]                          (2BKD)
  - dW_dec rows   = segmented (deterministic; default) or atomic scatter-add of vals * dY  (2BKD)
  - dW_enc, db_enc only on kept latents (relu mask), dW_enc[:, f] = sum_e dpre_e * xc_e    (2BKD)
  - db_dec        = sum_b dY_b  -  W_enc @ db_enc  (the encoder's share, one mat-vec: 2FD)
  - dx            = sum_j dpre_bj W_enc[:, idx_bj]  (lazy: pruned unless x's gradient is used)

  so a step costs ~2BDF + 8BKD FLOPs instead of the dense 12BDF.
* ``batchtopk_threshold(acts, k)`` -> the BatchTopK cut (the (k*B)-th largest entry of the flattened
  batch) by radix select, never a sort; ``batchtopk_mask`` is the reference-compatible wrapper.
* ``fused_adam_renorm(W_dec, g, m, v, ...)`` -> one pass per decoder row: parallel-gradient removal,
  Adam (MLX's formula, bias correction on), row renormalisation; ``adam(p, g, m, v, ...)`` the plain
  update for the other parameters.
* Reference-compatible per-op functions (``encode_pre``, ``topk_select``, ``sparse_decode``,
  ``topk_decode``, ``batchtopk_mask`` ...) so ``get_backend("fused")`` is a drop-in ``kernels`` module
  for the trainer (top-k select and decode run fused; the encoder backward stays dense there).
* ``backend()`` -> "cuda" | "metal" | "cpu" | "reference": the device's back end if it passed its self-check
  (run once, at first use, on a small problem against the reference ops; on a mismatch or an exception it
  warns and falls back to "reference"). ``HOOKED_MLX_SAE_KERNELS=cpu|cuda|metal|reference`` forces one.

Trainer integration (``SAEConfig.kernels = "auto"``, the default, is this module):

* The TopK step takes ``topk_train_forward(sae, x, dead, use_dead)`` -> (x_hat, vals, idx, aux), the
  trainer's TopK branch with its AuxK semantics (raw dead pre-activations): sparse encoder backward.
  The other architectures use the per-op functions below (BatchTopK's cut without a sort).
* On back ends with ``fused_optimizer`` (CUDA, Metal) the update is ``sae.fused_update.fused_adam_update``:
  ``adam_rows`` + ``adam`` with the clip and the non-finite guard in the hyper-parameter vector.
  ``step.FusedTopKStep`` is the bare fused step (no clip, guard or metrics) the trainer is measured against.

Precision: GPU back ends run the encoder matmul in bf16 with fp32 accumulation (pre-activations stored
in bf16, as under sparsify's autocast), and the per-latent gradient sums read bf16 copies of the
reconstruction gradient and of the (centred) input with fp32 sums (``lowp_backward``: half the gathered
bytes; ``HOOKED_MLX_SAE_LOWP_BWD=0`` turns it off). Parameters, values, decode, Adam and θ are fp32. The
reference back end is fp32 end to end and equals the dense reference (``reference.py``) to float32
rounding, which the CPU tests check.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from typing import NamedTuple

import mlx.core as mx

from . import reference as R

__all__ = [
    "TopKOut", "topk_sae_forward", "batchtopk_threshold", "batchtopk_mask", "fused_adam_renorm", "adam",
    "backend", "get_ops", "self_check", "ReferenceOps", "adam_hparams",
    "encode_pre", "topk_select", "topk_encode", "sparse_decode", "topk_decode", "scatter_dense",
    "dense_decode", "jumprelu", "heaviside", "topk_sae_loss", "topk_train_forward",
]


# ---------------------------------------------------------------------------------------------------
# back-end ops: the reference (pure MLX) implementation of every primitive a fused back end provides
# ---------------------------------------------------------------------------------------------------


def float_keys(a: mx.array) -> mx.array:
    """Order-preserving uint32 keys of float values (larger value -> larger key; -inf smallest)."""
    bits = a.astype(mx.float32).view(mx.uint32)
    neg = (bits >> 31) == 1
    return mx.where(neg, ~bits, bits | mx.array(0x80000000, dtype=mx.uint32))


def keys_to_float(keys: mx.array) -> mx.array:
    pos = (keys >> 31) == 1
    bits = mx.where(pos, keys & mx.array(0x7FFFFFFF, dtype=mx.uint32), ~keys)
    return bits.view(mx.float32)


class ReferenceOps:
    """Pure-MLX primitives (any device). GPU back ends subclass this and override what they fuse."""

    name = "reference"
    matmul_dtype = None  # None: the inputs' dtype (float32)
    #: True (GPU kernels): adam_rows is one pass per decoder row (projection, Adam, renorm), so the trainer's
    #: update runs as ``fused_update.fused_adam_update``. False (CPU): compiled MLX fuses the reference
    #: update's elementwise work already, and each extra reduction is a separate pass, so the trainer keeps it.
    fused_optimizer = False
    lowp_backward = False  # True: the per-latent gradient sums read bf16 copies of dY and xc (fp32 sums)

    # encoder ---------------------------------------------------------------------------------------
    def pre(self, xc: mx.array, W_enc: mx.array, b_enc: mx.array, W_lowp: mx.array | None = None) -> mx.array:
        """Pre-activations [B,F] = xc @ W_enc + b_enc (``W_lowp``: a ready low-precision copy of W_enc)."""
        if self.matmul_dtype is None:
            return xc @ W_enc + b_enc
        dt = self.matmul_dtype
        W = W_lowp if W_lowp is not None and W_lowp.size else W_enc.astype(dt)
        return mx.addmm(b_enc.astype(dt), xc.astype(dt), W)

    def row_topk(self, pre: mx.array, k: int, dead: mx.array | None = None, relu: bool = True
                 ) -> tuple[mx.array, mx.array]:
        """(the k largest pre per row [B,k] float32, relu'd unless ``relu=False``; their indices [B,k]
        uint32), any order. ``dead`` [F] (nonzero = eligible): entries of other latents count as -inf
        (value 0 if picked)."""
        if dead is not None:
            pre = mx.where(dead.astype(mx.bool_), pre, -mx.inf)
        F = pre.shape[-1]
        idx = mx.argpartition(pre, F - k, axis=-1)[..., F - k:].astype(mx.uint32)
        vals = mx.take_along_axis(pre, idx, axis=-1)
        vals = mx.maximum(vals, 0) if relu else mx.where(mx.isfinite(vals), vals, 0)
        return vals.astype(mx.float32), idx

    def radix_histogram(self, keys: mx.array, prefix: mx.array, shift: int) -> mx.array:
        """256-bin histogram of digit (key >> shift) & 255 over keys whose bits above the digit equal
        ``prefix`` [1] uint32's (a radix-select pass over the flattened batch)."""
        hi_mask = mx.array(0xFFFFFFFF, dtype=mx.uint32) << (shift + 8) if shift < 24 else mx.array(0, mx.uint32)
        match = (keys & hi_mask) == (prefix & hi_mask)
        digit = ((keys >> shift) & 255).astype(mx.int32)
        return mx.zeros((256,), dtype=mx.uint32).at[digit.reshape(-1)].add(match.reshape(-1).astype(mx.uint32))

    def batch_kth_largest(self, pre: mx.array, n_keep: int) -> mx.array:
        """The n_keep-th largest entry of relu(pre) over the whole batch (a float32 scalar), exact."""
        return radix_kth_largest(self, pre, n_keep)

    def acts_keys(self, pre: mx.array) -> mx.array:
        """Keys of relu(pre), flattened (what BatchTopK ranks)."""
        return float_keys(mx.maximum(pre, 0)).reshape(-1)

    # decoder ---------------------------------------------------------------------------------------
    def decode(self, vals: mx.array, idx: mx.array, W: mx.array) -> mx.array:
        """[B,D] = sum_j vals[:,j] * W[idx[:,j]] (no bias)."""
        return mx.sum(W[idx] * vals[..., None], axis=-2)

    def gather_dot(self, dY: mx.array, idx: mx.array, W: mx.array) -> mx.array:
        """[B,k]: dY_b . W[idx_bj]."""
        return mx.sum(W[idx] * dY[:, None, :], axis=-1)

    def latent_grads(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, xc, F: int, deterministic=True):
        """Per-latent sums over the kept entries e = (row, col):

        dW_dec [F,D] = sum_e coef_dec_e * Y[rows_dec_e]  at row col_e
        dW_enc [D,F] = sum_e coef_enc_e * xc[rows_enc_e] at column col_e
        db_enc [F]   = sum_e coef_enc_e                  at col_e
        """
        D = Y.shape[-1]
        dW_dec = mx.zeros((F, D), dtype=mx.float32).at[cols].add(coef_dec[:, None] * Y[rows_dec])
        if coef_enc is None:
            return dW_dec, None, None
        dW_encT = mx.zeros((F, D), dtype=mx.float32).at[cols].add(coef_enc[:, None] * xc[rows_enc])
        db_enc = mx.zeros((F,), dtype=mx.float32).at[cols].add(coef_enc)
        return dW_dec, dW_encT.T, db_enc

    def enc_rows_sum(self, dpre: mx.array, idx: mx.array, W_enc: mx.array) -> mx.array:
        """dx [B,D] = sum_j dpre_bj * W_enc[:, idx_bj]."""
        return mx.sum(W_enc.T[idx] * dpre[..., None], axis=-2)

    # optimizer -------------------------------------------------------------------------------------
    def sq_norm(self, g: mx.array, W: mx.array | None = None) -> mx.array:
        """Squared L2 norm (float32 scalar) of ``g``; with ``W`` (the shape of g, [R, C]): of g with each row's
        component along the same row of W removed, sum_r |g_r|^2 - (g_r.W_r)^2 (2 - |W_r|^2), without
        forming the projected gradient. Non-finite entries make it non-finite (the trainer's skip test)."""
        if W is None:
            return mx.sum(mx.square(g.astype(mx.float32)))
        gw = mx.sum(g * W, axis=-1)
        return mx.sum(mx.square(g)) - mx.sum(mx.square(gw) * (2.0 - mx.sum(mx.square(W), axis=-1)))

    def adam_rows(self, W, g, m, v, hp, remove_parallel: bool, renorm: bool, renorm_eps: float):
        """Decoder pass: g -= (g.w) w; Adam; w /= (|w| + eps). ``hp`` = ``adam_hparams(...)``: [lr, b1, 1-b1, b2,
        1-b2, eps, c1, c2, apply] float32 with c1 = lr / (1 - b1^t), c2 = rsqrt(1 - b2^t) (MLX Adam,
        bias_correction=True); apply = 0: no update and no renorm."""
        return _adam_rows_fn(bool(remove_parallel), bool(renorm), float(renorm_eps))(W, g, m, v, hp)

    def adam(self, p, g, m, v, hp, lowp_dtype=None):
        if lowp_dtype is None:
            return _adam_elementwise(p, g, m, v, hp)
        return _adam_elementwise_lowp(p, g, m, v, hp, lowp_dtype)


def row_view(g: mx.array) -> mx.array:
    """``g`` as rows [R, C] for a per-row reduction whose total is all that matters: a matrix keeps its
    rows; a vector becomes rows of 4096, 1024 or 256 entries when its length allows (one row otherwise)."""
    if g.ndim == 2:
        return g
    n = g.size
    for c in (4096, 1024, 256):
        if n % c == 0 and n > c:
            return g.reshape(n // c, c)
    return g.reshape(1, n)


def _finite(g: mx.array) -> mx.array:
    """g with non-finite entries read as 0 (only a skipped step has any). |g| < inf is False for NaN and
    inf alike, and unlike mx.isfinite it fuses into a compiled CPU kernel."""
    return mx.where(mx.abs(g) < mx.inf, g, 0.0)


@cache
def _adam_rows_fn(remove_parallel: bool, renorm: bool, renorm_eps: float):
    def fn(W, g, m, v, hp):
        g = _finite(g)
        if remove_parallel:
            g = g - mx.sum(g * W, axis=-1, keepdims=True) * W
        W, m, v = _adam_math(W, g, m, v, hp)
        if renorm:
            W = mx.where(hp[8] > 0, W / (mx.linalg.norm(W, axis=-1, keepdims=True) + renorm_eps), W)
        return W, m, v

    return mx.compile(fn)


def _adam_math(p, g, m, v, hp):
    b1, ob1, b2, ob2, eps, c1, c2 = hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    g = _finite(g)
    m = b1 * m + ob1 * g
    v = b2 * v + ob2 * mx.square(g)
    return p - (c1 * m) / (mx.sqrt(v) * c2 + eps), m, v


_adam_elementwise = mx.compile(_adam_math)


@cache
def _adam_lowp_fn(dtype):
    def fn(p, g, m, v, hp):
        p, m, v = _adam_math(p, g, m, v, hp)
        return p, m, v, p.astype(dtype)

    return mx.compile(fn)


def _adam_elementwise_lowp(p, g, m, v, hp, dtype):
    """Adam plus the low-precision copy of the new parameter, in the same (compiled, fused) pass."""
    return _adam_lowp_fn(dtype)(p, g, m, v, hp)


# ---------------------------------------------------------------------------------------------------
# back-end selection and the generic self-check
# ---------------------------------------------------------------------------------------------------

_REFERENCE = ReferenceOps()
_CHOSEN: dict[str, ReferenceOps] = {}


def _gpu_ops(name: str) -> ReferenceOps:
    if name == "cpu":
        from .cpu import CpuOps

        return CpuOps()
    if name == "cuda":
        from .cuda import CudaOps

        return CudaOps()
    if name == "metal":
        from .metal import MetalOps

        return MetalOps()
    raise ValueError(f"Unknown SAE kernel back end {name!r}: expected 'cuda', 'metal' or 'reference'.")


def _available() -> str:
    forced = os.environ.get("HOOKED_MLX_SAE_KERNELS", "").strip().lower()
    if forced:
        if forced not in ("cuda", "metal", "cpu", "reference"):
            raise ValueError(
                f"HOOKED_MLX_SAE_KERNELS={forced!r} is not a back end; use 'cuda', 'metal' or 'reference'."
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
    ref = _REFERENCE
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
    keys = ref.acts_keys(pre)
    top = (mx.max(keys) >> 24).astype(mx.uint32) << 24  # the highest occupied first digit
    for shift in (24, 16):
        prefix = top.reshape(1) if shift == 16 else mx.array([0], mx.uint32)
        got = run(f"radix_histogram({shift})", lambda prefix=prefix, shift=shift: ops.radix_histogram(ops.acts_keys(pre), prefix, shift))
        if got is not None:
            close(f"radix_histogram({shift})", got, ref.radix_histogram(keys, prefix, shift), 0, 0)
    got = run("batchtopk_threshold", lambda: batchtopk_threshold(pre, 3, ops))
    if got is not None:
        close("batchtopk_threshold", got, R.batchtopk_mask(mx.maximum(pre, 0), 3)[1], 0, 0)
    vals, idx = ref.row_topk(pre, k)
    got = run("decode", lambda: ops.decode(vals, idx, W_dec))
    if got is not None:
        close("decode", got, ref.decode(vals, idx, W_dec), 1e-4, 1e-4)
    got = run("gather_dot", lambda: ops.gather_dot(dY, idx, W_dec))
    if got is not None:
        close("gather_dot", got, ref.gather_dot(dY, idx, W_dec), 1e-4, 1e-4)
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
    for nm, args in (("sq_norm", (g,)), ("sq_norm(rows)", (g, W_dec)), ("sq_norm(vector)", (b_enc,))):
        got = run(nm, lambda args=args: ops.sq_norm(*args))
        if got is not None:
            close(nm, got, ref.sq_norm(*args), 1e-5, 1e-5)
    got = run("adam", lambda: ops.adam(W_dec, g, m, v, hp))
    if got is not None:
        for nm, a, b in zip("pmv", got, ref.adam(W_dec, g, m, v, hp)):
            close(f"adam.{nm}", a, b, 1e-5, 1e-6)
    return fails


def get_ops(name: str | None = None) -> ReferenceOps:
    """The ops object of back end ``name`` (default: the best available), self-checked once."""
    name = name or _available()
    if name == "reference":
        return _REFERENCE
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
                f"({mx.__version__}) and device.",
                RuntimeWarning,
                stacklevel=3,
            )
            ops = _REFERENCE
        _CHOSEN[name] = ops
    return _CHOSEN[name]


def backend() -> str:
    """The back end in use: "cuda" | "metal" | "reference" (after the self-check)."""
    return get_ops().name


def _resolve(ops) -> ReferenceOps:
    if ops is None:
        return get_ops()
    if isinstance(ops, str):
        return get_ops(ops)
    return ops


# ---------------------------------------------------------------------------------------------------
# the fused TopK forward with a sparse VJP
# ---------------------------------------------------------------------------------------------------


class TopKOut(NamedTuple):
    x_hat: mx.array
    vals: mx.array
    idx: mx.array
    e_hat: mx.array | None = None
    aux_vals: mx.array | None = None
    aux_idx: mx.array | None = None


def _dense_cols(idx: mx.array) -> mx.array:
    return idx.reshape(-1).astype(mx.uint32)


@cache
def _topk_fn(ops: ReferenceOps, k: int, k_aux: int, apply_b_dec: bool, deterministic: bool, aux_relu: bool):
    aux = k_aux > 0

    def xc_of(x, b_dec):
        return x - b_dec if apply_b_dec else x

    @mx.custom_function
    def fwd(x, W_enc, b_enc, W_dec, b_dec, dead, W_lowp):
        xc = xc_of(x, b_dec)
        pre = ops.pre(xc, W_enc, b_enc, W_lowp)
        vals, idx = ops.row_topk(pre, k)
        x_hat = ops.decode(vals, idx, W_dec) + b_dec
        if not aux:
            return x_hat, vals, idx
        avals, aidx = ops.row_topk(pre, k_aux, dead, aux_relu)
        e_hat = ops.decode(avals, aidx, W_dec)
        return x_hat, vals, idx, e_hat, avals, aidx

    @fwd.vjp
    def fwd_vjp(primals, cotangents, outputs):
        x, W_enc, b_enc, W_dec, b_dec, dead, W_lowp = primals
        B, D = x.shape
        F = W_dec.shape[0]
        xc = xc_of(x, b_dec)
        d_xhat, d_vals = cotangents[0], cotangents[1]
        vals, idx = outputs[1], outputs[2]
        dv = ops.gather_dot(d_xhat, idx, W_dec) + d_vals
        dpre = mx.where(vals > 0, dv, 0)
        db_dec = mx.sum(d_xhat, axis=0)
        rows = mx.repeat(mx.arange(B, dtype=mx.uint32), k)
        if aux:
            d_ehat, d_avals = cotangents[3], cotangents[4]
            avals, aidx = outputs[4], outputs[5]
            dva = ops.gather_dot(d_ehat, aidx, W_dec) + d_avals
            if aux_relu:
                dprea = mx.where(avals > 0, dva, 0)
            else:  # raw values: every pick of a dead latent carries gradient (fillers for -inf do not)
                dprea = mx.where(mx.take(dead, aidx.astype(mx.int32)) > 0, dva, 0)
            arows = mx.repeat(mx.arange(B, dtype=mx.uint32), k_aux)
            cols = mx.concatenate([_dense_cols(idx), _dense_cols(aidx)])
            rows_dec = mx.concatenate([rows, arows + B])
            rows_enc = mx.concatenate([rows, arows])
            coef_dec = mx.concatenate([vals.reshape(-1), avals.reshape(-1)])
            coef_enc = mx.concatenate([dpre.reshape(-1), dprea.reshape(-1)])
            Y = mx.concatenate([d_xhat, d_ehat], axis=0)
        else:
            cols, rows_dec, rows_enc = _dense_cols(idx), rows, rows
            coef_dec, coef_enc, Y = vals.reshape(-1), dpre.reshape(-1), d_xhat
        Xs = xc
        if ops.lowp_backward:  # bf16 operands, fp32 sums (as the bf16 autocast backward of sparsify's encoder)
            Y, Xs = Y.astype(mx.bfloat16), xc.astype(mx.bfloat16)
        dW_dec, dW_enc, db_enc = ops.latent_grads(cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, Xs, F,
                                                  deterministic)
        dxc = ops.enc_rows_sum(dpre, idx, W_enc)
        if aux:
            dxc = dxc + ops.enc_rows_sum(dprea, aidx, W_enc)
        if apply_b_dec:
            db_dec = db_dec - W_enc @ db_enc
        return dxc, dW_enc, db_enc, dW_dec, db_dec, mx.zeros_like(dead), mx.zeros_like(W_lowp)

    return fwd


def topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k: int, dead=None, k_aux: int | None = None, *,
                     apply_b_dec_to_input: bool = True, deterministic: bool = True, aux_relu: bool = True,
                     W_enc_lowp=None, ops=None) -> TopKOut:
    """Fused TopK SAE forward (see the module docstring). x [B,D] float32.

    ``dead`` [F] bool/float (nonzero = dead) with ``k_aux`` > 0 turns on the AuxK outputs; k_aux is
    clipped to F. ``aux_relu=False``: the AuxK values are the dead latents' raw pre-activations (SAELens
    and the hooked_mlx trainer) instead of relu'd ones (OpenAI, sparsify). ``W_enc_lowp``: the bf16 copy of W_enc that ``adam(..., lowp_copy=True)`` produced in the
    same pass as the update (saves a cast pass per step; GPU back ends only). ``ops``: a back-end name or ops object (default: the self-checked best).
    """
    ops = _resolve(ops)
    B, D = x.shape
    F = W_dec.shape[0]
    if not 1 <= k <= F:
        raise ValueError(f"k = {k} is invalid: expected 1 <= k <= d_sae ({F}).")
    if W_enc.shape != (D, F) or W_dec.shape != (F, D):
        raise ValueError(f"Expected W_enc [{D},{F}] and W_dec [{F},{D}]; got {W_enc.shape} and {W_dec.shape}.")
    ka = 0 if (dead is None or not k_aux) else min(int(k_aux), F)
    d = mx.zeros((F,), mx.float32) if dead is None else dead.astype(mx.float32)
    fn = _topk_fn(ops, int(k), ka, bool(apply_b_dec_to_input), bool(deterministic), bool(aux_relu))
    wl = W_enc_lowp if (W_enc_lowp is not None and ops.matmul_dtype is not None) else mx.zeros((0,), mx.bfloat16)
    return TopKOut(*fn(x, W_enc, b_enc, W_dec, b_dec, d, wl))


def topk_sae_loss(x, W_enc, b_enc, W_dec, b_dec, k: int, dead=None, k_aux=None, aux_coef: float = 1.0, *,
                  W_enc_lowp=None, ops=None):
    """sparsify-style FVU loss (+ AuxK, scaled by min(n_dead/k_aux, 1)) with the fused forward.

    Returns (loss, (fvu, aux, out)). Used by the benchmark and the device test.
    """
    out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, W_enc_lowp=W_enc_lowp, ops=ops)
    tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
    e = x - out.x_hat
    fvu = mx.sum(mx.square(e)) / tv
    aux = mx.array(0.0)
    if out.e_hat is not None:
        n_dead = mx.sum(dead.astype(mx.float32))
        scale = mx.minimum(n_dead / k_aux, 1.0)
        aux = scale * mx.sum(mx.square(out.e_hat - mx.stop_gradient(e))) / tv
    return fvu + aux_coef * aux, (fvu, aux, out)


def topk_train_forward(sae, x, dead, use_dead: bool = True, ops=None, total_variance=None):
    """The TopK branch of ``hooked_mlx.sae.training.train_forward`` on the fused path, same semantics:

    returns (x_hat [B,D], vals [B,k], idx [B,k] (the kept latents, for bookkeeping), aux) where aux is the
    trainer's AuxK term (raw dead pre-activations, no decoder bias, normalised by the residual's total
    variance, times ``aux_k_coefficient``; 0 when no latent is dead or ``use_dead`` is False).
    Call ``backend()`` once before compiling a step that uses it (the self-check runs at first use).
    ``total_variance(e)``: the AuxK normaliser (default: this batch's; data-parallel steps pass the global one).
    """
    from .. import metrics as M

    cfg = sae.cfg
    aux_on = bool(use_dead) and cfg.aux_k_coefficient > 0
    out = topk_sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, cfg.k, dead if aux_on else None,
                           cfg.resolved_aux_k if aux_on else None, apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                           aux_relu=False, ops=ops)
    aux = mx.array(0.0)
    if aux_on:
        e = mx.stop_gradient(x - out.x_hat)
        tv = (total_variance or M.total_variance)(e)
        loss = mx.sum(mx.square(out.e_hat - e)) / mx.maximum(tv, 1e-12)
        aux = cfg.aux_k_coefficient * mx.where(mx.sum(dead) > 0, loss, 0.0)
    return out.x_hat, out.vals, out.idx, aux


# ---------------------------------------------------------------------------------------------------
# BatchTopK threshold by radix select
# ---------------------------------------------------------------------------------------------------


def batchtopk_threshold(pre: mx.array, k: int, ops=None) -> mx.array:
    """The (k*B)-th largest entry of relu(pre) over the whole batch [B,F] (a float32 scalar): exact, no
    sort (``ops.batch_kth_largest``: a radix select on GPU back ends, a two-stage partition on the CPU)."""
    ops = _resolve(ops)
    B, F = pre.shape
    return ops.batch_kth_largest(mx.stop_gradient(pre), min(int(k * B), B * F))


def radix_kth_largest(ops, pre: mx.array, n_keep: int) -> mx.array:
    """The n_keep-th largest entry of relu(pre) by a 4-pass 8-bit radix select over order-preserving keys."""
    keys = ops.acts_keys(pre)
    prefix = mx.array([0], dtype=mx.uint32)
    remaining = mx.array(n_keep, dtype=mx.int32)
    rev = mx.arange(255, -1, -1)
    for shift in (24, 16, 8, 0):
        hist = ops.radix_histogram(keys, prefix, shift).astype(mx.int32)
        h = hist[rev]  # bins from high to low
        cum = mx.cumsum(h)
        j = mx.argmax(cum >= remaining)  # first (highest) bin reaching the count
        remaining = remaining - (cum[j] - h[j])
        digit = (255 - j).astype(mx.uint32)
        prefix = prefix | (digit << shift)
    return keys_to_float(prefix)[0]


def batchtopk_mask(acts: mx.array, k: int, ops=None) -> tuple[mx.array, mx.array]:
    """``reference.batchtopk_mask`` with the radix-select threshold: (kept [B,F], cut)."""
    cut = batchtopk_threshold(acts, k, ops)
    return mx.where(acts >= cut, acts, 0), cut


# ---------------------------------------------------------------------------------------------------
# the fused optimizer pass
# ---------------------------------------------------------------------------------------------------


def adam_hparams(lr, b1, b2, eps, step, grad_scale=None, apply=None) -> mx.array:
    """[lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, apply] float32 for step ``step`` (1-based, an int or array).

    1-b is rounded from double, as MLX's Adam does with its Python-float betas. ``grad_scale`` s (e.g. a
    gradient-clipping factor) folds into the vector: (1-b1)*s and (1-b2)*s^2 update m and v exactly as the
    gradient s*g would, with no pass over the gradient. ``apply`` (a bool array; default True) False makes
    the update a no-op (b = 1, 1-b = 0, c1 = 0, no renorm): a non-finite step skipped inside the update's
    own pass. Every Adam pass reads non-finite gradient entries as 0, so a skipped step leaves p, m and v
    exactly as they were."""
    lr = mx.array(lr, dtype=mx.float32) if not isinstance(lr, mx.array) else lr.astype(mx.float32)
    t = mx.array(step, dtype=mx.float32) if not isinstance(step, mx.array) else step.astype(mx.float32)
    c1 = lr / (1 - mx.power(mx.array(b1, mx.float32), t))
    c2 = mx.rsqrt(1 - mx.power(mx.array(b2, mx.float32), t))
    f = lambda a: mx.array(a, mx.float32)  # noqa: E731
    ob1, ob2 = f(1.0 - b1), f(1.0 - b2)
    b1_, b2_ = f(b1), f(b2)
    if grad_scale is not None:
        s = mx.array(grad_scale, mx.float32) if not isinstance(grad_scale, mx.array) else grad_scale.astype(mx.float32)
        ob1, ob2 = ob1 * s, ob2 * mx.square(s)
    on = f(1.0)
    if apply is not None:
        ok = mx.array(apply) if not isinstance(apply, mx.array) else apply
        b1_, b2_ = mx.where(ok, b1_, 1.0), mx.where(ok, b2_, 1.0)
        ob1, ob2 = mx.where(ok, ob1, 0.0), mx.where(ok, ob2, 0.0)
        c1 = mx.where(ok, c1, 0.0)
        c2 = mx.where(ok, c2, 1.0)
        on = ok.astype(mx.float32)
    return mx.stack([lr, b1_, ob1, b2_, ob2, f(eps), c1, c2, on]).astype(mx.float32)



def fused_adam_renorm(W_dec, g, m, v, *, lr, step, betas=(0.9, 0.999), eps=1e-8, remove_parallel=True,
                      renorm=True, renorm_eps=1e-8, ops=None):
    """One pass over the decoder rows: g -= (g.w)w; Adam (MLX formula, bias correction, 1-based
    ``step``); w /= |w| + renorm_eps. Returns (W_dec, m, v). Matches the trainer's three separate steps."""
    ops = _resolve(ops)
    hp = adam_hparams(lr, betas[0], betas[1], eps, step)
    return ops.adam_rows(W_dec, g, m, v, hp, bool(remove_parallel), bool(renorm), float(renorm_eps))


def adam(p, g, m, v, *, lr, step, betas=(0.9, 0.999), eps=1e-8, lowp_copy=False, ops=None):
    """Plain fused Adam (MLX formula, bias correction): returns (p, m, v), plus the back end's
    low-precision copy of the new p (for ``topk_sae_forward(W_enc_lowp=...)``) when ``lowp_copy``."""
    ops = _resolve(ops)
    hp = adam_hparams(lr, betas[0], betas[1], eps, step)
    if lowp_copy:
        return ops.adam(p, g, m, v, hp, ops.matmul_dtype or p.dtype)
    return ops.adam(p, g, m, v, hp)


# ---------------------------------------------------------------------------------------------------
# reference-compatible per-op API (a drop-in `kernels` module for the trainer)
# ---------------------------------------------------------------------------------------------------


def encode_pre(x, W_enc, b_enc, b_dec=None):
    """Pre-activations [B,F] (bf16 with fp32 accumulation on GPU back ends; autodiff is MLX's)."""
    ops = get_ops()
    if b_dec is not None:
        x = x - b_dec
    if ops.matmul_dtype is None:
        return R.encode_pre(x, W_enc, b_enc)
    return ops.pre(x, W_enc, b_enc)


@cache
def _select_fn(ops: ReferenceOps, k: int):
    @mx.custom_function
    def select(pre):
        return ops.row_topk(pre, k)

    @select.vjp
    def select_vjp(primals, cotangents, outputs):
        pre = primals[0] if isinstance(primals, (list, tuple)) else primals
        vals, idx = outputs
        g = mx.where(vals > 0, cotangents[0], 0).astype(pre.dtype)
        return mx.put_along_axis(mx.zeros_like(pre), idx.astype(mx.int32), g, axis=-1)

    return select


def topk_select(pre, k: int):
    """``reference.topk_select`` with the back end's select (no sort on GPU)."""
    ops = get_ops()
    if ops is _REFERENCE:
        return R.topk_select(pre, k)
    return _select_fn(ops, int(k))(pre)


def sparse_decode(values, indices, W_dec, b_dec=None):
    """``reference.sparse_decode`` through the fused decode (gradients via the sparse VJP)."""
    ops = get_ops()
    if ops is _REFERENCE:
        return R.sparse_decode(values, indices, W_dec, b_dec)
    out = _sparse_decode_fn(ops)(values, indices.astype(mx.uint32), W_dec)
    return out if b_dec is None else out + b_dec


@cache
def _sparse_decode_fn(ops: ReferenceOps):
    @mx.custom_function
    def dec(vals, idx, W):
        return ops.decode(vals, idx, W)

    @dec.vjp
    def dec_vjp(primals, cotangent, output):
        vals, idx, W = primals
        dY = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        B, k = vals.shape
        dvals = ops.gather_dot(dY, idx, W)
        rows = mx.repeat(mx.arange(B, dtype=mx.uint32), k)
        dW, _, _ = ops.latent_grads(idx.reshape(-1), rows, rows, vals.reshape(-1), None, dY, None, W.shape[0])
        return dvals, mx.zeros_like(idx), dW

    return dec


def topk_decode(values, indices, W_dec, b_dec):
    return sparse_decode(values, indices, W_dec, b_dec)


def topk_encode(x, W_enc, b_enc, b_dec, k: int, apply_b_dec_to_input: bool = True):
    return topk_select(encode_pre(x, W_enc, b_enc, b_dec if apply_b_dec_to_input else None), k)


scatter_dense = R.scatter_dense
dense_decode = R.dense_decode
jumprelu = R.jumprelu
heaviside = R.heaviside

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
  (``select.py``: run once, at first use, on a small problem against the reference ops; on a mismatch or an
  exception it warns and falls back to "reference"). ``HOOKED_MLX_SAE_KERNELS=cpu|cuda|metal|reference``
  forces one. The primitives all of this is built from are the ``Ops`` interface (``ops.py``).

Trainer integration (``SAEConfig.kernels = "auto"``, the default, is this module; the trainer composes it in
``hooked_mlx.sae.step_kernels``):

* The TopK step runs ``topk_sae_forward`` (sparse encoder backward, AuxK included). The other
  architectures use the per-op functions below (BatchTopK's cut without a sort).
* On back ends with ``fused_optimizer`` (CUDA, Metal) the update is ``sae.fused_update.fused_adam_update``:
  ``adam_rows`` + ``adam`` with the clip and the non-finite guard in the hyper-parameter vector.
  ``step.FusedTopKStep`` is the bare fused step (no clip, guard or metrics) the trainer is measured against.

Precision: GPU back ends run the encoder matmul in bf16 with fp32 accumulation (pre-activations stored
in bf16, as under sparsify's autocast), and the per-latent gradient sums read bf16 copies of the
reconstruction gradient and of the (centred) input with fp32 sums (``lowp_backward``: half the gathered
bytes; ``HOOKED_MLX_SAE_LOWP_BWD=0`` turns it off). Decode and the gathered dot products read a bf16 copy of
W_dec (``decoder_dtype``; ``HOOKED_MLX_SAE_LOWP_DEC=0`` turns it off), with fp32 sums: the copy the trainer keeps
(``W_dec_lowp``, written by the Adam pass), else one cast per step. Parameters, values, the optimizer state, Adam
and θ are fp32. The reference back end is fp32 end to end and equals the dense reference (``reference.py``) to
float32 rounding, which the CPU tests check.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import mlx.core as mx

from . import reference as R
from .ops import ReferenceOps, adam_hparams
from .select import REFERENCE_OPS, backend, get_ops, resolve_ops, self_check

__all__ = [
    "TopKOut", "topk_sae_forward", "batchtopk_sae_forward", "batchtopk_threshold", "batchtopk_mask",
    "fused_adam_renorm", "adam",
    "backend", "get_ops", "self_check", "ReferenceOps", "adam_hparams",
    "encode_pre", "topk_select", "topk_encode", "sparse_decode", "topk_decode", "scatter_dense",
    "dense_decode", "jumprelu", "heaviside", "topk_sae_loss",
]


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
    rows: mx.array | None = None  # BatchTopK's flattened entries: each one's batch row (``vals`` / ``idx`` [k*B])


def _dense_cols(idx: mx.array) -> mx.array:
    return idx.reshape(-1).astype(mx.uint32)


@cache
def _topk_fn(ops: ReferenceOps, k: int, k_aux: int, apply_b_dec: bool, deterministic: bool, aux_relu: bool,
             batch: bool = False):
    """The fused forward with its sparse VJP. ``batch``: BatchTopK, whose ``k`` entries (k per row times the
    batch) are the flattened ``ops.batch_entries`` (vals, cols and, as the last output, rows); else TopK's
    [B,k] per row."""
    aux = k_aux > 0

    def xc_of(x, b_dec):
        return x - b_dec if apply_b_dec else x

    def dec_w(W_dec, Wd_lowp):
        # a ready copy, else the back end's cast (the VJP's identical cast is the same node of a compiled graph)
        return Wd_lowp if Wd_lowp.size else ops.decoder_weights(W_dec)

    @mx.custom_function
    def fwd(x, W_enc, b_enc, W_dec, b_dec, dead, W_lowp, Wd_lowp):
        xc = xc_of(x, b_dec)
        pre = ops.pre(xc, W_enc, b_enc, W_lowp)
        Wd = dec_w(W_dec, Wd_lowp)
        if batch:
            rows, idx, vals = ops.batch_entries(pre, k)
            x_hat = ops.entries_decode(rows, idx, vals, Wd, x.shape[0]) + b_dec
            last: tuple = (rows,)
        else:
            vals, idx = ops.row_topk(pre, k)
            x_hat = ops.decode(vals, idx, Wd) + b_dec
            last = ()
        if not aux:
            return (x_hat, vals, idx, *last)
        avals, aidx = ops.row_topk(pre, k_aux, dead, aux_relu)
        e_hat = ops.decode(avals, aidx, Wd)
        return (x_hat, vals, idx, e_hat, avals, aidx, *last)

    @fwd.vjp
    def fwd_vjp(primals, cotangents, outputs):
        x, W_enc, b_enc, W_dec, b_dec, dead, W_lowp, Wd_lowp = primals
        B, D = x.shape
        F = W_dec.shape[0]
        xc = xc_of(x, b_dec)
        d_xhat, d_vals = cotangents[0], cotangents[1]
        vals, idx = outputs[1], outputs[2]
        Wd = dec_w(W_dec, Wd_lowp)
        if batch:
            rows = outputs[-1]
            dv = ops.entries_dot(d_xhat, rows, idx, Wd) + d_vals
        else:
            rows = mx.repeat(mx.arange(B, dtype=mx.uint32), k)
            dv = ops.gather_dot(d_xhat, idx, Wd) + d_vals
        dpre = mx.where(vals > 0, dv, 0)
        db_dec = mx.sum(d_xhat, axis=0)
        if aux:
            d_ehat, d_avals = cotangents[3], cotangents[4]
            avals, aidx = outputs[4], outputs[5]
            dva = ops.gather_dot(d_ehat, aidx, Wd) + d_avals
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
        # (lazy: pruned unless x's gradient is used)
        dxc = ops.entries_decode(rows, idx, dpre, W_enc.T, B) if batch else ops.enc_rows_sum(dpre, idx, W_enc)
        if aux:
            dxc = dxc + ops.enc_rows_sum(dprea, aidx, W_enc)
        if apply_b_dec:
            db_dec = db_dec - W_enc @ db_enc
        return (dxc, dW_enc, db_enc, dW_dec, db_dec, mx.zeros_like(dead), mx.zeros_like(W_lowp),
                mx.zeros_like(Wd_lowp))

    return fwd


def topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k: int, dead=None, k_aux: int | None = None, *,
                     apply_b_dec_to_input: bool = True, deterministic: bool = True, aux_relu: bool = True,
                     W_enc_lowp=None, W_dec_lowp=None, ops=None) -> TopKOut:
    """Fused TopK SAE forward (see the module docstring). x [B,D] float32.

    ``dead`` [F] bool/float (nonzero = dead) with ``k_aux`` > 0 turns on the AuxK outputs; k_aux is
    clipped to F. ``aux_relu=False``: the AuxK values are the dead latents' raw pre-activations (SAELens
    and the hooked_mlx trainer) instead of relu'd ones (OpenAI, sparsify). ``W_enc_lowp``: the bf16 copy of W_enc that ``adam(..., lowp_copy=True)`` produced in the
    same pass as the update (saves a cast pass per step; GPU back ends only); ``W_dec_lowp``: likewise the copy of
    W_dec in ``ops.decoder_dtype`` that decode reads (``adam_rows(..., lowp_dtype=...)``). ``ops``: a back-end
    name or ops object (default: the self-checked best).
    """
    return TopKOut(*_fused_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, apply_b_dec_to_input,
                                   deterministic, aux_relu, W_enc_lowp, W_dec_lowp, ops, batch=False))


def batchtopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k: int, dead=None, k_aux: int | None = None, *,
                          apply_b_dec_to_input: bool = True, aux_relu: bool = True, W_enc_lowp=None, W_dec_lowp=None,
                          ops=None):
    """The fused BatchTopK forward (back ends with ``sparse_batchtopk``): as ``topk_sae_forward``, with the batch's
    k*B largest relu'd pre-activations kept as flattened entries: a ``TopKOut`` whose ``vals``, ``idx`` and ``rows``
    are [k*B]."""
    out = _fused_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, apply_b_dec_to_input, True, aux_relu,
                         W_enc_lowp, W_dec_lowp, ops, batch=True)
    return TopKOut(*out[:-1])._replace(rows=out[-1])


def _fused_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, apply_b_dec_to_input, deterministic, aux_relu,
                   W_enc_lowp, W_dec_lowp, ops, batch: bool) -> tuple:
    """Both fused forwards' checks and call: ``_topk_fn``'s outputs (``batch``: k per row, times the batch, kept
    over the whole batch)."""
    ops = resolve_ops(ops)
    B, D = x.shape
    F = W_dec.shape[0]
    if not 1 <= k <= F:
        raise ValueError(f"k = {k} is invalid: expected 1 <= k <= d_sae ({F}).")
    if W_enc.shape != (D, F) or W_dec.shape != (F, D):
        raise ValueError(f"Expected W_enc [{D},{F}] and W_dec [{F},{D}]; got {W_enc.shape} and {W_dec.shape}.")
    ka = 0 if (dead is None or not k_aux) else min(int(k_aux), F)
    d = mx.zeros((F,), mx.float32) if dead is None else dead.astype(mx.float32)
    fn = _topk_fn(ops, int(k) * (B if batch else 1), ka, bool(apply_b_dec_to_input), bool(deterministic),
                  bool(aux_relu), batch)
    wl = W_enc_lowp if (W_enc_lowp is not None and ops.matmul_dtype is not None) else mx.zeros((0,), mx.bfloat16)
    wdl = W_dec_lowp if (W_dec_lowp is not None and ops.decoder_dtype is not None) else mx.zeros((0,), mx.bfloat16)
    for name, copy, of, dt in (("W_enc_lowp", wl, W_enc, ops.matmul_dtype), ("W_dec_lowp", wdl, W_dec,
                                                                            ops.decoder_dtype)):
        if copy.size and (copy.shape != of.shape or copy.dtype != dt):
            raise ValueError(f"{name} has shape {copy.shape} and dtype {copy.dtype}; expected {of.shape} in {dt} (a "
                             f"copy of the parameter in the back end's low precision), or None.")
    return fn(x, W_enc, b_enc, W_dec, b_dec, d, wl, wdl)


def topk_sae_loss(x, W_enc, b_enc, W_dec, b_dec, k: int, dead=None, k_aux=None, aux_coef: float = 1.0, *,
                  W_enc_lowp=None, W_dec_lowp=None, ops=None):
    """sparsify-style FVU loss (+ AuxK, scaled by min(n_dead/k_aux, 1)) with the fused forward.

    Returns (loss, (fvu, aux, out)). Used by the benchmark and the device test.
    """
    out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, W_enc_lowp=W_enc_lowp,
                           W_dec_lowp=W_dec_lowp, ops=ops)
    tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
    e = x - out.x_hat
    fvu = mx.sum(mx.square(e)) / tv
    aux = mx.array(0.0)
    if out.e_hat is not None:
        n_dead = mx.sum(dead.astype(mx.float32))
        scale = mx.minimum(n_dead / k_aux, 1.0)
        aux = scale * mx.sum(mx.square(out.e_hat - mx.stop_gradient(e))) / tv
    return fvu + aux_coef * aux, (fvu, aux, out)


# ---------------------------------------------------------------------------------------------------
# BatchTopK threshold by radix select
# ---------------------------------------------------------------------------------------------------


def batchtopk_threshold(pre: mx.array, k: int, ops=None) -> mx.array:
    """The (k*B)-th largest entry of relu(pre) over the whole batch [B,F] (a float32 scalar): exact, no
    sort (``ops.batch_kth_largest``: a radix select on GPU back ends, a two-stage partition on the CPU)."""
    ops = resolve_ops(ops)
    B, F = pre.shape
    return ops.batch_kth_largest(mx.stop_gradient(pre), min(int(k * B), B * F))


def batchtopk_mask(acts: mx.array, k: int, ops=None) -> tuple[mx.array, mx.array]:
    """``reference.batchtopk_mask`` with the radix-select threshold: (kept [B,F], cut)."""
    cut = batchtopk_threshold(acts, k, ops)
    return mx.where(acts >= cut, acts, 0), cut


# ---------------------------------------------------------------------------------------------------
# the fused optimizer pass
# ---------------------------------------------------------------------------------------------------


def fused_adam_renorm(W_dec, g, m, v, *, lr, step, betas=(0.9, 0.999), eps=1e-8, remove_parallel=True,
                      renorm=True, renorm_eps=1e-8, lowp_copy=False, ops=None):
    """One pass over the decoder rows: g -= (g.w)w; Adam (MLX formula, bias correction, 1-based
    ``step``); w /= |w| + renorm_eps. Returns (W_dec, m, v), plus the copy of the new W_dec that decode reads
    (``ops.decoder_dtype``, for ``topk_sae_forward(W_dec_lowp=...)``) when ``lowp_copy`` and the back end has one.
    Matches the trainer's three separate steps."""
    ops = resolve_ops(ops)
    hp = adam_hparams(lr, betas[0], betas[1], eps, step)
    dt = ops.decoder_dtype if lowp_copy else None
    return ops.adam_rows(W_dec, g, m, v, hp, bool(remove_parallel), bool(renorm), float(renorm_eps), dt)


def adam(p, g, m, v, *, lr, step, betas=(0.9, 0.999), eps=1e-8, lowp_copy=False, ops=None):
    """Plain fused Adam (MLX formula, bias correction): returns (p, m, v), plus the back end's
    low-precision copy of the new p (for ``topk_sae_forward(W_enc_lowp=...)``) when ``lowp_copy``."""
    ops = resolve_ops(ops)
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
    if ops is REFERENCE_OPS:
        return R.topk_select(pre, k)
    return _select_fn(ops, int(k))(pre)


def sparse_decode(values, indices, W_dec, b_dec=None):
    """``reference.sparse_decode`` through the fused decode (gradients via the sparse VJP)."""
    ops = get_ops()
    if ops is REFERENCE_OPS:
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

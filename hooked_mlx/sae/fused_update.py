"""The trainer's parameter update in the fused ops' passes: decoder parallel-gradient removal, global
gradient-norm clipping, Adam (MLX's formula with bias correction) and decoder renormalisation.

The clip needs no pass of its own: scaling the gradient by s before Adam is the same as scaling Adam's
(1 - b1) by s and (1 - b2) by s^2, so the clip scale folds into the hyper-parameter vector of the fused
Adam passes (``kernels.fused.adam_hparams``). Where the back end projects the decoder gradient inside its
decoder pass (``ops.fused_optimizer``: the GPU kernels, where the trainer uses this update), the norm of the projected gradient comes from
row sums, without materialising it: |g - (g.w)w|^2 = |g|^2 - (g.w)^2 (2 - |w|^2). Elsewhere (the CPU,
where every reduction is a separate pass) the projection is done once before the norm.

It updates the same optimizer state as ``mlx.optimizers.Adam`` (``state[name]["m" | "v"]``, ``step``,
``learning_rate``), so checkpoints and ``reference`` runs are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .kernels import fused as FU


def grad_norm(grads: dict[str, mx.array], W_dec: mx.array, project_decoder: bool, ops=None) -> mx.array:
    """The global L2 norm of ``grads`` with the decoder gradient projected off the decoder rows
    (``ops.sq_norm``: one read of each gradient, no temporaries on the GPU back ends)."""
    ops = ops if ops is not None else FU.ReferenceOps()
    total = mx.array(0.0, dtype=mx.float32)
    for name, g in grads.items():
        total = total + ops.sq_norm(g, W_dec if name == "W_dec" and project_decoder else None)
    return mx.sqrt(mx.maximum(total, 0.0))


def update_hparams(params: dict[str, mx.array], grads: dict[str, mx.array], opt_state: dict, lr_fn: Callable, *,
                  betas: tuple[float, float], eps: float, clip: float, unit_norm: bool, ops,
                  ok: mx.array | None = None) -> tuple[dict[str, mx.array], mx.array, mx.array, mx.array, mx.array]:
    """The first half of ``fused_adam_update``: (grads (the decoder's projected where the back end does not
    project in its pass), hp, gradient norm, lr, applied). Advances ``opt_state["step"]`` and its
    ``learning_rate`` (only when applied)."""
    in_pass = unit_norm and ops.fused_optimizer
    if unit_norm and not in_pass:  # project once here; the norm below is then a plain sum of squares
        W, g = params["W_dec"], grads["W_dec"]
        grads = {**grads, "W_dec": g - mx.sum(g * W, axis=-1, keepdims=True) * W}
    gnorm = grad_norm(grads, params["W_dec"], in_pass, ops)
    applied = mx.isfinite(gnorm) if ok is None else ok & mx.isfinite(gnorm)
    scale = mx.minimum(clip / (gnorm + 1e-6), 1.0) if clip > 0 else mx.array(1.0, dtype=mx.float32)
    scale = mx.where(applied, scale, 0.0)
    step = opt_state["step"]
    lr = lr_fn(step).astype(mx.float32)
    t = step + 1
    hp = FU.adam_hparams(lr, betas[0], betas[1], eps, t, grad_scale=scale, apply=applied)
    opt_state["step"] = mx.where(applied, t, step)
    opt_state["learning_rate"] = mx.where(applied, lr, opt_state["learning_rate"])
    return grads, hp, gnorm, lr, applied


def adam_pass(name: str, param: mx.array, grad: mx.array, opt_state: dict, hp: mx.array, *, unit_norm: bool,
              ops, lowp: dict[str, mx.array] | None = None) -> mx.array:
    """The second half, for one parameter: its fused Adam pass (the decoder's with projection and renorm),
    ``opt_state[name]`` updated in place; returns the new parameter. ``lowp`` (name -> the parameter's
    low-precision copy that the fused forward reads): a parameter named there gets its new copy written in the
    same pass, into ``lowp`` in place."""
    st = opt_state[name]
    dt = lowp[name].dtype if lowp is not None and name in lowp else None
    if name == "W_dec":
        out = ops.adam_rows(param, grad, st["m"], st["v"], hp, unit_norm and ops.fused_optimizer, unit_norm, 1e-8,
                            dt)
    else:
        out = ops.adam(param, grad, st["m"], st["v"], hp, dt)
    p, st["m"], st["v"] = out[:3]
    if dt is not None and lowp is not None:
        lowp[name] = out[3]
    return p


def adam_passes(params: dict[str, mx.array], grads: dict[str, mx.array], opt_state: dict, hp: mx.array, *,
                unit_norm: bool, ops, lowp: dict[str, mx.array] | None = None) -> dict[str, mx.array]:
    """``adam_pass`` for every parameter that has a gradient: the new parameters."""
    return {name: adam_pass(name, params[name], g, opt_state, hp, unit_norm=unit_norm, ops=ops, lowp=lowp)
            for name, g in grads.items()}


def fused_adam_update(params: dict[str, mx.array], grads: dict[str, mx.array], opt_state: dict,
                      lr_fn: Callable, *, betas: tuple[float, float], eps: float, clip: float, unit_norm: bool,
                      ops, ok: mx.array | None = None) -> tuple[dict[str, mx.array], mx.array, mx.array, mx.array]:
    """One update. Returns (new params, gradient norm before clipping, lr used, applied) and updates
    ``opt_state`` in place (its containers stay the same objects: a compiled step captures them).

    ``ok`` (bool array): False skips the update. It is also skipped when the gradient norm is not finite;
    ``applied`` says whether it ran. A skipped update is a no-op inside the Adam passes themselves
    (``adam_hparams(apply=...)``): parameters, m, v and the step count stay exactly as they were, with no
    copy of the old state and no extra pass over it.

    ``opt_state`` is ``mlx.optimizers.Adam``'s state dict; ``lr_fn(step)`` its learning-rate schedule.
    ``unit_norm``: remove the decoder gradient's component along each decoder row and renormalise the rows
    after the update (``W / (|W| + 1e-8)``). ``clip`` > 0: global gradient-norm clipping at ``clip``.
    It is ``update_hparams`` followed by ``adam_pass`` for every parameter (the trainer runs the two halves
    apart when it orders the passes for memory)."""
    grads, hp, gnorm, lr, applied = update_hparams(params, grads, opt_state, lr_fn, betas=betas, eps=eps, clip=clip,
                                                   unit_norm=unit_norm, ops=ops, ok=ok)
    new_params = adam_passes(params, grads, opt_state, hp, unit_norm=unit_norm, ops=ops)
    return new_params, gnorm, lr, applied

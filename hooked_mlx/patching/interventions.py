"""Hook factories for interventions: ablations, scaling, steering, clamping, noise, replacement.

Each factory returns a hook ``fn(act, hook) -> act`` for ``run_with_hooks`` / ``model.hooks``; ``compose``
chains several. Where a factory takes ``pos`` / ``head`` / ``index``, only those entries change:

* ``pos``: an int, a list of ints, or a slice over the position axis (query positions for patterns);
* ``head``: an int or list over the head axis (``hook_q/k/v/z/result``: axis 2; patterns/scores: axis 1);
* ``index``: a raw index tuple over the axes after the batch axis (overrides pos/head).

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", zero_ablate(head=3)),
                                            ("blocks.4.hook_resid_pre", add_vector(v, coeff=4.0))])

Norm diagnostics (``record_norms``, ``activation_norm``) compute in float32 (no fp16 overflow to inf).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..names import hook_spec
from .align import align_positions, check_align, length_error, position_map

Hook = Callable[[mx.array, object], mx.array]


def _axes(name: str | None, ndim: int) -> tuple[int | None, int | None]:
    """(position axis, head axis) of an activation with its batch axis (``names.hook_spec``); an unnamed
    hook is read as [batch, pos, ...]."""
    if not name:
        return 1, None
    spec = hook_spec(name, ndim)
    return spec.pos_axis, spec.head_axis


def _as_sel(v, n: int, what: str, where: str):
    """Indices into an axis of length n; out-of-range ints raise (they never wrap)."""
    if v is None:
        return None
    if isinstance(v, slice):
        return np.arange(n)[v]
    a = np.atleast_1d(np.array(v))
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}: {what}= must be an int, a list of ints or a slice; got {v!r}.")
    bad = a[(a < -n) | (a >= n)]
    if bad.size:
        raise ValueError(f"{where}: {what} {bad.tolist()[0]} is out of range: the activation has {n} {what}s "
                         f"(allowed {-n}..{n - 1}). Pass a {what} index within that range.")
    return a % n


def selection_mask(act: mx.array, hook_name: str | None, pos=None, head=None, index=None,
                   who: str = "intervention") -> mx.array | None:
    """Bool mask broadcastable to ``act``: True where the intervention applies (None = everywhere)."""
    where = f"{who} at {hook_name or 'the hook'} (activation {tuple(act.shape)})"
    if index is not None:
        m = np.zeros(act.shape[1:], dtype=bool)
        try:
            m[tuple(index)] = True
        except (IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: index={index!r} does not index the axes after the batch "
                             f"{tuple(act.shape[1:])}: {e}.") from None
        return mx.array(m)[None]
    if pos is None and head is None:
        return None
    pa, ha = _axes(hook_name, act.ndim)
    m = np.ones([1] * act.ndim, dtype=np.bool_)
    if pos is not None and pa is None:
        raise ValueError(f"{where}: pos= selects positions, but {hook_name!r} has no position axis of its own "
                         f"(axes {hook_spec(hook_name, act.ndim).axes}). Use index= on its axes, or a hook with "
                         f"positions.")
    if pos is not None:
        assert pa is not None
        shape = [1] * act.ndim
        shape[pa] = act.shape[pa]
        ind = np.zeros(act.shape[pa], dtype=np.bool_)
        ind[_as_sel(pos, act.shape[pa], "position", where)] = True
        m = m & ind.reshape(shape)
    if head is not None:
        if ha is None:
            raise ValueError(f"{where}: head= selects attention heads, but {hook_name!r} has no head axis. Use a "
                             f"per-head hook such as blocks.L.attn.hook_z, or drop head=.")
        shape = [1] * act.ndim
        shape[ha] = act.shape[ha]
        ind = np.zeros(act.shape[ha], dtype=np.bool_)
        ind[_as_sel(head, act.shape[ha], "head", where)] = True
        m = m & ind.reshape(shape)
    return mx.array(m)


def _fits(value: mx.array, act: mx.array, hp, who: str, what: str) -> None:
    """``value`` must broadcast to the activation's shape."""
    try:
        ok = np.broadcast_shapes(tuple(value.shape), tuple(act.shape)) == tuple(act.shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{who} at {getattr(hp, 'name', None) or 'the hook'}: the {what} has shape "
                         f"{tuple(value.shape)}, which does not broadcast to the activation {tuple(act.shape)}. "
                         f"Expected e.g. [{act.shape[-1]}] (the last axis) or a shape broadcastable to it.")


def _apply(act, new, hook, pos, head, index, who: str = "intervention"):
    m = selection_mask(act, getattr(hook, "name", None), pos, head, index, who)
    new = new.astype(act.dtype)
    return mx.broadcast_to(new, act.shape) if m is None else mx.where(m, new, act)


def zero_ablate(pos=None, head=None, index=None) -> Hook:
    """Set the selected entries to 0."""
    def hook(act, hp):
        return _apply(act, mx.zeros_like(act), hp, pos, head, index, "zero_ablate")

    return hook


def mean_ablate(mean: mx.array | None = None, pos=None, head=None, index=None, over: Sequence[int] = (0,)) -> Hook:
    """Replace the selected entries by ``mean`` (broadcastable to the activation; e.g. the mean over a
    reference dataset), or by the activation's own mean over the axes ``over`` (default: the batch)."""
    def hook(act, hp):
        if mean is not None:
            m = mx.array(mean)
            _fits(m, act, hp, "mean_ablate", "mean")
        else:
            m = act.astype(mx.float32).mean(axis=tuple(over), keepdims=True)
        return _apply(act, mx.broadcast_to(m.astype(act.dtype), act.shape), hp, pos, head, index, "mean_ablate")

    return hook


def scale(factor: float, pos=None, head=None, index=None) -> Hook:
    """Multiply the selected entries by ``factor``."""
    def hook(act, hp):
        return _apply(act, act * factor, hp, pos, head, index, "scale")

    return hook


def add_vector(vector: mx.array, coeff: float = 1.0, pos=None, head=None, index=None) -> Hook:
    """Steering: add ``coeff * vector`` (broadcastable, e.g. [d_model]) to the selected entries."""
    vector = mx.array(vector)

    def hook(act, hp):
        _fits(vector, act, hp, "add_vector", "vector")
        return _apply(act, act + coeff * vector.astype(act.dtype), hp, pos, head, index, "add_vector")

    return hook


def clamp(min: float | None = None, max: float | None = None, pos=None, head=None, index=None) -> Hook:
    """Clip the selected entries to [min, max] (either bound may be None)."""
    if min is None and max is None:
        raise ValueError("clamp needs min=, max= or both.")

    def hook(act, hp):
        return _apply(act, mx.clip(act, min, max), hp, pos, head, index, "clamp")

    return hook


def noise(std: float, seed: int = 0, pos=None, head=None, index=None) -> Hook:
    """Add Gaussian noise N(0, std^2) to the selected entries. Seeded: the same seed gives the same noise
    (each call of the hook draws from ``mx.random.key(seed)``, so repeated runs are reproducible)."""
    def hook(act, hp):
        eps = mx.random.normal(act.shape, dtype=mx.float32, key=mx.random.key(seed)) * std
        return _apply(act, act + eps.astype(act.dtype), hp, pos, head, index, "noise")

    return hook


def replace_with(values: mx.array, align: str | None = None, pos=None, head=None, index=None,
                 tokens: tuple | None = None) -> Hook:
    """Replace the selected entries with ``values`` (e.g. the same hook's activation from another run).

    values: the activation's shape (batch 1 broadcasts). If its position axis differs in length from the
    activation's, ``align`` must be "end" or "start" (positions without a counterpart keep their value);
    by default this raises the sequence-length policy's ValueError. ``tokens=(source, target)`` token ids
    make that error show both token lists."""
    check_align(align)
    values = mx.array(values)

    def hook(act, hp):
        v = values
        if v.ndim != act.ndim:
            raise ValueError(f"replace_with: values have shape {tuple(v.shape)}, the activation "
                             f"{tuple(act.shape)} ({getattr(hp, 'name', '?')}).")
        pa, _ = _axes(getattr(hp, "name", None), act.ndim)
        Pv, Pa = (v.shape[pa], act.shape[pa]) if pa is not None else (None, None)
        if pa is not None and (Pv != Pa or align == "end"):
            if Pv != Pa and align is None:
                src, dst = tokens if tokens is not None else (None, None)
                raise length_error(None, Pv, Pa, src, dst, what=f"replace {getattr(hp, 'name', 'the activation')}")
            if v.shape[0] != act.shape[0]:
                v = mx.broadcast_to(v, (act.shape[0],) + v.shape[1:])
            v = align_positions(v, Pa, pa, position_map(Pv, Pa, align), fill=act)
            if pos is None and head is None and index is None:
                return v.astype(act.dtype)
        _fits(v, act, hp, "replace_with", "values")
        return _apply(act, mx.broadcast_to(v.astype(act.dtype), act.shape), hp, pos, head, index, "replace_with")

    return hook


def compose(*hooks: Hook) -> Hook:
    """One hook applying ``hooks`` in order (each sees the previous one's output; None keeps the value)."""
    def hook(act, hp):
        for h in hooks:
            out = h(act, hp)
            if out is not None:
                act = out
        return act

    return hook


def activation_norm(act: mx.array, axis: int = -1) -> mx.array:
    """L2 norm over ``axis`` computed in float32 (an fp16 activation's squares overflow fp16)."""
    return mx.sqrt(mx.sum(mx.square(act.astype(mx.float32)), axis=axis))


def record_norms(store: dict, axis: int = -1) -> Hook:
    """A diagnostic hook: stores ``activation_norm(act)`` (float32) under the hook's name; changes nothing."""
    def hook(act, hp):
        store[getattr(hp, "name", "act")] = activation_norm(act, axis)
        return None

    return hook

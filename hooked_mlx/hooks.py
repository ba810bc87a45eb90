"""``HookPoint`` and ``HookedRootModule``: named points where activations can be read or replaced.

A hook is ``fn(act, hook) -> act | None``. Returning an array replaces the activation (same shape and
dtype, else an error names the hook, what it got and what it expected); returning None keeps it.
``hook`` is the ``HookPoint``: ``hook.name``, ``hook.layer()``, ``hook.ctx`` (a dict kept between calls
until ``reset_hooks``).

MLX has no backward hooks on modules: gradients of activations are computed functionally, by
``HookedTransformer.run_with_cache(..., incl_bwd=True)`` and ``run_with_hooks(..., bwd_hooks=[...])``
(which runs the backward pass inside the call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from .names import hook_order, unknown_name_error

if TYPE_CHECKING:
    from .cache import ActivationCache

HookFn = Callable[[mx.array, "HookPoint"], mx.array | None]
NameOrFilter = str | Callable[[str], bool]


class HookPoint(nn.Module):
    """An identity module that calls the hooks attached to it.

    When no hook is attached the call is a plain ``return x``: hooks cost nothing when unused.
    """

    def __init__(self):
        super().__init__()
        # Kept outside the Module dict so that parameters()/tree utilities never see them.
        object.__setattr__(self, "name", None)
        object.__setattr__(self, "_hooks", [])  # list of (fn, level, is_permanent)
        object.__setattr__(self, "ctx", {})

    @property
    def has_hooks(self) -> bool:
        return bool(self._hooks)

    def add_hook(self, fn: HookFn, level: int = 0, is_permanent: bool = False, prepend: bool = False):
        entry = (fn, level, is_permanent)
        if prepend:
            self._hooks.insert(0, entry)
        else:
            self._hooks.append(entry)

    def remove_hooks(self, including_permanent: bool = False, level: int | None = None):
        keep = []
        for fn, lvl, perm in self._hooks:
            if perm and not including_permanent:
                keep.append((fn, lvl, perm))
            elif level is not None and lvl != level:
                keep.append((fn, lvl, perm))
        object.__setattr__(self, "_hooks", keep)

    def clear_context(self):
        self.ctx.clear()

    def layer(self) -> int:
        """The block index of this hook (``blocks.3.attn.hook_q`` -> 3)."""
        parts = (self.name or "").split(".")
        if len(parts) < 2 or parts[0] != "blocks":
            raise ValueError(f"Hook {self.name!r} is not inside a block, so it has no layer index.")
        return int(parts[1])

    def __call__(self, x: mx.array) -> mx.array:
        if not self._hooks:
            return x
        for fn, _, _ in list(self._hooks):
            out = fn(x, self)
            if out is None:
                continue
            if not isinstance(out, mx.array):
                raise TypeError(
                    f"Hook {getattr(fn, '__name__', fn)!r} on {self.name!r} returned {type(out).__name__}; "
                    f"a hook must return an mx.array of shape {tuple(x.shape)} and dtype {x.dtype}, or None."
                )
            if tuple(out.shape) != tuple(x.shape):
                raise ValueError(
                    f"Hook {getattr(fn, '__name__', fn)!r} on {self.name!r} returned shape {tuple(out.shape)}; "
                    f"expected {tuple(x.shape)} (the activation's own shape). Return an array of the same "
                    f"shape, or None to keep the activation."
                )
            if out.dtype != x.dtype:
                raise ValueError(
                    f"Hook {getattr(fn, '__name__', fn)!r} on {self.name!r} returned dtype {out.dtype}; "
                    f"expected {x.dtype}. Cast with `.astype({x.dtype})`."
                )
            x = out
        return x

    def __repr__(self):
        return f"HookPoint({self.name!r}, hooks={len(self._hooks)})"


class HookedRootModule(nn.Module):
    """Root module that names its ``HookPoint``s and manages hooks by name or filter."""

    def setup(self):
        """Name every HookPoint after its module path and build ``hook_dict`` / ``mod_dict``."""
        object.__setattr__(self, "mod_dict", {})
        object.__setattr__(self, "hook_dict", {})
        object.__setattr__(self, "_context_level", 0)
        for name, module in self.named_modules():
            if name == "":
                continue
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                object.__setattr__(module, "name", name)
                self.hook_dict[name] = module
        self._sort_hook_dict()

    def _sort_hook_dict(self) -> None:
        """``hook_dict`` in forward order (``names.hook_order``; named_modules is not in forward order)."""
        object.__setattr__(self, "hook_dict", dict(sorted(self.hook_dict.items(), key=lambda kv: hook_order(kv[0]))))

    # -- resolving names -------------------------------------------------------------------------
    def opt_in_hooks_off(self) -> frozenset[str]:
        """Hooks that exist but that a filter function or "every hook" (``names_filter=None``) leaves out until
        switched on (TransformerLens's ``set_use_attn_result``); named explicitly, they always fire. None here."""
        return frozenset()

    def resolve_hook_names(self, name_or_filter: NameOrFilter) -> list[str]:
        """Names that ``name_or_filter`` selects. A string must be a valid name (TL shorthands allowed); a filter
        function skips ``opt_in_hooks_off()``."""
        if isinstance(name_or_filter, str):
            from .names import get_act_name

            name = name_or_filter if name_or_filter in self.hook_dict else get_act_name(name_or_filter)
            if name not in self.hook_dict:
                raise unknown_name_error(name_or_filter, self.hook_dict.keys())
            return [name]
        if callable(name_or_filter):
            off = self.opt_in_hooks_off()
            return [n for n in self.hook_dict if name_or_filter(n) and n not in off]
        if isinstance(name_or_filter, (list, tuple, set)):
            out: list[str] = []
            for item in name_or_filter:
                out += [n for n in self.resolve_hook_names(item) if n not in out]
            return out
        raise TypeError(
            f"A hook is selected by a name (str), a list of names, or a filter fn(name) -> bool; "
            f"got {type(name_or_filter).__name__}."
        )

    # -- adding and removing -----------------------------------------------------------------------
    def add_hook(
        self,
        name: NameOrFilter,
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        if dir != "fwd":
            raise ValueError(
                f"dir={dir!r}: MLX has no .backward() to attach a backward hook to. Pass the hook to "
                f"run_with_hooks(..., bwd_hooks=[(name, fn)], metric=...), which runs the backward pass in the "
                f"call, or use run_with_cache(..., incl_bwd=True) for activation gradients."
            )
        if not callable(hook):
            raise TypeError(f"The hook for {name!r} must be callable fn(act, hook), got {type(hook).__name__}.")
        for n in self.resolve_hook_names(name):
            self.hook_dict[n].add_hook(hook, level=self._context_level if level is None else level,
                                       is_permanent=is_permanent, prepend=prepend)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks(including_permanent=including_permanent, level=level)
            if clear_contexts:
                hp.clear_context()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False):
        """Context manager: the hooks are active inside and removed on exit (only this context's hooks)."""
        if list(bwd_hooks):
            raise ValueError("bwd_hooks need a backward pass, which MLX runs only inside a call: use "
                             "model.run_with_hooks(..., bwd_hooks=[(name, fn)], metric=...), or "
                             "run_with_cache(..., incl_bwd=True) for activation gradients.")
        object.__setattr__(self, "_context_level", self._context_level + 1)
        level = self._context_level
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn, level=level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts=clear_contexts, level=level)
            object.__setattr__(self, "_context_level", level - 1)

    # -- running with hooks and caches (``HookedTransformer`` adds padding masks to its cache) ------------
    def run_with_cache(self, *args, names_filter=None, incl_bwd: bool = False,
                       metric: Callable[[Any], mx.array] | None = None, remove_batch_dim: bool = False,
                       **kwargs) -> tuple[Any, ActivationCache]:
        """Call the module, returning ``(output, ActivationCache)`` (output: what the module returns; for
        ``HookedTransformer`` ``shapes.Logits`` by default, see its ``forward``).

        names_filter: None (every hook), a name, a list of names, or fn(name) -> bool.
        incl_bwd: also store d metric / d activation under ``NAME_grad``. ``metric(output)`` must return a
        scalar; by default the output itself must be a scalar (``return_type="loss"``). MLX has no backward
        hooks: the gradients are computed functionally, by adding a zero perturbation at every cached hook
        and differentiating the metric with respect to the perturbations.

        ``HookedTransformer``, padded batches: the cache's ``attention_mask`` [B,P] (True = real token; None
        when nothing is padded) says which positions are real. Cached values at pad positions are neutral so
        that reductions over positions need no mask: 0 for activations and patterns, -inf for attention
        scores (like causal masking), 1 for norm scales.
        """
        from .cache import ActivationCache

        names = self.resolve_hook_names(names_filter if names_filter is not None else (lambda n: True))
        out, store = self._forward_storing(names, args, kwargs)
        mx.eval(out, store)
        if incl_bwd:
            for n, g in self._activation_grads(store, metric, args, kwargs).items():
                store[n + "_grad"] = g
            mx.eval(store)
        store, mask = self._finish_cache(store, args, kwargs)
        cache = ActivationCache(store, self, attention_mask=mask)
        if remove_batch_dim:
            cache.remove_batch_dim()
        return out, cache

    def _forward_storing(self, names: list[str], args, kwargs) -> tuple[Any, dict[str, mx.array]]:
        """(the module's output, {name: activation}) of one call with a storing hook on each of ``names``
        (lazy). Models may run it compiled."""
        store: dict[str, mx.array] = {}
        with self.hooks([(n, lambda act, hook: store.__setitem__(hook.name, act)) for n in names]):
            out = self(*args, **kwargs)
        return out, store

    def _finish_cache(self, store: dict[str, mx.array], args, kwargs) -> tuple[dict[str, mx.array], Any]:
        """(the cached values, the padding mask) of a run: here as they are, with no mask; models with padded
        batches override this."""
        return store, None

    def run_with_hooks(self, *args, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False,
                       metric: Callable[[Any], mx.array] | None = None, **kwargs):
        """Forward with ``fwd_hooks = [(name or filter, fn), ...]`` active for this call only.

        ``bwd_hooks = [(name or filter, fn), ...]``: MLX has no ``.backward()``, so the backward pass runs
        here, right after the forward: ``fn(grad, hook)`` is called with d metric / d activation at each named
        hook (the gradient of the hook's output, as TransformerLens's backward hooks receive), from the last
        hook to the first; returning an array replaces the gradient that flows on upstream, None keeps it.
        The metric is ``metric(output)`` (a scalar), or the output itself when it is a scalar
        (``return_type="loss"``). Returns the forward's output, as without ``bwd_hooks``."""
        bwd = list(bwd_hooks)
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            if not bwd:
                return self(*args, **kwargs)
            return self._run_backward_hooks(bwd, metric, args, kwargs)

    def _run_backward_hooks(self, bwd_hooks: list, metric, args, kwargs):
        """The forward with an identity at every backward-hooked point whose VJP calls the hooks, then the
        metric's gradient through all of them (with respect to zero perturbations at those points)."""
        by_name: dict[str, list] = {}
        for name, fn in bwd_hooks:
            if not callable(fn):
                raise TypeError(f"The backward hook for {name!r} must be callable fn(grad, hook), got "
                                f"{type(fn).__name__}.")
            for n in self.resolve_hook_names(name):
                by_name.setdefault(n, []).append(fn)
        outputs: list = []

        def grad_identity(hook, fns):
            @mx.custom_function
            def ident(a):
                return a

            @ident.vjp
            def ident_vjp(primals, cotangent, output):
                g = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
                for fn in fns:
                    new = fn(g, hook)
                    if new is not None:
                        if not isinstance(new, mx.array) or tuple(new.shape) != tuple(g.shape):
                            raise ValueError(
                                f"Backward hook {getattr(fn, '__name__', fn)!r} on {hook.name!r} returned "
                                f"{tuple(new.shape) if isinstance(new, mx.array) else type(new).__name__}; "
                                f"expected an mx.array of shape {tuple(g.shape)} (the gradient's), or None.")
                        g = new.astype(g.dtype)
                return (g,)

            return ident

        def f(deltas):
            # a scalar zero added at each hooked point gives the backward pass a way through every one of them
            def through(act, hook, fns):
                return grad_identity(hook, fns)(act + deltas[hook.name].astype(act.dtype))

            hooks = [(n, lambda act, hook, fns=fns: through(act, hook, fns)) for n, fns in by_name.items()]
            with self.hooks(hooks):
                out = self(*args, **kwargs)
            outputs.append(out)
            return _scalar(metric(out) if metric is not None else (out[1] if isinstance(out, tuple) else out),
                           "bwd_hooks need")

        grads = mx.grad(f)({n: mx.array(0.0) for n in by_name})
        mx.eval(grads, outputs[-1])
        return outputs[-1]

    def _activation_grads(self, acts: dict, metric, args, kwargs) -> dict[str, mx.array]:
        names = list(acts)

        def f(deltas):
            def add(act, hook):
                return act + deltas[hook.name]

            with self.hooks([(n, add) for n in names]):
                out = self(*args, **kwargs)
            return _scalar(metric(out) if metric is not None else out, "incl_bwd=True needs")

        deltas = {n: mx.zeros_like(a) for n, a in acts.items()}
        return mx.grad(f)(deltas)

    @property
    def has_any_hooks(self) -> bool:
        return any(hp.has_hooks for hp in self.hook_dict.values())

    def active_hook_names(self) -> list[str]:
        return [n for n, hp in self.hook_dict.items() if hp.has_hooks]


def _scalar(value, who: str) -> mx.array:
    """``value`` as a 0-d array to differentiate, or the error saying how to get one."""
    if not isinstance(value, mx.array) or value.size != 1:
        raise ValueError(
            f"{who} a scalar to differentiate: pass metric=fn(output) -> scalar, or return_type='loss'. Got "
            + (f"shape {tuple(value.shape)}" if isinstance(value, mx.array) else type(value).__name__) + ".")
    return value.reshape(())

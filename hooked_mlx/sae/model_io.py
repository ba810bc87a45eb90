"""The model side of activation sources: hook checks, the earliest ``stop_at_layer`` that computes every
hook, and one forward's activations at the hooks."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..names import hook_spec


def validate_hooks(model, hook_names: list[str]) -> None:
    valid = model.hook_dict
    for h in hook_names:
        if h not in valid:
            from ..names import unknown_name_error

            raise unknown_name_error(h, list(valid))


def stop_layer_for(model, hook_names: list[str]) -> int | None:
    """The smallest ``stop_at_layer`` that still computes every hook (None: run the whole model)."""
    layers = []
    for h in hook_names:
        layer = hook_spec(h).layer
        if layer is not None:
            layers.append(layer)
        elif h in ("hook_embed", "hook_pos_embed"):
            layers.append(-1)
        else:
            return None
    top = max(layers) + 1
    return max(top, 1) if top < model.cfg.n_layers else None


def hook_activations(model, tokens: mx.array, hook_names: list[str], stop_at_layer: int | None):
    """{hook: [B,P,d]} from one forward of ``tokens`` [B,P]."""
    kw: dict[str, Any] = {"names_filter": list(hook_names)}
    if stop_at_layer is not None:
        kw["stop_at_layer"] = stop_at_layer
    _, cache = model.run_with_cache(tokens, **kw)
    return {h: cache[h] for h in hook_names}

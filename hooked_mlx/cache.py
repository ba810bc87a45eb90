"""``ActivationCache``: the activations of one run, by hook name, with TransformerLens's shorthands."""

from __future__ import annotations

from typing import Any, Iterator

import mlx.core as mx
import numpy as np

from .names import get_act_name, unknown_name_error


class ActivationCache:
    """Dict-like {hook name: activation}.

    Keys: full names (``"blocks.0.attn.hook_pattern"``), TL shorthands (``"pattern0"``, ``"embed"``) and
    tuples ``(name, layer[, layer_type])`` with negative layers counted from the end:
    ``cache["pattern", -1]``, ``cache["scale", 2, "ln1"]``. Gradients from ``incl_bwd=True`` are stored
    under ``NAME_grad``.
    """

    def __init__(self, cache_dict: dict[str, mx.array], model: Any = None, has_batch_dim: bool = True):
        self.cache_dict = dict(cache_dict)
        self.model = model
        self.has_batch_dim = has_batch_dim

    # -- lookup ------------------------------------------------------------------------------------
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            name, *rest = key
            layer = rest[0] if rest else None
            layer_type = rest[1] if len(rest) > 1 else None
            if layer is not None and layer < 0:
                n_layers = self.model.cfg.n_layers if self.model is not None else None
                if n_layers is None:
                    raise ValueError("Negative layer indices need the cache's model (to know n_layers).")
                layer += n_layers
            grad = name.endswith("_grad")
            base = name[: -len("_grad")] if grad else name
            full = get_act_name(base, layer, layer_type)
            return full + "_grad" if grad else full
        if key in self.cache_dict:
            return key
        grad = key.endswith("_grad")
        base = key[: -len("_grad")] if grad else key
        full = get_act_name(base)
        return full + "_grad" if grad else full

    def __getitem__(self, key) -> mx.array:
        name = self._key(key)
        if name not in self.cache_dict:
            valid = list(self.cache_dict)
            if self.model is not None and name.removesuffix("_grad") in self.model.hook_dict:
                raise KeyError(
                    f"{name!r} is a valid hook but was not cached in this run (names_filter excluded it, "
                    f"stop_at_layer stopped before it, or incl_bwd was off for a _grad key). Cached: "
                    f"{len(valid)} names, e.g. {valid[:3]}."
                )
            raise KeyError(str(unknown_name_error(str(key), valid, what="cache key")))
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except (ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self.cache_dict)[:4]}{'...' if len(self) > 4 else ''})"

    # -- conversions -------------------------------------------------------------------------------
    def remove_batch_dim(self) -> "ActivationCache":
        """Drop a batch dimension of size 1 (in place, like TL); errors if the batch is larger."""
        if not self.has_batch_dim:
            return self
        for name, act in self.cache_dict.items():
            if act.shape[0] != 1 and not name.endswith("hook_expert_weights") and not name.endswith("hook_expert_indices"):
                raise ValueError(f"remove_batch_dim needs batch size 1; {name!r} has shape {tuple(act.shape)}.")
        self.cache_dict = {
            k: (v[0] if not (k.endswith("hook_expert_weights") or k.endswith("hook_expert_indices")) else v)
            for k, v in self.cache_dict.items()
        }
        self.has_batch_dim = False
        return self

    def to_numpy(self) -> dict[str, np.ndarray]:
        """A plain dict of NumPy arrays (bfloat16 is converted to float32, which NumPy lacks)."""
        out = {}
        for k, v in self.cache_dict.items():
            if v.dtype == mx.bfloat16:
                v = v.astype(mx.float32)
            out[k] = np.array(v)
        return out

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        return ActivationCache({k: v[batch_slice] for k, v in self.cache_dict.items()}, self.model, self.has_batch_dim)

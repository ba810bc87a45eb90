"""Model families, one file each, registered by the mlx-lm / HF ``model_type`` they load.

A family module provides ``MODEL_TYPES``, ``config_from_hf(hf_config, weight_names) -> HookedConfig`` and
``convert_weights(weights, cfg) -> canonical weights``; optionally ``Block`` (a ``TransformerBlock``
subclass) when its block differs. See ``hooked_mlx/models/README.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILY_MODULES = ["llama", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "olmo2", "mixtral",
                  "qwen_moe"]

_REGISTRY: dict[str, ModuleType] | None = None


def registry() -> dict[str, ModuleType]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = {}
        for name in FAMILY_MODULES:
            mod = importlib.import_module(f"{__name__}.{name}")
            for mt in mod.MODEL_TYPES:
                _REGISTRY[mt] = mod
    return _REGISTRY


def supported_model_types() -> list[str]:
    return sorted(registry())


def get_family(model_type: str) -> ModuleType:
    reg = registry()
    if model_type not in reg:
        raise ValueError(
            f"model_type {model_type!r} is not supported. Supported model_types: "
            f"{', '.join(supported_model_types())}. To add one, see hooked_mlx/models/README.md."
        )
    return reg[model_type]

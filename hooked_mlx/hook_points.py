"""TransformerLens's module path for hook points: ``from hooked_mlx.hook_points import HookPoint``."""

from .hooks import HookedRootModule, HookPoint

__all__ = ["HookPoint", "HookedRootModule"]

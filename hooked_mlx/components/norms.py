"""Normalisation layers with ``hook_scale`` / ``hook_normalized``.

Fast path (no hook attached): ``mx.fast.rms_norm`` / ``mx.fast.layer_norm``. Hooked path: the scale is
computed in float32 (no fp16 overflow of x**2), ``hook_scale`` sees it in float32 and ``hook_normalized``
sees x / scale (before the weight) in the input's dtype -- TransformerLens's convention.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..hooks import HookPoint


class Norm(nn.Module):
    """RMSNorm (``kind="rms"``), Gemma's offset RMSNorm (``"rms_offset"``: (1 + w)) or LayerNorm (``"ln"``).

    Input x: [..., dims]. Hooks: ``hook_scale`` [..., 1] (float32), ``hook_normalized`` [..., dims].
    """

    def __init__(self, dims: int, kind: str = "rms", eps: float = 1e-5, bias: bool | None = None):
        super().__init__()
        if kind not in ("rms", "rms_offset", "ln"):
            raise ValueError(f"Norm kind {kind!r} is not one of 'rms', 'rms_offset', 'ln'.")
        self.kind = kind
        self.eps = eps
        self.weight = mx.zeros((dims,)) if kind == "rms_offset" else mx.ones((dims,))
        if bias if bias is not None else kind == "ln":
            self.bias = mx.zeros((dims,))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def effective_weight(self) -> mx.array:
        """The multiplier applied after normalising: w, or 1 + w for Gemma's offset norm."""
        return 1.0 + self.weight if self.kind == "rms_offset" else self.weight

    def unhooked(self, x: mx.array) -> mx.array:
        """The norm without its hooks (the fast kernels), for inputs the hooks do not describe."""
        if self.kind == "ln":
            return mx.fast.layer_norm(x, self.weight, self.get("bias"), self.eps)
        return mx.fast.rms_norm(x, self.effective_weight().astype(x.dtype), self.eps)

    def __call__(self, x: mx.array) -> mx.array:
        if not (self.hook_scale.has_hooks or self.hook_normalized.has_hooks):
            return self.unhooked(x)
        x32 = x.astype(mx.float32)
        if self.kind == "ln":
            x32 = x32 - x32.mean(axis=-1, keepdims=True)
        scale = self.hook_scale(mx.sqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + self.eps))
        normalized = self.hook_normalized((x32 / scale).astype(x.dtype))
        out = normalized * self.effective_weight().astype(x.dtype)
        if "bias" in self:
            out = out + self.bias.astype(x.dtype)
        return out

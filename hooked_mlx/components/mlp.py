"""MLPs: gated (SwiGLU / GeGLU) and plain, with TL's ``hook_pre`` / ``hook_pre_linear`` / ``hook_post``.

Canonical weights (``nn.Linear``, [out, in]): ``gate_proj`` (TL ``W_gate``), ``up_proj`` (TL ``W_in``),
``down_proj`` (TL ``W_out``).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..hooks import HookPoint


def _gelu_tanh(x):
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,  # exact (erf)
    "gelu_exact": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": nn.relu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}.")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """out = W_out (act(x W_gate) * (x W_in)).

    Hooks: ``hook_pre`` = x@W_gate [B,P,dmlp]; ``hook_pre_linear`` = x@W_in [B,P,dmlp];
    ``hook_post`` = act(pre) * pre_linear [B,P,dmlp].
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act_name = act_fn
        self.act = get_activation(act_fn)
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def __call__(self, x: mx.array) -> mx.array:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        post = self.hook_post(self.act(pre) * pre_linear)
        return self.down_proj(post)


class MLP(nn.Module):
    """out = W_out act(x W_in + b_in) + b_out. Hooks: ``hook_pre`` [B,P,dmlp], ``hook_post`` [B,P,dmlp]."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str = "gelu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act_name = act_fn
        self.act = get_activation(act_fn)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def __call__(self, x: mx.array) -> mx.array:
        pre = self.hook_pre(self.up_proj(x))
        post = self.hook_post(self.act(pre))
        return self.down_proj(post)

"""Mixture-of-experts MLP: a softmax router over E experts, top-k routing, experts stacked as mlx-lm does.

Canonical weights (mlx-lm's ``switch_mlp`` layout): ``gate`` (the router, [E, dm]),
``switch_mlp.{gate,up,down}_proj.weight`` stacked per expert ([E, dmlp, dm], [E, dmlp, dm], [E, dm, dmlp]);
optional ``shared_expert.{gate,up,down}_proj`` (a dense gated MLP) and ``shared_expert_gate`` ([1, dm]).

Hooks (shapes; N = B*P tokens, k experts per token, de the expert width):

* ``hook_expert_weights`` [N,E]: router softmax over all experts (TL's name and shape);
* ``hook_expert_indices`` [N,k]: the experts each token is routed to (int32);
* ``hook_expert_pre`` / ``hook_expert_pre_linear`` / ``hook_expert_post`` [B,P,k,de]: gate branch, linear
  branch and act(gate)*linear of each routed expert (TL's ``experts.{e}.hook_pre/...``, gathered per token);
* ``hook_expert_out`` [B,P,k,dm]: each routed expert's output before the routing weight.

Fast path (none of the per-expert hooks attached): ``mx.gather_mm`` / ``mx.gather_qmm`` with tokens sorted by
expert, exactly as mlx-lm's ``SwitchGLU``; per-expert activations are never materialised.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, _gather_sort, _scatter_unsort

from ..hooks import HookPoint
from .mlp import GatedMLP, get_activation


class SwitchLinear(nn.Linear):
    """E stacked linear maps, weight [E, out, in]; ``x @ weight[e].T`` for the experts in ``indices``.

    Subclasses ``nn.Linear`` so that loading code that measures ``weight.shape[-1]`` (in_features) and
    quantizes linear layers treats it like one; ``to_quantized`` gives mlx-lm's ``QuantizedSwitchLinear``.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        nn.Module.__init__(self)
        self.weight = mx.zeros((num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    # the expert indices make the signature differ from nn.Linear's (deliberately, see the class docstring)
    def __call__(self, x: mx.array, indices: mx.array,  # type: ignore[override]
                 sorted_indices: bool = False) -> mx.array:
        y = mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False):
        """mlx-lm's ``QuantizedSwitchLinear`` (group size 64 and 4 bits unless given)."""
        E, out, inp = self.weight.shape
        q = QuantizedSwitchLinear(inp, out, E, False, group_size or 64, bits or 4, mode=mode)
        q._quantize(self.weight)
        if "bias" in self:
            q.bias = self.bias
        return q


def switch_weight(layer: nn.Module) -> mx.array:
    """The float [E, out, in] weight of a ``SwitchLinear`` or ``QuantizedSwitchLinear`` (dequantized)."""
    if isinstance(layer, QuantizedSwitchLinear):
        return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size,
                             layer.bits, mode=layer.mode)
    return layer["weight"]


class SwitchGLU(nn.Module):
    """Stacked gated experts: ``down[e](act(gate[e] x) * up[e] x)`` for the k experts of each token."""

    def __init__(self, d_model: int, d_expert: int, num_experts: int, act_fn: str = "silu"):
        super().__init__()
        self.gate_proj = SwitchLinear(d_model, d_expert, num_experts)
        self.up_proj = SwitchLinear(d_model, d_expert, num_experts)
        self.down_proj = SwitchLinear(d_expert, d_model, num_experts)
        self.act = get_activation(act_fn)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [B,P,dm], indices [B,P,k] -> [B,P,k,dm] (mlx-lm's sorted gather path)."""
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= 64
        idx, inv = indices, None
        if do_sort:
            x, idx, inv = _gather_sort(x, indices)
        h = self.act(self.gate_proj(x, idx, sorted_indices=do_sort)) * self.up_proj(x, idx, sorted_indices=do_sort)
        y = self.down_proj(h, idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, indices.shape)
        return y.squeeze(-2)


class MoEMLP(nn.Module):
    """Routed experts (+ optional sigmoid-gated shared expert). Input/output [B,P,dm].

    routing: weights = softmax(router(x)) over all E experts; the top k are kept; their weights are
    renormalised to sum to 1 when ``norm_topk_prob`` (Mixtral, Qwen3-MoE), else used as they are (Qwen2-MoE).
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int, k: int, act_fn: str = "silu",
                 norm_topk_prob: bool = True, shared_d_mlp: int | None = None):
        super().__init__()
        self.num_experts, self.k, self.norm_topk_prob = num_experts, k, norm_topk_prob
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.switch_mlp = SwitchGLU(d_model, d_expert, num_experts, act_fn)
        if shared_d_mlp:
            self.shared_expert = GatedMLP(d_model, shared_d_mlp, act_fn)
            self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        self.hook_expert_weights = HookPoint()  # [B*P,E]
        self.hook_expert_indices = HookPoint()  # [B*P,k]
        self.hook_expert_pre = HookPoint()  # [B,P,k,de]
        self.hook_expert_pre_linear = HookPoint()  # [B,P,k,de]
        self.hook_expert_post = HookPoint()  # [B,P,k,de]
        self.hook_expert_out = HookPoint()  # [B,P,k,dm]

    @property
    def per_expert_hooked(self) -> bool:
        return any(h.has_hooks for h in (self.hook_expert_pre, self.hook_expert_pre_linear,
                                         self.hook_expert_post, self.hook_expert_out))

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(indices [B,P,k] int32, routing weights [B,P,k]) for x [B,P,dm]."""
        B, P, _ = x.shape
        probs = mx.softmax(self.gate(x).reshape(B * P, -1), axis=-1, precise=True)
        probs = self.hook_expert_weights(probs)
        inds = mx.argpartition(-probs, kth=self.k - 1, axis=-1)[..., : self.k].astype(mx.int32)
        inds = self.hook_expert_indices(mx.stop_gradient(inds))
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds.reshape(B, P, self.k), scores.reshape(B, P, self.k)

    def _experts_hooked(self, x: mx.array, inds: mx.array) -> mx.array:
        """Unsorted gather path that exposes each routed expert's activations: [B,P,k,dm]."""
        sw = self.switch_mlp
        xe = mx.expand_dims(x, (-2, -3))  # [B,P,1,1,dm]
        pre = self.hook_expert_pre(sw.gate_proj(xe, inds).squeeze(-2))  # [B,P,k,de]
        lin = self.hook_expert_pre_linear(sw.up_proj(xe, inds).squeeze(-2))
        post = self.hook_expert_post(sw.act(pre) * lin)
        out = sw.down_proj(mx.expand_dims(post, -2), inds).squeeze(-2)  # [B,P,k,dm]
        return self.hook_expert_out(out)

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.route(x)
        y = self._experts_hooked(x, inds) if self.per_expert_hooked else self.switch_mlp(x, inds)
        y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2).astype(x.dtype)
        if "shared_expert" in self:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y

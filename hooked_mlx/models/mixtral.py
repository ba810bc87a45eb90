"""Mixtral: a Mistral block whose MLP is a top-k mixture of SwiGLU experts (``components.moe.MoEMLP``).

* router ``block_sparse_moe.gate`` -> ``mlp.gate``; experts stacked as mlx-lm does,
  ``block_sparse_moe.switch_mlp.{gate,up,down}_proj`` [E, ...] -> ``mlp.switch_mlp.*``. Hugging Face's
  per-expert ``experts.{e}.w1/w3/w2`` (gate / up / down) are stacked the same way on load.
* routing: softmax over the E router logits, top ``num_experts_per_tok``, weights renormalised to sum to 1
  (equal to mlx-lm's softmax over the top-k logits).
* MoE hooks: ``mlp.hook_expert_weights`` [B*P,E], ``mlp.hook_expert_indices`` [B*P,k], and per routed
  expert ``mlp.hook_expert_pre/pre_linear/post`` [B,P,k,dmlp], ``mlp.hook_expert_out`` [B,P,k,dm].
  The dense-MLP hooks ``mlp.hook_pre/post`` do not exist in MoE blocks.
* a ``sliding_window`` in the config is applied to every layer, as Hugging Face does (mlx-lm ignores it).
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..components import TransformerBlock
from ..components.moe import MoEMLP
from ..config import HookedConfig, require, rope_settings, token_ids
from .base import LLAMA_LIKE_RULES, drop_tied_head, hf_dims, rename, tied_embeddings

MODEL_TYPES = ("mixtral",)

RULES = [(r"^model\.layers\.(\d+)\.block_sparse_moe\.", r"blocks.\1.mlp.")] + LLAMA_LIKE_RULES


class Block(TransformerBlock):
    def make_mlp(self, cfg: HookedConfig):
        return MoEMLP(cfg.d_model, cfg.d_mlp, *cfg.moe_experts(), cfg.act_fn,
                      cfg.norm_topk_prob)


def stack_experts(weights: dict, pattern: str, names: dict[str, str], num_experts: int) -> dict:
    """Stack per-expert tensors ``...{pattern}.{e}.{src}.{suffix}`` into ``...switch_mlp.{dst}.{suffix}``."""
    w = dict(weights)
    rx = re.compile(rf"^(.*)\.{pattern}\.0\.(\w+)\.(weight|scales|biases|bias)$")
    for key in [k for k in weights if rx.match(k)]:
        m = rx.match(key)
        assert m is not None
        prefix, src, suffix = m.groups()
        if src not in names:
            continue
        parts = [w.pop(f"{prefix}.{pattern}.{e}.{src}.{suffix}") for e in range(num_experts)]
        w[f"{prefix}.switch_mlp.{names[src]}.{suffix}"] = mx.stack(parts)
    return w


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    n_layers = require(d, "num_hidden_layers")
    theta, scaling = rope_settings(d, default_theta=1e6)
    window = d.get("sliding_window")
    return HookedConfig(
        architecture="mixtral",
        **hf_dims(d, n_ctx_default=32768),
        norm_eps=d.get("rms_norm_eps", 1e-5),
        act_fn=d.get("hidden_act", "silu"),
        sliding_window=window,
        layer_types=["sliding_attention" if window else "full_attention"] * n_layers,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=tied_embeddings(d, weight_names),
        num_experts=require(d, "num_local_experts", "num_experts"),
        experts_per_token=require(d, "num_experts_per_tok"),
        norm_topk_prob=True,
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    w = stack_experts(weights, "experts", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
                      cfg.moe_experts()[0])
    return drop_tied_head(rename(w, RULES), cfg.tie_word_embeddings)

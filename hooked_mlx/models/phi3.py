"""Phi-3: a Llama block whose projections are fused in the checkpoint.

* ``qkv_proj`` [(H + 2 Hkv) dh, dm] is split by rows into ``q_proj`` / ``k_proj`` / ``v_proj``, and
  ``gate_up_proj`` [2 dmlp, dm] into ``gate_proj`` (first half) / ``up_proj``, so the canonical per-head
  hooks (``attn.hook_q/k/v``, ``mlp.hook_pre/pre_linear``) exist. Splitting rows also splits quantized
  (weight, scales, biases) triplets exactly.
* ``partial_rotary_factor``; ``rope_scaling`` of type ``su`` / ``longrope`` (SuScaled RoPE) or ``linear``.
* a ``sliding_window`` in the config is applied to every layer, as Hugging Face does (mlx-lm ignores it;
  they agree on sequences no longer than the window).
"""

from __future__ import annotations

import mlx.core as mx

from ..config import HookedConfig, partial_rotary_factor, require, rope_settings, token_ids
from ..host import to_ints
from .base import LLAMA_LIKE_RULES, drop_tied_head, rename, tied_embeddings

MODEL_TYPES = ("phi3",)


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    d_model = require(d, "hidden_size")
    n_heads = require(d, "num_attention_heads")
    n_layers = require(d, "num_hidden_layers")
    d_head = d_model // n_heads
    theta, scaling = rope_settings(d)
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype in ("su", "longrope"):
            scaling = {**scaling, "rope_type": "longrope", "type": "longrope",
                       "original_max_position_embeddings": d.get("original_max_position_embeddings", 4096)}
        elif rtype != "linear":
            raise ValueError(f"phi3 rope_scaling type {rtype!r} is not supported; expected su, longrope or linear.")
    window = d.get("sliding_window")
    return HookedConfig(
        architecture="phi3",
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=require(d, "intermediate_size"),
        d_vocab=require(d, "vocab_size"),
        n_key_value_heads=d.get("num_key_value_heads") or n_heads,
        n_ctx=d.get("max_position_embeddings") or 131072,
        norm_eps=d.get("rms_norm_eps", 1e-5),
        act_fn=d.get("hidden_act", "silu"),
        sliding_window=window,
        layer_types=["sliding_attention" if window else "full_attention"] * n_layers,
        rotary_dim=int(d_head * partial_rotary_factor(d)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_traditional=bool(d.get("rope_traditional", False)),
        tie_word_embeddings=tied_embeddings(d, weight_names),
        default_prepend_bos=False,
        **token_ids(d),
    )


def _split_rows(weights: dict, key: str, names: list[str], sizes: list[int]) -> None:
    """Split ``{key}.{weight,scales,biases,bias}`` by rows into ``{name}.*``."""
    base = key.rsplit(".", 1)[0]
    for suffix in ("weight", "scales", "biases", "bias"):
        t = weights.pop(f"{key}.{suffix}", None)
        if t is None:
            continue
        parts = mx.split(t, to_ints(mx.cumsum(mx.array(sizes[:-1]))), axis=0)
        for name, part in zip(names, parts):
            weights[f"{base}.{name}.{suffix}"] = part


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    w = dict(weights)
    H, Hkv, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        _split_rows(w, f"{p}.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"], [H * dh, Hkv * dh, Hkv * dh])
        _split_rows(w, f"{p}.mlp.gate_up_proj", ["gate_proj", "up_proj"], [cfg.d_mlp, cfg.d_mlp])
    return drop_tied_head(rename(w, LLAMA_LIKE_RULES), cfg.tie_word_embeddings)

"""Gemma-3 text models (``gemma3_text``; ``gemma3`` multimodal checkpoints load their language model).

Gemma-2's block (four (1 + w) norms, ``query_pre_attn_scalar``) plus

* per-head q/k norms (``attn.q_norm`` / ``attn.k_norm``, (1 + w) RMSNorm over d_head, before RoPE);
* 5 local : 1 global layers (``sliding_window_pattern`` 6, or the config's ``layer_types``); local layers
  attend within ``sliding_window`` and use RoPE base ``rope_local_base_freq`` (transformers 5:
  ``rope_parameters["sliding_attention"]``), global layers ``rope_theta`` with any ``rope_scaling``;
* the sqrt(d_model) embedding scale rounded to bfloat16 first (as both Hugging Face and mlx-lm do);
* no soft-capping unless the config sets ``attn_logit_softcapping`` / ``final_logit_softcapping``;
* untied when the checkpoint has ``lm_head``.

``gemma3`` checkpoints keep the language model under ``language_model.`` (mlx-lm) or
``model.language_model.`` (transformers 5); the vision tower and projector are dropped.
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..config import HookedConfig, require, rope_settings, token_ids
from ..host import to_float
from .base import drop_tied_head, rename
from .gemma import gemma_activation
from .gemma2 import GEMMA2_RULES, layer_types

MODEL_TYPES = ("gemma3_text", "gemma3")

_PREFIXES = [(r"^language_model\.", ""), (r"^model\.language_model\.", "model.")]
_DROP = re.compile(r"(^|\.)(vision_tower|multi_modal_projector)\.")


def _text_names(names) -> set[str]:
    out = set()
    for k in names:
        for pattern, repl in _PREFIXES:
            k = re.sub(pattern, repl, k)
        out.add(k)
    return out


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    if "text_config" in d:  # a gemma3 wrapper config passed as is
        d = {**d["text_config"], "vocab_size": d.get("vocab_size", d["text_config"].get("vocab_size"))}
    d_model = require(d, "hidden_size")
    n_heads = d.get("num_attention_heads", 8)
    n_layers = require(d, "num_hidden_layers")
    theta, scaling = rope_settings(d, "full_attention", default_theta=1_000_000.0)
    local_theta = d.get("rope_local_base_freq")
    rp = d.get("rope_parameters")
    if local_theta is None and isinstance(rp, dict) and isinstance(rp.get("sliding_attention"), dict):
        local_theta = rp["sliding_attention"].get("rope_theta")
    names = _text_names(weight_names) if weight_names is not None else None
    tied = names is not None and "lm_head.weight" not in names
    return HookedConfig(
        architecture="gemma3_text",
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d.get("head_dim", 256),
        d_mlp=require(d, "intermediate_size"),
        d_vocab=d.get("vocab_size") or 262208,
        n_key_value_heads=d.get("num_key_value_heads", 4),
        n_ctx=d.get("max_position_embeddings") or 32768,
        normalization="rms_offset",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        act_fn=gemma_activation(d),
        qk_norm="head",
        attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=d.get("attn_logit_softcapping"),
        final_softcap=d.get("final_logit_softcapping"),
        sliding_window=d.get("sliding_window", 512),
        layer_types=layer_types(d, n_layers, 6),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=float(local_theta if local_theta is not None else 10_000.0),
        post_norms=True,
        embed_scale=to_float(mx.array(d_model**0.5, dtype=mx.bfloat16).astype(mx.float32)),
        tie_word_embeddings=tied,
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    text = {}
    for k, v in weights.items():
        if _DROP.search(k):
            continue
        for pattern, repl in _PREFIXES:
            k = re.sub(pattern, repl, k)
        text[k] = v
    return drop_tied_head(rename(text, GEMMA2_RULES), cfg.tie_word_embeddings)

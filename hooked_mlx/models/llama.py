"""Llama-family models: ``llama``, ``mistral``, ``qwen2`` (q/k/v bias), ``qwen3`` (per-head q/k norm).

All four share the pre-norm block of ``components``; they differ only in config keys and weight names:

* llama / mistral: RMSNorm, SwiGLU, rotary (half-split, HF ``rotate_half``), optional attention/MLP bias.
* qwen2: q/k/v projections always carry a bias; o_proj does not.
* qwen3: ``q_norm`` / ``k_norm`` = RMSNorm(d_head) per head, before RoPE; ``head_dim`` explicit.

mlx-lm quirk kept deliberately: a llama config that omits ``tie_word_embeddings`` loads as tied in
mlx-lm (its default is True, HF's is False). We follow the checkpoint: tied only if the config says so
or if ``lm_head.weight`` is absent.
"""

from __future__ import annotations

from ..config import HookedConfig, rope_settings, token_ids
from .base import LLAMA_LIKE_RULES, drop_tied_head, hf_dims, rename, tied_embeddings

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    mt = d["model_type"]
    theta, scaling = rope_settings(d)
    return HookedConfig(
        architecture=mt,
        **hf_dims(d, n_ctx_default=2048),
        normalization="rms",
        norm_eps=d.get("rms_norm_eps", 1e-6 if mt.startswith("qwen") else 1e-5),
        act_fn=d.get("hidden_act", "silu"),
        gated_mlp=True,
        mlp_bias=bool(d.get("mlp_bias", False)),
        attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
        o_bias=False if mt == "qwen2" else bool(d.get("attention_bias", False)),
        qk_norm="head" if mt == "qwen3" else None,
        sliding_window=None,  # mistral's sliding_window is not applied by mlx-lm's llama either
        rope_theta=theta,
        rope_scaling=scaling,
        rope_traditional=bool(d.get("rope_traditional", False)),
        tie_word_embeddings=tied_embeddings(d, weight_names),
        default_prepend_bos=not mt.startswith("qwen"),
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    return drop_tied_head(rename(weights, LLAMA_LIKE_RULES), cfg.tie_word_embeddings)

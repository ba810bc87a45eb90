"""Gemma (1): Llama's block with Gemma's conventions.

* RMSNorm multiplies by ``(1 + w)`` (``normalization="rms_offset"``; the stored w is an offset from 1);
* embeddings are scaled by sqrt(d_model) (``cfg.embed_scale``, applied in the input's dtype);
* GeGLU MLP with the activation the config names in ``hidden_activation`` (Hugging Face: the tanh
  approximation ``gelu_pytorch_tanh``, also when the key is absent). mlx-lm 0.32 uses exact GELU whatever the
  config says; we follow Hugging Face, so logits differ slightly from mlx-lm's (the parity test expects it);
* the unembedding is always tied to the embedding.
"""

from __future__ import annotations

from ..config import HookedConfig, require, rope_settings, token_ids
from .base import LLAMA_LIKE_RULES, drop_tied_head, hf_dims, rename

MODEL_TYPES = ("gemma",)


def gemma_activation(d: dict) -> str:
    """Hugging Face's rule: ``hidden_activation`` if set, else the tanh approximation (``hidden_act`` is legacy)."""
    return d.get("hidden_activation") or "gelu_pytorch_tanh"


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    d_model = require(d, "hidden_size")
    theta, scaling = rope_settings(d)
    return HookedConfig(
        architecture=d["model_type"],
        **hf_dims(d, n_ctx_default=8192),
        normalization="rms_offset",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        act_fn=gemma_activation(d),
        attention_bias=bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        embed_scale=d_model**0.5,
        tie_word_embeddings=True,
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    return drop_tied_head(rename(weights, LLAMA_LIKE_RULES), True)

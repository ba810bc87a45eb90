"""Gemma-2: Gemma's (1 + w) norms and sqrt(d_model) embedding scale, plus

* four norms per block: ``ln1`` (input), ``ln1_post`` (after attention), ``ln2`` (pre-feedforward),
  ``ln2_post`` (after the MLP) -- hooks ``ln1_post.*`` / ``ln2_post.*``; ``hook_attn_out`` / ``hook_mlp_out``
  are taken after the post-norms (as in TransformerLens);
* attention scale ``query_pre_attn_scalar ** -0.5`` and tanh soft-capping of the attention logits
  (``attn_logit_softcapping``) and of the final logits (``final_logit_softcapping``);
* alternating local / global attention: even layers (0, 2, ...) attend within ``sliding_window`` tokens, as
  Hugging Face does (``layer_types`` when the config lists them). mlx-lm 0.32 applies no window at all, so
  the two agree only on sequences no longer than the window; Hugging Face is the reference here.
"""

from __future__ import annotations

from ..config import HookedConfig, LayerType, require, rope_settings, token_ids
from .base import LLAMA_LIKE_RULES, drop_tied_head, rename
from .gemma import gemma_activation

MODEL_TYPES = ("gemma2",)

#: post-norm names first: in Gemma-2/3 ``post_attention_layernorm`` is the post-attention norm, not ln2
GEMMA2_RULES = [
    (r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"blocks.\1.ln2."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln1_post."),
    (r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"blocks.\1.ln2_post."),
] + LLAMA_LIKE_RULES


def layer_types(d: dict, n_layers: int, default_pattern: int) -> list[LayerType]:
    """Per-layer attention kind: the config's ``layer_types``, else every ``pattern``-th layer is global."""
    if isinstance(d.get("layer_types"), list) and len(d["layer_types"]) == n_layers:
        return list(d["layer_types"])
    pattern = int(d.get("sliding_window_pattern") or default_pattern)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    d_model = require(d, "hidden_size")
    n_heads = require(d, "num_attention_heads")
    n_layers = require(d, "num_hidden_layers")
    theta, scaling = rope_settings(d)
    return HookedConfig(
        architecture=d["model_type"],
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=require(d, "head_dim", default=d_model // n_heads),
        d_mlp=require(d, "intermediate_size"),
        d_vocab=require(d, "vocab_size"),
        n_key_value_heads=d.get("num_key_value_heads") or n_heads,
        n_ctx=d.get("max_position_embeddings") or 8192,
        normalization="rms_offset",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        act_fn=gemma_activation(d),
        attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=d.get("attn_logit_softcapping", 50.0),
        final_softcap=d.get("final_logit_softcapping", 30.0),
        sliding_window=d.get("sliding_window", 4096),
        layer_types=layer_types(d, n_layers, 2),
        rope_theta=theta,
        rope_scaling=scaling,
        post_norms=True,
        embed_scale=d_model**0.5,
        tie_word_embeddings=True,
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    return drop_tied_head(rename(weights, GEMMA2_RULES), True)

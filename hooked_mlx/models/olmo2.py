"""OLMo-2: a Llama block with norms after the sublayers instead of before, and full-width q/k norms.

* post-norm blocks: resid_mid = resid_pre + ln1_post(attn(resid_pre)); resid_post = resid_mid +
  ln2_post(mlp(resid_mid)). There are no ``ln1`` / ``ln2`` (their hooks do not exist); ``ln1_post.*`` /
  ``ln2_post.*`` hooks do, and ``hook_attn_out`` / ``hook_mlp_out`` are taken after them.
* ``q_norm`` / ``k_norm`` are RMSNorms over the whole projection (H*dh, Hkv*dh), applied before RoPE
  (hooks ``attn.q_norm.hook_normalized`` [B,P,H*dh]); ``attn.hook_q`` / ``hook_k`` are the projections
  before them, as in every family.
* Hugging Face's ``post_attention_layernorm`` is the post-attention norm here (canonical ``ln1_post``).
"""

from __future__ import annotations

from ..config import HookedConfig, rope_settings, token_ids
from .base import LLAMA_LIKE_RULES, drop_tied_head, hf_dims, rename, tied_embeddings

MODEL_TYPES = ("olmo2",)

RULES = [
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln1_post."),
    (r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"blocks.\1.ln2_post."),
] + LLAMA_LIKE_RULES


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    theta, scaling = rope_settings(d)
    return HookedConfig(
        architecture="olmo2",
        **hf_dims(d, n_ctx_default=4096),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        act_fn=d.get("hidden_act", "silu"),
        mlp_bias=bool(d.get("mlp_bias", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        qk_norm="full",
        rope_theta=theta,
        rope_scaling=scaling,
        pre_norms=False,
        post_norms=True,
        tie_word_embeddings=tied_embeddings(d, weight_names),
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    return drop_tied_head(rename(weights, RULES), cfg.tie_word_embeddings)

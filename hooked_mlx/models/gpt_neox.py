"""GPT-NeoX / Pythia: parallel attention + MLP, partial rotary, LayerNorm with bias, untied ``embed_out``.

* ``use_parallel_residual`` (default): resid_post = resid_pre + attn(ln1(x)) + mlp(ln2(x)); there is no
  ``hook_resid_mid`` (as in TransformerLens). Otherwise the block is sequential.
* ``query_key_value`` [3 dm, dm] is interleaved per head: rows reshape to [H, 3, dh]; head h's q, k, v are
  rows (h, 0), (h, 1), (h, 2). It is split into ``q_proj`` / ``k_proj`` / ``v_proj`` (quantized triplets too).
* partial rotary: ``rotary_pct`` / ``rotary_emb_base`` (transformers 5: ``rope_parameters``).
* ``hidden_act`` is followed as Hugging Face does (Pythia: ``gelu``, exact). mlx-lm 0.32 always uses the tanh
  approximation, so with ``gelu`` logits differ slightly from mlx-lm (the test expects it).
"""

from __future__ import annotations

from ..config import HookedConfig, partial_rotary_factor, require, rope_settings, token_ids
from .base import rename

MODEL_TYPES = ("gpt_neox",)

RULES = [
    (r"^embed_in\.", "embed."),
    (r"^embed_out\.", "unembed.lm_head."),
    (r"^final_layer_norm\.", "ln_final."),
    (r"^h\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1."),
    (r"^h\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2."),
    (r"^h\.(\d+)\.attention\.dense\.", r"blocks.\1.attn.o_proj."),
    (r"^h\.(\d+)\.attention\.", r"blocks.\1.attn."),
    (r"^h\.(\d+)\.mlp\.dense_h_to_4h\.", r"blocks.\1.mlp.up_proj."),
    (r"^h\.(\d+)\.mlp\.dense_4h_to_h\.", r"blocks.\1.mlp.down_proj."),
]


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    d_model = require(d, "hidden_size")
    n_heads = require(d, "num_attention_heads")
    d_head = d_model // n_heads
    theta, scaling = rope_settings(d)
    bias = bool(d.get("attention_bias", True))
    return HookedConfig(
        architecture="gpt_neox",
        n_layers=require(d, "num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d.get("intermediate_size") or 4 * d_model,
        d_vocab=require(d, "vocab_size"),
        n_ctx=d.get("max_position_embeddings") or 2048,
        normalization="ln",
        norm_eps=d.get("layer_norm_eps", 1e-5),
        act_fn=d.get("hidden_act", "gelu"),
        gated_mlp=False,
        mlp_bias=True,
        attention_bias=bias,
        o_bias=bias,
        rotary_dim=int(d_head * partial_rotary_factor(d, 0.25)),
        rope_theta=theta,
        rope_scaling=scaling,
        parallel_attn_mlp=bool(d.get("use_parallel_residual", True)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        default_prepend_bos=False,
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    H, dh = cfg.n_heads, cfg.d_head
    w = {}
    for k, v in weights.items():
        k = k.removeprefix("model.").replace("gpt_neox.layers.", "h.").removeprefix("gpt_neox.")
        if k.endswith((".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")):
            continue
        if ".attention.query_key_value." in k:
            base, suffix = k.split(".attention.query_key_value.")
            t = v.reshape(H, 3, dh, *v.shape[1:])  # rows (head, q/k/v, dh)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                w[f"{base}.attention.{name}.{suffix}"] = t[:, j].reshape(H * dh, *v.shape[1:])
            continue
        w[k] = v
    if cfg.tie_word_embeddings:
        w.pop("embed_out.weight", None)
    return rename(w, RULES)

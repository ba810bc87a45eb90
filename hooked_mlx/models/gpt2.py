"""GPT-2: learned positions (``pos_embed``, ``hook_pos_embed``), LayerNorm with bias, plain GELU MLP.

* ``c_attn`` [3 dm, dm] is split by rows into ``q_proj`` / ``k_proj`` / ``v_proj`` (with their biases);
  ``attn.c_proj`` -> ``attn.o_proj``, ``mlp.c_fc`` -> ``mlp.up_proj``, ``mlp.c_proj`` -> ``mlp.down_proj``.
* Hugging Face stores these as Conv1D weights [in, out]; they are transposed to [out, in]. mlx-lm's
  checkpoints (keys under ``model.``) are already transposed and are used as they are.
* the unembedding is tied to ``wte``; ``activation_function`` (``gelu_new``: the tanh approximation).
"""

from __future__ import annotations

import re

from ..config import HookedConfig, require, token_ids
from .base import rename
from .phi3 import _split_rows

MODEL_TYPES = ("gpt2",)

RULES = [
    (r"^wte\.", "embed."),
    (r"^wpe\.", "pos_embed."),
    (r"^ln_f\.", "ln_final."),
    (r"^h\.(\d+)\.ln_1\.", r"blocks.\1.ln1."),
    (r"^h\.(\d+)\.ln_2\.", r"blocks.\1.ln2."),
    (r"^h\.(\d+)\.attn\.c_proj\.", r"blocks.\1.attn.o_proj."),
    (r"^h\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"^h\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.up_proj."),
    (r"^h\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.down_proj."),
]
_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    if d.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2 with scale_attn_by_inverse_layer_idx=True is not supported.")
    d_model = require(d, "n_embd", "hidden_size")
    n_heads = require(d, "n_head", "num_attention_heads")
    return HookedConfig(
        architecture="gpt2",
        n_layers=require(d, "n_layer", "num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d.get("n_inner") or 4 * d_model,
        d_vocab=require(d, "vocab_size"),
        n_ctx=require(d, "n_positions", "n_ctx", "max_position_embeddings"),
        normalization="ln",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        act_fn=d.get("activation_function", "gelu_new"),
        gated_mlp=False,
        mlp_bias=True,
        attention_bias=True,
        o_bias=True,
        positional="learned",
        tie_word_embeddings=True,
        **token_ids(d),
    )


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    w = {}
    for k, v in weights.items():
        if k.startswith("model."):  # mlx-lm layout: already [out, in]
            k = k[len("model."):]
        else:  # Hugging Face: Conv1D [in, out], optionally under "transformer."
            k = k.removeprefix("transformer.")
            if _CONV1D.search(k):
                v = v.T
        if k == "lm_head.weight" or re.search(r"\.attn\.(masked_)?bias$", k):
            continue
        w[k] = v
    for i in range(cfg.n_layers):
        _split_rows(w, f"h.{i}.attn.c_attn", ["q_proj", "k_proj", "v_proj"], [cfg.d_model] * 3)
    return rename(w, RULES)

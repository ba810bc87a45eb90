"""What a family file provides, and the shared Hugging Face -> canonical weight renaming."""

from __future__ import annotations

import re

import mlx.core as mx

from ..config import require

#: HF / mlx-lm Llama-style names -> canonical names (see weights/README.md). Suffixes (.weight, .bias,
#: .scales, .biases) are kept, so quantized triplets rename with their weight.
LLAMA_LIKE_RULES: list[tuple[str, str]] = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "ln_final."),
    (r"^lm_head\.", "unembed.lm_head."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]

#: tensors that carry no weights (recomputed buffers)
DROP_PATTERNS = [r"rotary_emb\.inv_freq$", r"\.attn\.bias$", r"\.attn\.masked_bias$"]


def rename(weights: dict[str, mx.array], rules: list[tuple[str, str]]) -> dict[str, mx.array]:
    """Apply the first matching (regex, replacement) rule to every key; drop buffers.

    A key no rule matches is kept as is, so the model's strict load reports it by name."""
    out = {}
    for key, value in weights.items():
        if any(re.search(p, key) for p in DROP_PATTERNS):
            continue
        new = key
        for pattern, repl in rules:
            if re.search(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        out[new] = value
    return out


def drop_tied_head(weights: dict, tied: bool) -> dict:
    if tied:
        weights = {k: v for k, v in weights.items() if not k.startswith("unembed.lm_head.")}
    return weights


def hf_dims(d: dict, n_ctx_default: int) -> dict:
    """The shape fields of ``HookedConfig`` from the keys every Hugging Face decoder config names alike."""
    d_model = require(d, "hidden_size")
    n_heads = require(d, "num_attention_heads")
    return dict(
        n_layers=require(d, "num_hidden_layers"),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d.get("head_dim") or d_model // n_heads,
        d_mlp=require(d, "intermediate_size"),
        d_vocab=require(d, "vocab_size"),
        n_key_value_heads=d.get("num_key_value_heads") or n_heads,
        n_ctx=d.get("max_position_embeddings") or n_ctx_default,
    )


def tied_embeddings(d: dict, weight_names: set[str] | None) -> bool:
    """Tied when the config says so (Hugging Face's default is untied; mlx-lm's llama default, tied, is not
    followed), or when the checkpoint has no ``lm_head.weight`` whatever the config says."""
    if weight_names is not None and "lm_head.weight" not in weight_names:
        return True
    return bool(d.get("tie_word_embeddings", False))

"""What a family file provides, and the shared Hugging Face -> canonical weight renaming."""

from __future__ import annotations

import re

import mlx.core as mx

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

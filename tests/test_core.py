"""Core: parity with mlx-lm, golden outputs, hooks, caches, gradients, canonical checkpoints, errors."""

from __future__ import annotations

import json
import re

from hooked_mlx import ActivationCache, HookedTransformer, get_act_name
from hooked_mlx.names import BLOCK_HOOKS, TOP_HOOKS
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_fixtures import TINY_LLAMA, build_mlx_lm_checkpoint
from mlx_lm.utils import load_model
from tolerance import assert_close, rel_maxdiff

GOLDEN_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396,
              267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261,
              370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267,
              414, 270, 333, 415, 426, 13, 438, 310]

TOKENS = mx.array([[1, 5, 9, 200, 3, 77, 100, 11, 400, 23, 42, 7], [1, 300, 2, 8, 99, 45, 60, 61, 62, 63, 1, 9]])

FAMILIES = {
    "llama_gqa_tied": TINY_LLAMA,
    "llama_untied": {**TINY_LLAMA, "tie_word_embeddings": False, "num_key_value_heads": 4},
    "mistral": {**TINY_LLAMA, "model_type": "mistral", "tie_word_embeddings": False},
    "qwen2_bias": {**TINY_LLAMA, "model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3_qknorm": {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": False},
}


def mlx_lm_resid(ref, tokens) -> list[mx.array]:
    """Residual stream after each block of an mlx-lm Llama-style model."""
    h = ref.model.embed_tokens(tokens)
    outs = []
    for layer in ref.model.layers:
        h = layer(h, "causal", None)
        outs.append(h)
    return outs


@pytest.fixture(scope="module", params=sorted(FAMILIES) + ["llama_q4", "qwen3_q8"])
def family_pair(request, tmp_path_factory):
    name = request.param
    quant = None
    if name == "llama_q4":
        cfg, quant = TINY_LLAMA, {"group_size": 64, "bits": 4}
    elif name == "qwen3_q8":
        cfg, quant = FAMILIES["qwen3_qknorm"], {"group_size": 32, "bits": 8}
    else:
        cfg = FAMILIES[name]
    _, path = build_mlx_lm_checkpoint(tmp_path_factory.mktemp(name), cfg, quantize=quant)
    ref, _ = load_model(path)
    # quantized families run quantized (keep_quantized): the parity below is of the quantized path
    return name, ref, HookedTransformer.from_pretrained(path, keep_quantized=quant is not None), path


def test_parity_logits_and_residual_with_mlx_lm(family_pair):
    name, ref, model, _ = family_pair
    ref_logits = ref(TOKENS)
    logits = model(TOKENS)
    assert logits.shape == (2, TOKENS.shape[1], 512)
    assert rel_maxdiff(ref_logits, logits) <= 1e-4, name
    hooked_logits, cache = model.run_with_cache(TOKENS)
    assert rel_maxdiff(ref_logits, hooked_logits) <= 1e-4, name
    for l, r in enumerate(mlx_lm_resid(ref, TOKENS)):
        assert rel_maxdiff(cache["resid_post", l], r) <= 1e-4, (name, l)
    if name.endswith(("q4", "q8")):
        assert model.cfg.quantization is not None
        assert isinstance(model.blocks[0].attn.q_proj, nn.QuantizedLinear)


def test_every_hook_has_documented_shape(family_pair):
    name, _, model, _ = family_pair
    cfg = model.cfg
    _, cache = model.run_with_cache(TOKENS, names_filter=list(model.hook_dict))  # hook_result included
    B, P = TOKENS.shape
    dims = {"B": B, "P": P, "Pq": P, "Pk": P, "H": cfg.n_heads, "Hkv": cfg.n_key_value_heads, "dh": cfg.d_head,
            "dm": cfg.d_model, "dmlp": cfg.d_mlp, "V": cfg.d_vocab, "1": 1}
    expected = {k: v[0] for k, v in TOP_HOOKS.items() if k != "hook_pos_embed"}
    for l in range(cfg.n_layers):
        expected.update({f"blocks.{l}.{k}": v[0] for k, v in BLOCK_HOOKS.items()})
    for hook, shape in expected.items():
        want = tuple(dims[d] for d in shape.strip("[]").split(","))
        assert tuple(cache[hook].shape) == want, (name, hook)
    if cfg.qk_norm == "head":
        assert tuple(cache["blocks.0.attn.q_norm.hook_normalized"].shape) == (B, P, cfg.n_heads, cfg.d_head)
        assert tuple(cache["blocks.0.attn.k_norm.hook_scale"].shape) == (B, P, cfg.n_key_value_heads, 1)


def test_hook_values_are_consistent(stories):
    toks = stories.to_tokens("Once upon a time there was")
    _, c = stories.run_with_cache(toks, names_filter=list(stories.hook_dict))  # hook_result included
    b = stories.blocks[1]
    # resid_mid = resid_pre + attn_out ; resid_post = resid_mid + mlp_out ; next resid_pre = resid_post
    assert_close(c["resid_mid", 1], c["resid_pre", 1] + c["attn_out", 1], tol=1e-5)
    assert_close(c["resid_post", 1], c["resid_mid", 1] + c["mlp_out", 1], tol=1e-5)
    assert_close(c["resid_pre", 2], c["resid_post", 1], tol=0)
    # pattern rows sum to 1 and are causal
    pat = c["pattern", 1]
    assert_close(pat.sum(-1), np.ones(pat.shape[:-1]), tol=1e-5)
    assert np.all(np.triu(np.array(pat[0, 0]), 1) == 0)
    # z = pattern @ v with GQA ; results sum to attn_out
    v = mx.repeat(c["v", 1].transpose(0, 2, 1, 3), 2, axis=1)
    assert_close(c["z", 1], (pat @ v).transpose(0, 2, 1, 3), tol=1e-5)
    assert_close(c["result", 1].sum(2), c["attn_out", 1], tol=1e-5)
    # ln scale/normalized
    x = c["resid_pre", 1]
    scale = mx.sqrt((x * x).mean(-1, keepdims=True) + stories.cfg.norm_eps)
    np.testing.assert_allclose(c["scale", 1, "ln1"], scale, rtol=1e-5)
    assert_close(c["normalized", 1, "ln1"], x / scale, tol=1e-5)
    # gated MLP: post = silu(pre) * pre_linear; mlp_out = post @ W_out
    assert_close(c["post", 1], nn.silu(c["pre", 1]) * c["pre_linear", 1], tol=1e-5)
    assert_close(c["mlp_out", 1], c["post", 1] @ b.mlp.down_proj.weight.T, tol=1e-5)


def test_stories260k_golden(stories):
    toks = stories.to_tokens("Once upon a time")
    assert toks.tolist() == [[1, 403, 407, 261, 378]]
    logits = stories(toks)
    assert int(logits[0, -1].argmax()) == 432
    assert abs(logits[0, -1].max().item() - 17.7994) < 1e-3
    # greedy from BOS, no KV cache: the README's golden ids
    ids = [1]
    for _ in range(64):
        ids.append(int(stories(mx.array([ids]))[0, -1].argmax()))
    assert ids == GOLDEN_IDS
    assert stories.to_string(mx.array(ids[1:])).startswith("Once upon a time, there was a little girl named Lily.")


def test_fast_path_equals_hooked_path_and_identity_hooks(stories):
    toks = stories.to_tokens(["Once upon a time", "The cat sat on"], padding_side="right")
    fast = stories(toks)
    _, cache = stories.run_with_cache(toks)
    ident = stories.run_with_hooks(toks, fwd_hooks=[(lambda n: True, lambda a, hook: a)])
    none_ret = stories.run_with_hooks(toks, fwd_hooks=[(lambda n: True, lambda a, hook: None)])
    # compiled mx.fast path vs the hooked path: different kernels, so compare relative to the logits' scale
    assert_close(ident, fast, 1e-5)
    assert_close(none_ret, fast, 1e-5)
    assert not stories.has_any_hooks


def test_ablation_hook_changes_output_and_is_removed(stories):
    toks = stories.to_tokens("Once upon a time")
    clean = stories(toks)
    ablated = stories.run_with_hooks(toks, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z * 0)])
    assert mx.abs(clean - ablated).max().item() > 1e-2
    # zeroing z of every layer is the same as zeroing attn_out (no o bias)
    a = stories.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), lambda z, hook: z * 0)])
    b = stories.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("hook_attn_out"), lambda z, hook: z * 0)])
    assert_close(a, b, 1e-5)
    assert mx.abs(stories(toks) - clean).max().item() == 0.0


def test_hooks_context_nesting_and_permanent(stories):
    toks = stories.to_tokens("Once upon a time")
    seen = []

    def rec(tag):
        def fn(act, hook):
            seen.append((tag, hook.name, hook.layer()))
        return fn

    stories.add_hook("blocks.0.hook_resid_pre", rec("perm"), is_permanent=True)
    try:
        with stories.hooks(fwd_hooks=[("blocks.1.hook_resid_post", rec("outer"))]):
            with stories.hooks(fwd_hooks=[(lambda n: n == "blocks.2.hook_resid_post", rec("inner"))]):
                stories(toks)
                assert {s[0] for s in seen} == {"perm", "outer", "inner"}
            seen.clear()
            stories(toks)
            assert {s[0] for s in seen} == {"perm", "outer"}
            assert ("outer", "blocks.1.hook_resid_post", 1) in seen
        seen.clear()
        stories.reset_hooks()
        stories(toks)
        assert [s[0] for s in seen] == ["perm"]
    finally:
        stories.reset_hooks(including_permanent=True)
    seen.clear()
    stories(toks)
    assert seen == []


def test_hook_ctx_and_tl_tuple_keys(stories):
    toks = stories.to_tokens("Once upon a time")
    _, cache = stories.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    assert len(cache) == stories.cfg.n_layers
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["pattern", -1] is cache["blocks.4.attn.hook_pattern"]
    assert cache["pattern0"] is cache["blocks.0.attn.hook_pattern"]
    assert get_act_name("k6") == "blocks.6.attn.hook_k"
    assert get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale"
    assert get_act_name("embed") == "hook_embed"
    assert get_act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    with pytest.raises(KeyError, match="was not cached"):
        cache["resid_pre", 0]
    single = ActivationCache(dict(cache.items()), stories).remove_batch_dim()
    assert single["pattern", 0].shape == (8, 5, 5)
    assert isinstance(cache.to_numpy()["blocks.0.attn.hook_pattern"], np.ndarray)


def test_incl_bwd_gradients_match_finite_differences(stories):
    toks = stories.to_tokens("Once upon a time there")
    target = 432

    def metric(logits):
        return nn.log_softmax(logits[0, -1].astype(mx.float32))[target]

    names = ["blocks.1.hook_resid_mid", "blocks.2.attn.hook_v", "blocks.3.mlp.hook_post"]
    out, cache = stories.run_with_cache(toks, names_filter=names, incl_bwd=True, metric=metric)
    rng = np.random.default_rng(0)
    for name in names:
        g = np.array(cache[name + "_grad"])
        assert g.shape == tuple(cache[name].shape)
        assert np.abs(g).max() > 0
        for _ in range(2):
            idx = tuple(int(rng.integers(0, s)) for s in g.shape)
            idx = (0, g.shape[1] - 1 - idx[1] % 2) + idx[2:]  # positions that reach the last logit
            eps = 1e-2

            def bump(act, hook, sign, idx=idx, eps=eps):
                d = np.zeros(act.shape, np.float32)
                d[idx] = sign * eps
                return act + mx.array(d)

            plus = metric(stories.run_with_hooks(toks, fwd_hooks=[(name, lambda a, h: bump(a, h, 1))])).item()
            minus = metric(stories.run_with_hooks(toks, fwd_hooks=[(name, lambda a, h: bump(a, h, -1))])).item()
            fd = (plus - minus) / (2 * eps)
            assert abs(fd - g[idx]) <= 2e-3 + 2e-2 * abs(fd), (name, idx, fd, g[idx])
    # loss output is a scalar: no metric needed
    _, c2 = stories.run_with_cache(toks, names_filter="blocks.0.hook_resid_pre", incl_bwd=True, return_type="loss")
    assert c2["blocks.0.hook_resid_pre_grad"].shape == c2["resid_pre", 0].shape
    with pytest.raises(ValueError, match="scalar"):
        stories.run_with_cache(toks, names_filter="blocks.0.hook_resid_pre", incl_bwd=True)


def test_bwd_hooks_see_the_gradient_and_can_replace_it(stories):
    """run_with_hooks(bwd_hooks=...): each hook gets d metric / d activation (what incl_bwd caches), from the
    last hooked point to the first; a returned array replaces the gradient that flows on upstream."""
    toks = stories.to_tokens("Once upon a time there")
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"]
    _, cache = stories.run_with_cache(toks, names_filter=names, incl_bwd=True, return_type="loss")
    seen, order = {}, []

    def record(grad, hook):
        seen[hook.name] = np.array(grad)
        order.append(hook.name)

    loss = stories.run_with_hooks(toks, return_type="loss", bwd_hooks=[(n, record) for n in names])
    assert_close(loss, stories(toks, return_type="loss"), 1e-6)
    assert order == list(reversed(names))
    for n in names:
        assert_close(seen[n], cache[n + "_grad"], 1e-5, err_msg=n)
        assert np.abs(seen[n]).max() > 0
    # every path from blocks.0 to the loss passes blocks.1.hook_resid_pre: zero the gradient there
    seen.clear()
    stories.run_with_hooks(toks, return_type="loss", bwd_hooks=[
        ("blocks.1.hook_resid_pre", lambda g, hook: mx.zeros_like(g)), ("blocks.0.hook_resid_pre", record)])
    assert np.abs(seen["blocks.0.hook_resid_pre"]).max() == 0
    # a forward hook and a metric: the gradient of the metric through the hooked forward
    target = 432

    def metric(logits):
        return nn.log_softmax(logits[0, -1].astype(mx.float32))[target]

    double = ("blocks.1.hook_resid_pre", lambda act, hook: act * 2)
    stories.add_hook(*double)
    try:
        _, c2 = stories.run_with_cache(toks, names_filter="blocks.0.hook_resid_pre", incl_bwd=True, metric=metric)
    finally:
        stories.reset_hooks()
    seen.clear()
    stories.run_with_hooks(toks, fwd_hooks=[double], bwd_hooks=[("blocks.0.hook_resid_pre", record)], metric=metric)
    assert_close(seen["blocks.0.hook_resid_pre"], c2["blocks.0.hook_resid_pre_grad"], 1e-5)
    with pytest.raises(ValueError, match="scalar"):
        stories.run_with_hooks(toks, bwd_hooks=[("blocks.0.hook_resid_pre", record)])
    with pytest.raises(ValueError, match="expected an mx.array of shape"):
        stories.run_with_hooks(toks, return_type="loss",
                               bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, hook: g[0])])
    with pytest.raises(ValueError, match="run_with_hooks"):
        stories.add_hook("blocks.0.hook_resid_pre", record, dir="bwd")


def test_loss_and_stop_at_layer(stories):
    toks = stories.to_tokens("Once upon a time, there was a little girl")
    logits, loss = stories(toks, return_type="both")
    logp = nn.log_softmax(logits[:, :-1], axis=-1)
    want = -mx.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()
    assert_close(loss, want, 1e-5)
    per = stories(toks, return_type="loss", loss_per_token=True)
    assert per.shape == (1, toks.shape[1] - 1)
    _, cache = stories.run_with_cache(toks)
    resid = stories(toks, stop_at_layer=2)
    assert_close(resid, cache["resid_pre", 2], tol=1e-5)
    rest = stories(resid, start_at_layer=2)
    assert_close(rest, logits, tol=1e-4)
    assert stories(toks, return_type=None) is None


def test_tokenization_helpers(stories):
    assert stories.to_str_tokens("Once upon a time") == ["<s>", " Once", " upon", " a", " time"]
    assert stories.to_tokens("Once upon", prepend_bos=False).tolist() == [[403, 407]]
    assert stories.to_tokens("Once upon", prepend_bos=True).tolist() == [[1, 403, 407]]
    assert stories.to_single_token(" upon") == 407 or stories.to_single_token("upon") == 407
    assert stories.get_token_position(432, [1, 432, 5, 432], mode="last") == 3
    batch = stories.to_tokens(["Once upon a time", "Once"], padding_side="left")
    assert batch.shape == (2, 5) and batch[1, -1].item() == 403
    with pytest.raises(ValueError, match="not a single token"):
        stories.to_single_token("Once upon a time")


def test_canonical_round_trip(tmp_path, family_pair):
    from hooked_mlx.loading import save_canonical

    name, _, model, path = family_pair
    out = save_canonical(model, tmp_path / "canon", tokenizer_dir=path)
    meta = json.loads((out / "config.json").read_text())
    assert meta["hooked_mlx_format"] == 1 and meta["config"]["architecture"] == model.cfg.architecture
    again = HookedTransformer.from_pretrained(out, keep_quantized=True)
    assert mx.abs(again(TOKENS) - model(TOKENS)).max().item() == 0.0
    assert (again.cfg.quantization is None) == (model.cfg.quantization is None)
    assert again.tokenizer is not None
    # no temporary folders left behind
    assert [p.name for p in tmp_path.iterdir()] == ["canon"]


def test_dtype_and_dequantize(tmp_path):
    _, path = build_mlx_lm_checkpoint(tmp_path / "q", TINY_LLAMA, quantize={"group_size": 64, "bits": 4})
    q = HookedTransformer.from_pretrained(path)
    dq = HookedTransformer.from_pretrained(path, dequantize=True)
    assert isinstance(dq.blocks[0].mlp.up_proj, nn.Linear) and not isinstance(dq.blocks[0].mlp.up_proj, nn.QuantizedLinear)
    assert mx.abs(q(TOKENS) - dq(TOKENS)).max().item() < 1e-3
    bf = HookedTransformer.from_pretrained(path, dtype="bfloat16", dequantize=True)
    assert bf.blocks[0].mlp.up_proj.weight.dtype == mx.bfloat16 and bf.cfg.dtype == "bfloat16"
    assert HookedTransformer.from_pretrained(path, dtype=mx.float16).blocks[0].ln1.weight.dtype == mx.float16
    with pytest.raises(ValueError, match="dtype 'float8'"):
        HookedTransformer.from_pretrained(path, dtype="float8")


def test_rope_parameters_config_style(tmp_path):
    """transformers 5 writes RoPE settings only in rope_parameters: they must be read."""
    cfg = {**TINY_LLAMA, "rope_theta": 500000.0}
    ref, path = build_mlx_lm_checkpoint(tmp_path / "old", cfg)
    new_cfg = {k: v for k, v in cfg.items() if k != "rope_theta"}
    new_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (path / "config.json").write_text(json.dumps(new_cfg))
    model = HookedTransformer.from_pretrained(path)
    assert model.cfg.rope_theta == 500000.0
    assert rel_maxdiff(model(TOKENS), ref(TOKENS)) <= 1e-4
    # llama3 scaling given only through rope_parameters
    new_cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}
    (path / "config.json").write_text(json.dumps(new_cfg))
    m2 = HookedTransformer.from_pretrained(path)
    assert m2.cfg.rope_scaling["rope_type"] == "llama3"
    ref_cfg = {**cfg, "rope_scaling": {k: v for k, v in new_cfg["rope_parameters"].items() if k != "rope_theta"}}
    from mlx_lm.models import llama

    ref2 = llama.Model(llama.ModelArgs.from_dict(ref_cfg))
    ref2.update(ref.parameters())
    assert rel_maxdiff(m2(TOKENS), ref2(TOKENS)) <= 1e-4


# -- errors ------------------------------------------------------------------------------------------


def test_unknown_hook_name_lists_closest(stories):
    with pytest.raises(ValueError) as e:
        stories.run_with_hooks("Once", fwd_hooks=[("blocks.0.hook_resid_prex", lambda a, h: a)])
    msg = str(e.value)
    assert "blocks.0.hook_resid_pre" in msg and "Closest valid names" in msg
    with pytest.raises(ValueError, match="attn.hook_pattern"):
        stories.run_with_cache("Once", names_filter=["blocks.0.attn.hook_patern"])
    assert not stories.has_any_hooks


def test_wrong_shape_or_dtype_from_hook(stories):
    toks = stories.to_tokens("Once upon a time")
    with pytest.raises(ValueError, match=re.escape("blocks.1.attn.hook_z")) as e:
        stories.run_with_hooks(toks, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z[:, :2])])
    assert "(1, 2, 8, 8)" in str(e.value) and "(1, 5, 8, 8)" in str(e.value)
    with pytest.raises(ValueError, match="dtype"):
        stories.run_with_hooks(toks, fwd_hooks=[("hook_embed", lambda x, hook: x.astype(mx.float16))])
    with pytest.raises(TypeError, match="must return an mx.array"):
        stories.run_with_hooks(toks, fwd_hooks=[("hook_embed", lambda x, hook: 3.0)])
    assert not stories.has_any_hooks  # the context removed the hooks despite the error


def test_bad_inputs(stories, tmp_path):
    with pytest.raises(ValueError, match="return_type"):
        stories("Once", return_type="logprobs")
    with pytest.raises(ValueError, match="Token ids must lie in"):
        stories(mx.array([[1, 9999]]))
    with pytest.raises(ValueError, match="integer array"):
        stories(mx.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="stop_at_layer=9"):
        stories("Once", stop_at_layer=9)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedTransformer.from_pretrained(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "mamba"}))
    mx.save_safetensors(str(tmp_path / "bad" / "model.safetensors"), {"x": mx.zeros(1)})
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported. Supported model_types: .*llama"):
        HookedTransformer.from_pretrained(tmp_path / "bad")


def test_mismatched_checkpoint_error(tmp_path):
    _, path = build_mlx_lm_checkpoint(tmp_path / "m", TINY_LLAMA)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing .*blocks.2"):
        HookedTransformer.from_pretrained(path)


def test_hub_id_offline(monkeypatch, tmp_path, tiny_llama_path):
    """Hub ids resolve from the local HF cache offline; absent ones give a clear error."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        HookedTransformer.from_pretrained("someone/not-there")
    snap = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama_path, snap)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    model = HookedTransformer.from_pretrained("someone/tiny")
    ref = HookedTransformer.from_pretrained(tiny_llama_path)
    assert mx.abs(model(TOKENS) - ref(TOKENS)).max().item() == 0.0

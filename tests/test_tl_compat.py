"""TransformerLens names that its users reach for: utils, hook_points, FactoredMatrix at the top level,
per-module weight views, loss_fn, state_dict. Values are checked against the model's own computation."""

from __future__ import annotations

import hooked_mlx
from hooked_mlx import FactoredMatrix, utils
from hooked_mlx.hook_points import HookedRootModule, HookPoint
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tolerance import assert_close


def test_top_level_names():
    assert HookPoint is hooked_mlx.HookPoint and HookedRootModule is hooked_mlx.HookedRootModule
    assert FactoredMatrix is hooked_mlx.factored_matrix.FactoredMatrix
    assert utils.get_act_name("resid_pre", 2) == "blocks.2.hook_resid_pre"


def test_per_module_weight_views_are_the_stacked_views(stories):
    m = stories
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V"):
        for layer in (0, m.cfg.n_layers - 1):
            assert np.array_equal(np.array(getattr(m.blocks[layer].attn, name)), np.array(getattr(m, name)[layer])), name
    assert m.blocks[0].attn.W_K.shape == (m.cfg.n_heads, m.cfg.d_model, m.cfg.d_head)  # GQA repeated
    assert m.blocks[0].attn._W_K.shape == (m.cfg.n_key_value_heads, m.cfg.d_model, m.cfg.d_head)
    assert np.array_equal(np.array(m.embed.W_E), np.array(m.W_E))
    assert np.array_equal(np.array(m.unembed.W_U), np.array(m.W_E.T))  # tied embeddings
    # the views compute what the model computes: q = ln1(resid_pre) @ W_Q + b_Q (ln1's weight unfolded)
    toks = m.to_tokens("Once upon a time")
    _, cache = m.run_with_cache(toks, names_filter=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q"])
    x = m.blocks[0].ln1(cache["blocks.0.hook_resid_pre"])
    q = mx.einsum("bpd,hde->bphe", x, m.blocks[0].attn.W_Q) + m.blocks[0].attn.b_Q
    assert_close(q, cache["blocks.0.attn.hook_q"], 1e-5)


def test_loss_fn_state_dict_and_utils_losses(stories):
    toks = stories.to_tokens(["Once upon a time there was", "The cat sat on the mat and"])
    logits, loss = stories(toks, return_type="both")
    assert_close(stories.loss_fn(logits, toks), loss, 1e-6)
    assert_close(utils.lm_cross_entropy_loss(logits, toks, per_token=True),
                 stories(toks, return_type="loss", loss_per_token=True), 1e-6)
    acc = utils.lm_accuracy(logits, toks, per_token=True)
    assert np.array_equal(np.array(acc), np.array(mx.argmax(logits[:, :-1], -1) == toks[:, 1:]))
    sd = stories.state_dict()
    assert "blocks.0.attn.q_proj.weight" in sd and len(sd) == len(dict(nn.utils.tree_flatten(stories.parameters())))
    assert np.array_equal(np.array(sd["embed.weight"]), np.array(stories.W_E))


def test_to_numpy_and_get_corner():
    a = mx.arange(24).reshape(2, 3, 4).astype(mx.bfloat16)
    assert utils.to_numpy(a).dtype == np.float32 and utils.to_numpy([1, 2]).tolist() == [1, 2]
    assert utils.get_corner(a, 2).shape == (2, 2, 2)
    A, B = mx.random.normal((5, 2), key=mx.random.key(0)), mx.random.normal((2, 6), key=mx.random.key(1))
    fm = FactoredMatrix(A, B)
    assert_close(utils.get_corner(fm, 3), (A @ B)[:3, :3], 1e-6)
    assert_close(utils.to_numpy(fm), A @ B, 1e-6)
    with pytest.raises(TypeError, match="to_numpy takes"):
        utils.to_numpy(object())


def test_test_prompt_ranks_match_the_logits(stories, capsys):
    ranks = utils.test_prompt("Once upon a time, there was a little", "girl", stories, top_k=3)
    out = capsys.readouterr().out
    assert "Tokenized prompt:" in out and "Ranks of the answer tokens:" in out
    prompt = stories.to_tokens("Once upon a time, there was a little")
    answer = stories.to_tokens(" girl", prepend_bos=False)
    logits = stories(mx.concatenate([prompt, answer], axis=1))
    n = prompt.shape[1]
    want = [int((np.array(logits[0, n + j - 1]) > np.array(logits[0, n + j - 1])[int(answer[0, j])]).sum())
            for j in range(answer.shape[1])]
    assert [r for _, r in ranks] == want
    assert [t for t, _ in ranks] == stories.to_str_tokens(answer[0])


def test_tokenize_and_concatenate_rows(stories):
    texts = ["Once upon a time there was a cat.", "The dog ran to the park and played."] * 8
    ds = utils.tokenize_and_concatenate(texts, stories.tokenizer, max_length=12)
    toks = np.array(ds["tokens"])
    tok = stories.tokenizer
    ids = tok.encode(tok.eos_token.join(texts), add_special_tokens=False)
    rows = len(ids) // 11
    assert toks.shape == (rows, 12)
    assert (toks[:, 0] == tok.bos_token_id).all()
    assert toks[:, 1:].reshape(-1).tolist() == ids[: rows * 11]
    no_bos = utils.tokenize_and_concatenate({"text": texts}, tok, max_length=12, add_bos_token=False)["tokens"]
    assert np.array(no_bos).reshape(-1).tolist() == ids[: (len(ids) // 12) * 12]
    with pytest.raises(ValueError, match="fewer than one row"):
        utils.tokenize_and_concatenate(["hi"], tok, max_length=1000)


def test_hooked_root_module_subclass_gets_hooks():
    class Tiny(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.hook_mid = HookPoint()
            self.setup()

        def __call__(self, x):
            return self.hook_mid(self.lin(x)) * 2

    t = Tiny()
    x = mx.ones((2, 3))
    with t.hooks([("hook_mid", lambda a, hook: a * 0)]):
        assert np.abs(np.array(t(x))).max() == 0
    assert_close(t(x), t.lin(x) * 2, 1e-6)
    assert list(t.hook_dict) == ["hook_mid"]
    # TransformerLens's HookedRootModule API on a custom module
    assert np.abs(np.array(t.run_with_hooks(x, fwd_hooks=[("hook_mid", lambda a, hook: a * 0)]))).max() == 0
    out, cache = t.run_with_cache(x, incl_bwd=True, metric=lambda o: o.sum())
    assert_close(cache["hook_mid"], t.lin(x), 1e-6)
    assert_close(cache["hook_mid_grad"], mx.full((2, 3), 2.0), 1e-6)  # d sum(2 h) / d h
    seen = {}
    t.run_with_hooks(x, bwd_hooks=[("hook_mid", lambda g, hook: seen.setdefault("g", g))], metric=lambda o: o.sum())
    assert_close(seen["g"], mx.full((2, 3), 2.0), 1e-6)


def test_bos_rule(stories, capsys, monkeypatch):
    """Where the tokenizer has a BOS token every prompt starts with exactly one (TransformerLens's default),
    whether or not the tokenizer adds it itself and even when the text spells it; prepend_bos=False has none.
    Where there is no BOS token, prompts have none and the model says so once."""
    from hooked_mlx import HookedTransformer
    from hooked_mlx.loading.gguf import find_default_gguf

    bos = stories.bos_token_id
    assert stories.to_tokens("Once upon a time")[0].tolist().count(bos) == 1
    assert stories.to_tokens("Once upon a time")[0, 0].item() == bos
    assert bos not in stories.to_tokens("Once upon a time", prepend_bos=False)[0].tolist()
    try:
        smol = HookedTransformer.from_pretrained(find_default_gguf())  # its tokenizer does not add BOS
    except FileNotFoundError:
        smol = None
    if smol is not None:
        b = smol.bos_token_id
        ids = smol.to_tokens("The capital of France is")[0].tolist()
        assert ids[0] == b and ids.count(b) == 1
        assert smol.to_tokens(smol.tokenizer.decode([b]) + "The capital")[0].tolist().count(b) == 1
        assert b not in smol.to_tokens("The capital of France is", prepend_bos=False)[0].tolist()
    monkeypatch.setattr(HookedTransformer, "bos_token_id", property(lambda self: None))
    capsys.readouterr()
    plain = stories.tokenizer.encode("Once upon a time")
    assert stories.to_tokens("Once upon a time")[0].tolist() == list(plain)
    stories.to_tokens("again")
    assert capsys.readouterr().err.count("defines no BOS token") == 1
    with pytest.raises(ValueError, match="no BOS token"):
        stories.to_tokens("x", prepend_bos=True)
    object.__delattr__(stories, "_said_no_bos")


def test_apply_ln_to_stack_batch_slice_is_transformerlens_s(stories):
    """batch_slice slices the stack's batch axis and the scale's (TL's Slice: an int drops the axis, a tuple is
    slice(*t)); pos_slice says how the stack's positions were sliced."""
    toks = stories.to_tokens(["Once upon a time", "The cat sat on the", "A dog ran to the"])
    _, cache = stories.run_with_cache(toks)
    stack = cache.accumulated_resid(layer=-1, pos_slice=-1)  # [n, batch, d_model]
    scale = cache["ln_final.hook_scale"][:, -1]  # [batch, 1]
    got = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1, batch_slice=1)
    assert got.shape == (stack.shape[0], stack.shape[-1])
    assert_close(got, stack[:, 1] / scale[1], 1e-6)
    got = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1, batch_slice=(1, 3))
    assert_close(got, stack[:, 1:3] / scale[1:3], 1e-6)
    # a stack without a batch axis: only the scale is sliced
    got = cache.apply_ln_to_stack(stack[:, 2], layer=-1, pos_slice=-1, batch_slice=2, has_batch_dim=False)
    assert_close(got, stack[:, 2] / scale[2], 1e-6)
    # logit_attrs passes batch_slice on: row 1's final residual attributes its own final-position logit
    logits = stories(toks)
    full = cache.accumulated_resid(layer=-1, pos_slice=-1)[-1:]  # the final residual only: [1, batch, d_model]
    tok = 123
    attrs = cache.logit_attrs(full, tok, pos_slice=-1, batch_slice=1)
    assert attrs.shape == (1,)
    assert_close(attrs[0], logits[1, -1, tok], 1e-5)


def test_hook_mlp_in_changes_the_mlp_input_only(stories):
    toks = stories.to_tokens("Once upon a time there was")
    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    _, clean = stories.run_with_cache(toks, names_filter=names)
    assert np.array_equal(np.array(clean["blocks.1.hook_mlp_in"]), np.array(clean["blocks.1.hook_resid_mid"]))
    stories.set_use_hook_mlp_in(True)  # TransformerLens's switch: accepted, the hook always exists
    with stories.hooks([("blocks.1.hook_mlp_in", lambda a, hook: a + 1.0)]):  # (RMSNorm ignores a scale)
        _, c = stories.run_with_cache(toks, names_filter=names)
    assert np.array_equal(np.array(c["blocks.1.hook_resid_mid"]), np.array(clean["blocks.1.hook_resid_mid"]))
    assert float(mx.abs(c["blocks.1.hook_mlp_out"] - clean["blocks.1.hook_mlp_out"]).max()) > 1e-3
    assert_close(c["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_mid"] + c["blocks.1.hook_mlp_out"], 1e-6)


def test_attn_result_is_opt_in_as_in_transformerlens(stories):
    """hook_result ([B,P,H,d_model] per layer) is left out of "every hook" and of filter functions until
    set_use_attn_result(True), as in TransformerLens; named explicitly it is computed; the cache can derive it."""
    toks = stories.to_tokens("Once upon a time there was")
    name = "blocks.1.attn.hook_result"
    logits, c = stories.run_with_cache(toks)
    assert name not in c and "blocks.1.attn.hook_z" in c
    with pytest.raises(KeyError, match="set_use_attn_result"):
        c[name]
    assert not [n for n in stories.resolve_hook_names(lambda n: True) if n.endswith("attn.hook_result")]
    c.compute_head_results()
    _, named = stories.run_with_cache(toks, names_filter=name)
    assert_close(named[name], c[name], 1e-5)
    stories.set_use_attn_result(True)
    try:
        logits_on, on = stories.run_with_cache(toks)
        assert name in on
        assert_close(on[name], c[name], 1e-5)
        assert_close(logits_on, logits, 1e-5)
    finally:
        stories.set_use_attn_result(False)
    _, off = stories.run_with_cache(toks)
    assert name not in off


def test_split_qkv_input_and_attn_in(stories):
    """TransformerLens's per-head attention inputs: off by default and left out of every-hook caches; switched
    on they are cached with TL's shapes and change nothing by themselves; a patch of one head's input changes
    that head only; patching every head's q, k and v input with another run's residual gives that run's
    attention output."""
    clean = stories.to_tokens("Once upon a time there was a little girl")
    corrupt = mx.concatenate([clean[:, :3], mx.array([[42]], dtype=clean.dtype), clean[:, 4:]], axis=1)
    B, P = clean.shape
    H, Hkv, dm = stories.cfg.n_heads, stories.cfg.n_key_value_heads, stories.cfg.d_model
    logits, base = stories.run_with_cache(clean)
    assert "blocks.1.hook_q_input" not in base and "blocks.1.hook_attn_in" not in base
    stories.set_use_split_qkv_input(True)
    stories.set_use_attn_in(True)
    try:
        split_logits, c = stories.run_with_cache(clean)
        assert c["blocks.1.hook_attn_in"].shape == (B, P, H, dm)
        assert c["blocks.1.hook_q_input"].shape == (B, P, H, dm)
        assert c["blocks.1.hook_k_input"].shape == c["blocks.1.hook_v_input"].shape == (B, P, Hkv, dm)
        assert_close(split_logits, logits, 1e-5)
        assert_close(c["blocks.1.attn.hook_q"], base["blocks.1.attn.hook_q"], 1e-5)
    finally:
        stories.set_use_split_qkv_input(False)
        stories.set_use_attn_in(False)
    _, corr = stories.run_with_cache(corrupt)
    other = corr["blocks.1.hook_resid_pre"]  # [B, P, dm]

    def patch_head(h):
        def fn(act, hook):
            return mx.concatenate([act[:, :, :h], other[:, :, None], act[:, :, h + 1:]], axis=2)
        return fn

    names = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.1.hook_attn_out"]
    with stories.hooks([("blocks.1.hook_q_input", patch_head(2))]):
        _, p = stories.run_with_cache(clean, names_filter=names)
    # (the per-head path sums in another order than the fused projection: "unchanged" is to 1e-5 of scale)
    tol = 1e-5 * max(1.0, float(mx.abs(base["blocks.1.attn.hook_q"]).max()))
    dq = mx.abs(p["blocks.1.attn.hook_q"] - base["blocks.1.attn.hook_q"]).max(axis=(0, 1, 3))
    assert float(dq[2]) > 1e-3 and float(mx.concatenate([dq[:2], dq[3:]]).max()) <= tol
    assert_close(p["blocks.1.attn.hook_k"], base["blocks.1.attn.hook_k"], 1e-5)
    # head 1's copy of attn_in feeds its query only (KV heads read their group's first head)
    with stories.hooks([("blocks.1.hook_attn_in", patch_head(1))]):
        _, a = stories.run_with_cache(clean, names_filter=names)
    dq = mx.abs(a["blocks.1.attn.hook_q"] - base["blocks.1.attn.hook_q"]).max(axis=(0, 1, 3))
    assert float(dq[1]) > 1e-3 and float(mx.concatenate([dq[:1], dq[2:]]).max()) <= tol
    # every head's q, k and v input from the other run: the other run's attention output at that layer
    every = [(f"blocks.1.hook_{x}_input", lambda act, hook: mx.broadcast_to(other[:, :, None], act.shape))
             for x in "qkv"]
    with stories.hooks(every):
        _, f = stories.run_with_cache(clean, names_filter=names)
    assert_close(f["blocks.1.hook_attn_out"], corr["blocks.1.hook_attn_out"], 1e-5)
    assert float(mx.abs(f["blocks.1.hook_attn_out"] - base["blocks.1.hook_attn_out"]).max()) > 1e-3

"""ActivationCache decompositions, TL weight views and FactoredMatrix, checked against direct computations."""

from __future__ import annotations

from hooked_mlx import HookedTransformer
from hooked_mlx.factored_matrix import FactoredMatrix
import mlx.core as mx
import numpy as np
import pytest
from mlx_fixtures import TINY_LLAMA, build_mlx_lm_checkpoint

TOKENS = mx.array([[1, 5, 9, 200, 3, 77, 100, 11], [1, 300, 2, 8, 99, 45, 60, 61]])

VARIANTS = {
    "llama_gqa_untied": {**TINY_LLAMA, "tie_word_embeddings": False},
    "qwen3_qknorm_bias": {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": False},
    "qwen2_qkv_bias": {**TINY_LLAMA, "model_type": "qwen2"},
}


@pytest.fixture(scope="module", params=["stories"] + sorted(VARIANTS) + ["llama_q4"])
def model(request, tmp_path_factory, stories_path):
    name = request.param
    if name == "stories":
        return HookedTransformer.from_pretrained(stories_path)
    quant = {"group_size": 32, "bits": 4} if name == "llama_q4" else None
    cfg = TINY_LLAMA if name == "llama_q4" else VARIANTS[name]
    _, path = build_mlx_lm_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=3, quantize=quant)
    return HookedTransformer.from_pretrained(path)


@pytest.fixture(scope="module")
def run(model):
    logits, cache = model.run_with_cache(TOKENS, names_filter=list(model.hook_dict))  # hook_result included
    return logits, cache


def close(a, b, tol=1e-4):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, err


# -- decompositions ---------------------------------------------------------------------------------

def test_decompose_resid_sums_to_residual(model, run):
    _, cache = run
    n = model.cfg.n_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and labels[1:3] == ["0_attn_out", "0_mlp_out"] and labels[-1] == f"{n - 1}_mlp_out"
    assert stack.shape == (1 + 2 * n,) + tuple(cache["resid_post", -1].shape)
    close(stack.sum(0), cache["resid_post", -1])
    for layer in range(n):
        close(cache.decompose_resid(layer).sum(0), cache["resid_pre", layer])
        st, lab = cache.decompose_resid(layer, mlp_input=True, return_labels=True)
        assert lab[-1] == f"{layer}_attn_out"
        close(st.sum(0), cache["resid_mid", layer])
    attn, lab = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert lab == [f"{l}_attn_out" for l in range(n)]
    mlp = cache.decompose_resid(mode="mlp", incl_embeds=False)
    close(attn.sum(0) + mlp.sum(0) + cache["hook_embed"], cache["resid_post", -1])


def test_accumulated_resid_and_apply_ln(model, run):
    _, cache = run
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    for l in range(n):
        close(stack[l], cache["resid_pre", l])
    st, lab = cache.accumulated_resid(1, incl_mid=True, mlp_input=True, return_labels=True)
    assert lab == ["0_pre", "0_mid", "1_pre", "1_mid"]
    close(st[-1], cache["resid_mid", 1])
    # apply_ln with the cached scale reproduces the norms' own normalised outputs
    normed = cache.accumulated_resid(apply_ln=True)
    close(normed[-1], cache["ln_final.hook_normalized"])
    close(cache.accumulated_resid(1, apply_ln=True)[-1], cache["normalized", 1, "ln1"])
    close(cache.accumulated_resid(1, apply_ln=True, mlp_input=True)[-1], cache["normalized", 1, "ln2"])
    # pos_slice: last position only, dim dropped
    last = cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    assert last.shape == (n + 1, TOKENS.shape[0], model.cfg.d_model)
    close(last, normed[:, :, -1])
    # a tuple is TransformerLens's Slice: (2, 8) means positions 2..7 (slice(2, 8)), not the indices [2, 8]
    window = cache.accumulated_resid(apply_ln=True, pos_slice=(2, 8))
    assert window.shape == (n + 1, TOKENS.shape[0], 6, model.cfg.d_model)
    close(window, normed[:, :, 2:8])
    close(cache.accumulated_resid(apply_ln=True, pos_slice=[2, 7]), normed[:, :, mx.array([2, 7])])  # a list: indices
    # recompute_ln normalises each component by its own scale
    rec = cache.apply_ln_to_stack(stack, recompute_ln=True)
    x = np.array(stack.astype(mx.float32))
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + model.ln_final.eps)
    close(rec, mx.array(ref))


def test_head_results_and_stack(model, run):
    _, cache = run
    n, H = model.cfg.n_layers, model.cfg.n_heads
    hooked = {l: cache["result", l] for l in range(n)}  # hook_result computed inside attention
    cache.compute_head_results()
    for l in range(n):
        close(cache["result", l], hooked[l])
        out = cache["attn_out", l] - model.b_O[l]
        close(cache["result", l].sum(axis=2), out)
    stack, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[:2] == ["L0H0", "L0H1"] and labels[-2] == f"L{n - 1}H{H - 1}" and labels[-1] == "remainder"
    assert stack.shape[0] == n * H + 1
    close(stack.sum(0), cache["resid_post", -1])
    close(stack[1], cache["result", 0][:, :, 1])


def test_neuron_results(model, run):
    _, cache = run
    l = 1
    res = cache.get_neuron_results(l)
    assert res.shape == tuple(cache["post", l].shape) + (model.cfg.d_model,)
    close(res.sum(-2) + model.b_out[l], cache["mlp_out", l])
    some = cache.get_neuron_results(l, neuron_slice=[3, 7], pos_slice=-1)
    close(some[..., 1, :], cache["post", l][:, -1, 7:8] * model.W_out[l][7])
    stack, labels = cache.stack_neuron_results(2, return_labels=True, incl_remainder=True)
    assert labels[0] == "L0N0" and labels[-2] == f"L1N{model.cfg.d_mlp - 1}"
    close(stack.sum(0), cache._resid_at(2))
    _, lab = cache.stack_neuron_results(2, neuron_slice=slice(0, 4), return_labels=True)
    assert lab == ["L0N0", "L0N1", "L0N2", "L0N3", "L1N0", "L1N1", "L1N2", "L1N3"]


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_full_resid_decomposition(model, run, expand_neurons):
    _, cache = run
    n = model.cfg.n_layers
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=expand_neurons, return_labels=True)
    assert labels[-2:] == ["embed", "bias"] and len(labels) == stack.shape[0]
    close(stack.sum(0), cache["resid_post", -1])
    st = cache.get_full_resid_decomposition(n - 1, mlp_input=True, expand_neurons=expand_neurons, pos_slice=-1)
    close(st.sum(0), cache["resid_mid", n - 1][:, -1])
    close(cache.get_full_resid_decomposition(1, expand_neurons=expand_neurons).sum(0), cache["resid_pre", 1])
    assert n > 1


def test_logit_attrs_sum_to_logits(model, run):
    logits, cache = run
    stack = cache.get_full_resid_decomposition()
    top = mx.argmax(logits[:, -1], axis=-1)  # [B]
    other = mx.array([17, 42])
    # one token per row, last position
    last = cache.get_full_resid_decomposition(pos_slice=-1)
    attrs = cache.logit_attrs(last, top, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], TOKENS.shape[0])
    want = mx.take_along_axis(cache["unembed.hook_out"][:, -1], top[:, None], axis=-1)[:, 0]
    close(attrs.sum(0), want)
    diff = cache.logit_attrs(last, top, incorrect_tokens=other, pos_slice=-1)
    want_diff = want - mx.take_along_axis(cache["unembed.hook_out"][:, -1], other[:, None], axis=-1)[:, 0]
    close(diff.sum(0), want_diff)
    # every position, next-token targets, coarse decomposition
    coarse = cache.decompose_resid()
    tgt = TOKENS
    attrs = cache.logit_attrs(coarse, tgt)
    close(attrs.sum(0), mx.take_along_axis(cache["unembed.hook_out"], tgt[..., None], axis=-1)[..., 0])
    # a single int token: [n, B, P]
    assert cache.logit_attrs(coarse, 5).shape == (coarse.shape[0],) + tuple(TOKENS.shape)


def test_stack_activation_and_remove_batch_dim(model):
    _, cache = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    st = cache.stack_activation("pattern")
    assert st.shape == (model.cfg.n_layers, model.cfg.n_heads, 8, 8)
    close(st[1], cache["pattern", 1])
    close(cache.stack_activation("scale", 2, "ln1")[1], cache["scale", 1, "ln1"])
    stack = cache.get_full_resid_decomposition(pos_slice=-1)
    assert stack.shape[1:] == (model.cfg.d_model,)
    close(stack.sum(0), cache["resid_post", -1][-1])


# -- weights ----------------------------------------------------------------------------------------

def test_weight_views_reproduce_activations(model, run):
    _, cache = run
    cfg = model.cfg
    L, H, dm, dh, dmlp = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    assert model.W_Q.shape == (L, H, dm, dh) and model.W_K.shape == (L, H, dm, dh)
    assert model.W_V.shape == (L, H, dm, dh) and model.W_O.shape == (L, H, dh, dm)
    assert model._W_K.shape == (L, cfg.n_key_value_heads, dm, dh)
    assert model.b_Q.shape == (L, H, dh) and model.b_K.shape == (L, H, dh) and model.b_O.shape == (L, dm)
    assert model.W_in.shape == (L, dm, dmlp) and model.W_gate.shape == (L, dm, dmlp)
    assert model.W_out.shape == (L, dmlp, dm) and model.b_in.shape == (L, dmlp) and model.b_out.shape == (L, dm)
    assert model.W_U.shape == (dm, cfg.d_vocab) and model.W_E.shape == (cfg.d_vocab, dm)
    group = H // cfg.n_key_value_heads
    for l in (0, L - 1):
        x = cache["normalized", l, "ln1"] * model.blocks[l].ln1.effective_weight()  # ln1 output
        q = mx.einsum("bpm,hmd->bphd", x, model.W_Q[l]) + model.b_Q[l]
        k = mx.einsum("bpm,hmd->bphd", x, model.W_K[l]) + model.b_K[l]
        v = mx.einsum("bpm,hmd->bphd", x, model.W_V[l]) + model.b_V[l]
        close(q, cache["q", l])
        close(k[:, :, ::group], cache["k", l])  # GQA: the public view repeats each kv head
        close(v, mx.repeat(cache["v", l], group, axis=2))
        close(mx.einsum("bphd,hdm->bpm", cache["z", l], model.W_O[l]) + model.b_O[l], cache["attn_out", l])
        y = cache["normalized", l, "ln2"] * model.blocks[l].ln2.effective_weight()
        close(y @ model.W_gate[l], cache["pre", l])
        close(y @ model.W_in[l] + model.b_in[l], cache["pre_linear", l])
        close(cache["post", l] @ model.W_out[l] + model.b_out[l], cache["mlp_out", l])
    final = cache["ln_final.hook_normalized"] * model.ln_final.effective_weight()
    close(final @ model.W_U + model.b_U, cache["unembed.hook_out"])
    # OV / QK factored views
    ov, qk = model.OV, model.QK
    assert ov.shape == (L, H, dm, dm) and qk.shape == (L, H, dm, dm)
    close(ov[1, 2].AB, model.W_V[1, 2] @ model.W_O[1, 2])
    close(qk[0, 1].AB, model.W_Q[0, 1] @ model.W_K[0, 1].T)


def test_quantized_views_are_dequantized(tmp_path):
    ref, path = build_mlx_lm_checkpoint(tmp_path / "q", TINY_LLAMA, seed=1, quantize={"group_size": 32, "bits": 4})
    m = HookedTransformer.from_pretrained(path)
    q = ref.model.layers[1].self_attn.q_proj
    w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)  # [H*dh, dm]
    H, dh = m.cfg.n_heads, m.cfg.d_head
    close(m.W_Q[1], w.reshape(H, dh, -1).transpose(0, 2, 1), tol=0)
    assert m.W_Q.dtype == mx.float32 and m.W_out.dtype == mx.float32


# -- FactoredMatrix ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fm():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 12, 4)).astype(np.float32)
    B = rng.standard_normal((3, 4, 12)).astype(np.float32)
    return FactoredMatrix(mx.array(A), mx.array(B)), A @ B


def test_factored_matrix_products_and_svd(fm):
    f, dense = fm
    close(f.AB, mx.array(dense))
    close(f.BA, f.B @ f.A)
    close(f.T.AB, mx.array(dense.transpose(0, 2, 1)))
    U, S, Vh = f.svd()
    assert U.shape == (3, 12, 4) and S.shape == (3, 4) and Vh.shape == (3, 12, 4)
    np.testing.assert_allclose(np.array(S), np.linalg.svd(dense, compute_uv=False)[:, :4], rtol=1e-4, atol=1e-4)
    close(mx.array(np.array(U) * np.array(S)[:, None, :] @ np.array(Vh).transpose(0, 2, 1)), mx.array(dense))
    close(mx.matmul(U.swapaxes(1, 2), U), mx.broadcast_to(mx.eye(4), (3, 4, 4)))
    np.testing.assert_allclose(np.array(f.norm()), np.linalg.norm(dense, axis=(1, 2)), rtol=1e-4)
    ev = np.array(f.eigenvalues)
    ref = np.linalg.eigvals(dense)
    for i in range(3):  # the 4 non-zero eigenvalues of AB
        big = ref[i][np.argsort(-np.abs(ref[i]))][:4]
        np.testing.assert_allclose(np.sort_complex(ev[i]), np.sort_complex(big), rtol=1e-3, atol=1e-3)


def test_factored_matrix_matmul_and_indexing(fm):
    f, dense = fm
    rng = np.random.default_rng(1)
    M = rng.standard_normal((12, 5)).astype(np.float32)
    v = rng.standard_normal(12).astype(np.float32)
    close((f @ mx.array(M)).AB, mx.array(dense @ M))
    close(f @ mx.array(v), mx.array(dense @ v))
    close(f.rmatmul(mx.array(M.T)).AB, mx.array(M.T @ dense))
    close(f.rmatmul(mx.array(v)), mx.array(v @ dense))
    close((f @ f).AB, mx.array(dense @ dense))
    close((2.0 * f).AB, mx.array(2 * dense))
    close(f[1].AB, mx.array(dense[1]))
    close(f[1:, 2:5].AB, mx.array(dense[1:, 2:5]))
    close(f[0, 2:5, 1:3].AB, mx.array(dense[0, 2:5, 1:3]))
    close(f[2, 3, 4].AB, mx.array(dense[2, 3:4, 4:5]))
    close(f.get_corner(3), mx.array(dense[0, :3, :3]))
    with pytest.raises(ValueError, match="inner dims"):
        FactoredMatrix(mx.zeros((3, 4)), mx.zeros((5, 3)))


# -- other architectures: post-norms + soft-caps, learned positions + LayerNorm, parallel blocks, MoE -------

_BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
ARCHS = {
    "gemma2": dict(_BASE, model_type="gemma2", head_dim=16, rms_norm_eps=1e-6, rope_theta=20000.0,
                   query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=4, hidden_activation="gelu_pytorch_tanh"),
    "gpt2": {"model_type": "gpt2", "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 256,
             "layer_norm_epsilon": 1e-5, "vocab_size": 512, "activation_function": "gelu_new"},
    "gpt_neox": {"model_type": "gpt_neox", "max_position_embeddings": 256, "hidden_size": 64,
                 "num_attention_heads": 4, "num_hidden_layers": 2, "layer_norm_eps": 1e-5, "vocab_size": 512,
                 "rotary_emb_base": 20000, "rotary_pct": 0.25, "use_parallel_residual": True,
                 "hidden_act": "gelu_fast", "intermediate_size": 256},
    "mixtral": dict(_BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                    rope_theta=1e6),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_analysis_on_other_architectures(arch, tmp_path):
    from hooked_mlx.models import supported_model_types

    if ARCHS[arch]["model_type"] not in supported_model_types():
        pytest.skip(f"{arch} is not registered yet")
    _, path = build_mlx_lm_checkpoint(tmp_path / arch, ARCHS[arch], seed=1)
    m = HookedTransformer.from_pretrained(path)
    toks = mx.array([[1, 5, 9, 200, 3, 77, 100, 11, 400, 23], [1, 300, 2, 8, 99, 45, 60, 61, 62, 63]])
    logits, cache = m.run_with_cache(toks)
    final = cache["resid_post", -1]
    close(cache.decompose_resid().sum(0), final)
    moe = m.cfg.num_experts is not None
    if moe:
        with pytest.raises(AttributeError, match="mixture of experts"):
            cache.get_full_resid_decomposition()
    full = cache.get_full_resid_decomposition(expand_neurons=not moe)
    close(full.sum(0), final)
    close(cache.get_full_resid_decomposition(1, mlp_input=True, expand_neurons=not moe).sum(0),
          cache._resid_at(1, mlp_input=True))
    # logit attributions sum to the pre-soft-cap logit, up to the final norm's bias and b_U
    top = mx.argmax(logits[:, -1], axis=-1)
    attrs = cache.logit_attrs(full[:, :, -1], top, pos_slice=-1).sum(0)
    offset = m.b_U[top]
    if "bias" in m.ln_final:
        offset = offset + m.ln_final.bias @ m.W_U[:, top]
    want = mx.take_along_axis(cache["unembed.hook_out"][:, -1], top[:, None], axis=-1)[:, 0]
    close(attrs + offset, want)
    # left padding and generation
    mask = mx.array([[1] * 10, [0] * 4 + [1] * 6]).astype(mx.bool_)
    padded = mx.concatenate([toks[:1], mx.concatenate([mx.zeros((1, 4), mx.int32), toks[1:, :6]], axis=1)])
    close(m(padded, attention_mask=mask)[1, 4:], m(toks[1:, :6])[0])
    g = m.generate(toks[1:, :6], 5, do_sample=False, stop_at_eos=False)
    assert g.tolist() == m.generate(toks[1:, :6], 5, do_sample=False, stop_at_eos=False,
                                    use_past_kv_cache=False).tolist()
    gb = m.generate(padded, 5, do_sample=False, stop_at_eos=False, attention_mask=mask)
    assert gb[1, 4:].tolist() == g[0].tolist()
    assert m.logit_lens(toks).top_tokens[-1, :, 0].tolist() == top.tolist()

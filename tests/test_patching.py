"""Activation patching: batched == one-cell-at-a-time, TL shapes, invariants, metrics, length policy."""

from __future__ import annotations

import random

from hooked_mlx import patching as pt
from hooked_mlx.patching.engine import Cell, run_cells_loop
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

P = 8


@pytest.fixture(scope="module")
def setup(stories):
    m = stories
    mx.random.seed(3)
    clean = mx.random.randint(3, m.cfg.d_vocab, (1, P)).astype(mx.int32)
    corrupted = mx.array(clean)
    corrupted[0, 3] = (clean[0, 3] + 11) % m.cfg.d_vocab
    corrupted[0, 6] = (clean[0, 6] + 29) % m.cfg.d_vocab
    clean_logits, cache = m.run_with_cache(clean)
    corr_logits = m(corrupted)
    a = int(mx.argmax(clean_logits[0, -1]))
    b = int(mx.argmax(corr_logits[0, -1]))
    if a == b:
        b = int(mx.argsort(clean_logits[0, -1])[-2])
    metric = pt.LogitDiff(a, b)
    return dict(m=m, clean=clean, corrupted=corrupted, cache=cache, metric=metric,
                clean_value=float(metric(clean_logits)), corr_value=float(metric(corr_logits)))


def _loop(s, cells):
    clean = {c.name: s["cache"][c.name] for c in cells}
    return np.array(run_cells_loop(s["m"], s["corrupted"], clean, cells, s["metric"]))


def test_resid_pre_batched_equals_loop_and_tl_shape(setup):
    s, m = setup, setup["m"]
    batched = pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"])
    assert batched.shape == (m.cfg.n_layers, P) and batched.dtype == mx.float32
    loop = pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"], batched=False)
    np.testing.assert_allclose(np.array(batched), np.array(loop), atol=1e-5, rtol=0)
    # the effect is real: the corrupted positions matter at layer 0, untouched positions do nothing there
    assert abs(float(batched[0, 3]) - s["corr_value"]) > 0.5 and abs(float(batched[0, 6]) - s["corr_value"]) > 0.5
    assert_close(float(batched[0, 0]), s["corr_value"], tol=1e-5)
    # every engine variant gives the same grid
    for kw in (dict(reuse_kv=False), dict(bucket=True), dict(memory_budget_mb=0.01), dict(blas_threads=None),
               dict(skip_identical=False)):
        other = pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"], **kw)
        np.testing.assert_allclose(np.array(other), np.array(loop), atol=1e-5, rtol=0, err_msg=str(kw))


@pytest.mark.parametrize("fn,hook,shape,cell", [
    ("get_act_patch_attn_out", "hook_attn_out", lambda c: (c.n_layers, P), lambda l, i: (i[0], None)),
    ("get_act_patch_mlp_out", "hook_mlp_out", lambda c: (c.n_layers, P), lambda l, i: (i[0], None)),
    ("get_act_patch_resid_mid", "hook_resid_mid", lambda c: (c.n_layers, P), lambda l, i: (i[0], None)),
    ("get_act_patch_attn_head_out_by_pos", "attn.hook_z", lambda c: (c.n_layers, P, c.n_heads),
     lambda l, i: (i[0], i[1], None)),
    ("get_act_patch_attn_head_q_by_pos", "attn.hook_q", lambda c: (c.n_layers, P, c.n_heads),
     lambda l, i: (i[0], i[1], None)),
    ("get_act_patch_attn_head_k_by_pos", "attn.hook_k", lambda c: (c.n_layers, P, c.n_key_value_heads),
     lambda l, i: (i[0], i[1], None)),
    ("get_act_patch_attn_head_v_by_pos", "attn.hook_v", lambda c: (c.n_layers, P, c.n_key_value_heads),
     lambda l, i: (i[0], i[1], None)),
    ("get_act_patch_attn_head_out_all_pos", "attn.hook_z", lambda c: (c.n_layers, c.n_heads),
     lambda l, i: (None, i[0], None)),
    ("get_act_patch_attn_head_k_all_pos", "attn.hook_k", lambda c: (c.n_layers, c.n_key_value_heads),
     lambda l, i: (None, i[0], None)),
    ("get_act_patch_attn_head_pattern_all_pos", "attn.hook_pattern", lambda c: (c.n_layers, c.n_heads),
     lambda l, i: (i[0], None, None)),
    ("get_act_patch_attn_head_pattern_by_pos", "attn.hook_pattern", lambda c: (c.n_layers, c.n_heads, P),
     lambda l, i: (i[0], i[1], None)),
    ("get_act_patch_attn_head_pattern_dest_src_pos", "attn.hook_pattern",
     lambda c: (c.n_layers, c.n_heads, P, P), lambda l, i: (i[0], i[1], i[2])),
])
def test_grids_match_loop_on_sampled_cells(setup, fn, hook, shape, cell):
    s, m = setup, setup["m"]
    grid = getattr(pt, fn)(m, s["corrupted"], s["cache"], s["metric"])
    assert grid.shape == shape(m.cfg)
    rng = random.Random(0)
    idx = [tuple(rng.randrange(d) for d in grid.shape) for _ in range(10)]
    cells = [Cell(f"blocks.{i[0]}.{hook}", cell(i[0], i[1:])) for i in idx]
    ref = _loop(s, cells)
    got = np.array([float(grid[i]) for i in idx])
    if "dest_src" in fn:  # a src > dest entry is masked (0 in both runs): patching it changes nothing
        assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_block_every_and_all_pos_every(setup):
    s, m = setup, setup["m"]
    L, H = m.cfg.n_layers, m.cfg.n_heads
    every = pt.get_act_patch_block_every(m, s["corrupted"], s["cache"], s["metric"])
    assert every.shape == (3, L, P)
    assert_close(np.array(every[0]), np.array(pt.get_act_patch_resid_pre(
        m, s["corrupted"], s["cache"], s["metric"])), tol=1e-5)
    assert_close(np.array(every[2]), np.array(pt.get_act_patch_mlp_out(
        m, s["corrupted"], s["cache"], s["metric"])), tol=1e-5)
    heads = pt.get_act_patch_attn_head_all_pos_every(m, s["corrupted"], s["cache"], s["metric"])
    assert heads.shape == (5, L, H)
    Hkv = m.cfg.n_key_value_heads
    assert float(mx.abs(heads[2, :, Hkv:]).max()) == 0.0  # k over KV heads, zero-padded to H (TL #980)
    assert_close(np.array(heads[2, :, :Hkv]), np.array(pt.get_act_patch_attn_head_k_all_pos(
        m, s["corrupted"], s["cache"], s["metric"])), tol=1e-5)


def test_invariants_clean_into_clean_and_patch_everything(setup):
    s, m = setup, setup["m"]
    # patching the clean run into itself gives the clean metric in every cell
    same = pt.get_act_patch_resid_pre(m, s["clean"], s["cache"], s["metric"])
    assert_close(np.array(same), s["clean_value"], tol=1e-5)
    # patching everything (resid_pre of layer 0 at every position) gives the clean result
    every_pos = pt.generic_activation_patch(m, s["corrupted"], s["cache"], s["metric"], "resid_pre",
                                            index_axis_names=["layer"])
    assert every_pos.shape == (m.cfg.n_layers,)
    assert_close(float(every_pos[0]), s["clean_value"], tol=1e-5)
    # KL(clean || patched) is 0 everywhere when patching clean into clean, and > 0 for real patches
    kl = pt.KLDivergence(m(s["clean"]))
    assert_close(np.array(pt.get_act_patch_resid_pre(m, s["clean"], s["cache"], kl)), 0.0, tol=1e-5)
    kl_grid = np.array(pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], kl))
    assert np.isfinite(kl_grid).all() and kl_grid[0, 6] < kl_grid[0, 0] and kl_grid.min() > -1e-6
    # the final residual at the metric's position decides the metric
    last = pt.get_act_patch_resid_post(m, s["corrupted"], s["cache"], s["metric"])
    assert_close(float(last[-1, -1]), s["clean_value"], tol=1e-5)


def test_generic_activation_patch_index_sets(setup):
    s, m = setup, setup["m"]
    grid = pt.generic_activation_patch(m, s["corrupted"], s["cache"], s["metric"], "z",
                                       index_axis_names=["layer", "head_index"])
    ref = pt.get_act_patch_attn_head_out_all_pos(m, s["corrupted"], s["cache"], s["metric"])
    assert_close(np.array(grid), np.array(ref), tol=1e-5)
    rows = [{"layer": 1, "pos": 6, "neuron": 7}, {"layer": 3, "pos": 7, "neuron": 100}]
    vals = pt.generic_activation_patch(m, s["corrupted"], s["cache"], s["metric"], "post", index_df=rows)
    cells = [Cell("blocks.1.mlp.hook_post", (6, 7)), Cell("blocks.3.mlp.hook_post", (7, 100))]
    assert_close(np.array(vals), _loop(s, cells), tol=1e-5)
    # TL's patch_setter form (one forward per cell)
    def setter(act, idx, clean):
        p, = idx
        out = mx.array(act)
        out[:, p] = clean[:, p]
        return out
    custom = pt.generic_activation_patch(m, s["corrupted"], s["cache"], s["metric"], "resid_pre",
                                         index_axis_names=["layer", "pos"], patch_setter=setter)
    assert_close(np.array(custom), np.array(pt.get_act_patch_resid_pre(
        m, s["corrupted"], s["cache"], s["metric"])), tol=1e-5)
    # the clean input instead of a cache; a plain callable metric (full logits) instead of a Metric
    a, b = int(s["metric"].correct), int(s["metric"].incorrect)
    plain = pt.get_act_patch_attn_out(m, s["corrupted"], s["clean"], lambda lg: lg[0, -1, a] - lg[0, -1, b])
    assert_close(np.array(plain), np.array(pt.get_act_patch_attn_out(
        m, s["corrupted"], s["cache"], s["metric"])), tol=1e-5)


# -- metrics ------------------------------------------------------------------------------------------
def test_metrics_float32_on_128k_vocab_and_normalised():
    mx.random.seed(0)
    V, dm = 128_256, 64
    W_U = (mx.random.normal((dm, V)) * 40.0).astype(mx.bfloat16)  # large logits: fp16/bf16 softmax overflows
    resid = mx.random.normal((2, 3, dm)).astype(mx.bfloat16)
    logits = resid @ W_U  # [2,3,V] bf16, |logit| in the hundreds
    ref = (resid @ W_U).astype(mx.float32) * 0.5
    for metric in (pt.LogProb(5), pt.Prob(5), pt.LogitDiff(5, 7), pt.KLDivergence(ref)):
        v = metric(logits)
        assert v.dtype == mx.float32 and v.shape == () and bool(mx.isfinite(v)), type(metric).__name__
    lp = np.array(logits.astype(mx.float32))[:, -1].astype(np.float64)
    lse = np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1)) + lp.max(-1)
    np.testing.assert_allclose(float(pt.LogProb(5)(logits)), (lp[:, 5] - lse).mean(), rtol=1e-4)
    assert float(pt.KLDivergence(logits)(logits)) == pytest.approx(0.0, abs=1e-4)
    kl = float(pt.KLDivergence(ref)(logits))
    assert kl > 0 and np.isfinite(kl)
    # per-prompt positions and tokens
    per = pt.LogitDiff([5, 6], [7, 8], pos=[1, 2])
    lf = np.array(logits.astype(mx.float32))
    np.testing.assert_allclose(float(per(logits)), ((lf[0, 1, 5] - lf[0, 1, 7]) + (lf[1, 2, 6] - lf[1, 2, 8])) / 2,
                               rtol=1e-5)


def test_normalized_metric(setup):
    s, m = setup, setup["m"]
    norm = s["metric"].normalized(m(s["clean"]), m(s["corrupted"]))
    assert float(norm(m(s["clean"]))) == pytest.approx(1.0, abs=1e-5)
    assert float(norm(m(s["corrupted"]))) == pytest.approx(0.0, abs=1e-5)
    grid = pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], norm)
    raw = pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"])
    assert_close(np.array(grid), (np.array(raw) - s["corr_value"]) /
                               (s["clean_value"] - s["corr_value"]), tol=1e-4)
    with pytest.raises(ValueError, match="cannot be normalised"):
        s["metric"].normalized(m(s["clean"]), m(s["clean"]))


# -- the sequence-length policy --------------------------------------------------------------------------
def test_strict_lengths_error_then_align(stories):
    m = stories
    clean, corrupted = m.to_tokens("Lily and Ben"), m.to_tokens("Lily went to the park")
    assert clean.shape[1] != corrupted.shape[1]
    _, cache = m.run_with_cache(clean)
    metric = pt.LogitDiff(5, 7)
    with pytest.raises(ValueError) as e:
        pt.get_act_patch_resid_pre(m, corrupted, cache, metric, clean_tokens=clean)
    msg = str(e.value)
    Pc, Pk = clean.shape[1], corrupted.shape[1]
    assert f"{Pc} tokens" in msg and f"has {Pk}" in msg
    assert repr(m.to_str_tokens(clean[0])) in msg and repr(m.to_str_tokens(corrupted[0])) in msg
    assert "align='end'" in msg and "align='start'" in msg
    # whole-sequence patches are refused even with align
    with pytest.raises(ValueError, match="whole sequence axis"):
        pt.get_act_patch_attn_head_out_all_pos(m, corrupted, cache, metric, align="end")
    for align, shift in (("end", Pk - Pc), ("start", 0)):
        grid = np.array(pt.get_act_patch_resid_pre(m, corrupted, cache, metric, align=align))
        assert grid.shape == (m.cfg.n_layers, Pk)
        paired = [p for p in range(Pk) if 0 <= p - shift < Pc]
        assert np.isnan(grid[:, [p for p in range(Pk) if p not in paired]]).all()
        assert np.isfinite(grid[:, paired]).all()
        # a paired cell equals the hand-made patch of the aligned clean position
        p = paired[-1]
        def hook(act, hp, p=p, shift=shift):
            out = mx.array(act)
            out[:, p] = cache["blocks.1.hook_resid_pre"][:, p - shift]
            return out
        ref = metric(m.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", hook)]))
        assert float(grid[1, p]) == pytest.approx(float(ref), abs=3e-5)  # logits ~14: float32 rounding
        loop = np.array(pt.get_act_patch_resid_pre(m, corrupted, cache, metric, align=align, batched=False))
        # the logits here are ~ -14 (float32 spacing ~1e-6): batched GEMM shapes round differently
        assert_close(grid, loop, tol=2e-5)


def test_mlxterp_example_3_into_4_tokens(stories):
    """mlxterp crashed patching a 3-token clean run into a 4-token corrupted run: clear error, then align."""
    m = stories
    clean = mx.array([[1, 100, 200]])
    corrupted = mx.array([[1, 100, 300, 200]])
    _, cache = m.run_with_cache(clean)
    metric = pt.LogProb(200)
    with pytest.raises(ValueError, match="clean run has 3 tokens and the corrupted run has 4"):
        pt.get_act_patch_resid_pre(m, corrupted, cache, metric)
    grid = np.array(pt.get_act_patch_resid_pre(m, corrupted, clean, metric, align="end"))
    assert grid.shape == (m.cfg.n_layers, 4) and np.isnan(grid[:, 0]).all() and np.isfinite(grid[:, 1:]).all()
    # whole-layer patch (mlxterp's only kind) of unequal lengths: refused clearly
    with pytest.raises(ValueError, match="3 tokens and the corrupted run has 4"):
        pt.generic_activation_patch(m, corrupted, cache, metric, "resid_pre", index_axis_names=["layer"],
                                    align="end")
    with pytest.raises(ValueError, match="align must be"):
        pt.get_act_patch_resid_pre(m, corrupted, cache, metric, align="middle")


def test_embedding_hook_and_by_pos_every(setup):
    s, m = setup, setup["m"]
    emb = pt.generic_activation_patch(m, s["corrupted"], s["cache"], s["metric"], "hook_embed",
                                      index_axis_names=["pos"])
    assert emb.shape == (P,)
    cells = [Cell("hook_embed", (p, None)) for p in range(P)]
    assert_close(np.array(emb), _loop(s, cells), tol=1e-5)
    # with rotary positions the embedding is resid_pre of layer 0
    assert_close(np.array(emb), np.array(pt.get_act_patch_resid_pre(
        m, s["corrupted"], s["cache"], s["metric"])[0]), tol=1e-5)
    every = pt.get_act_patch_attn_head_by_pos_every(m, s["corrupted"], s["cache"], s["metric"])
    L, H = m.cfg.n_layers, m.cfg.n_heads
    assert every.shape == (5, L, P, H)
    pat = pt.get_act_patch_attn_head_pattern_by_pos(m, s["corrupted"], s["cache"], s["metric"])
    assert_close(np.array(every[4]), np.array(pat.transpose(0, 2, 1)), tol=1e-6)


def test_batch_of_prompts_with_per_prompt_positions(stories):
    m = stories
    mx.random.seed(11)
    clean = mx.random.randint(3, m.cfg.d_vocab, (2, P)).astype(mx.int32)
    corrupted = mx.array(clean)
    corrupted[:, 4] = (clean[:, 4] + 17) % m.cfg.d_vocab
    logits, cache = m.run_with_cache(clean)
    top = [mx.argsort(-logits[0, -1])[:2].tolist(), mx.argsort(-logits[1, 6])[:2].tolist()]
    metric = pt.LogitDiff([top[0][0], top[1][0]], [top[0][1], top[1][1]], pos=[-1, 6])  # per prompt
    grid = pt.get_act_patch_resid_pre(m, corrupted, cache, metric)
    loop = pt.get_act_patch_resid_pre(m, corrupted, cache, metric, batched=False)
    assert_close(np.array(grid), np.array(loop), tol=1e-5)
    assert float(mx.abs(grid[:, 4] - grid[:, 0]).max()) > 1e-3
    heads = pt.get_act_patch_attn_head_v_by_pos(m, corrupted, cache, metric)
    cells = [Cell("blocks.2.attn.hook_v", (5, 1, None)), Cell("blocks.0.attn.hook_v", (4, 3, None))]
    ref = run_cells_loop(m, corrupted, {c.name: cache[c.name] for c in cells}, cells, metric)
    assert_close([float(heads[2, 5, 1]), float(heads[0, 4, 3])], np.array(ref), tol=1e-5)


def test_gpu_engine_settings_give_the_same_grid_on_cpu(setup, monkeypatch):
    """GPUs run with bucketed batch sizes and the full-width last block (engine.split_last_layer=False, which
    works around an MLX CUDA launch failure); the CPU path must give the same grid with those settings."""
    from hooked_mlx.patching import engine as E

    s, m = setup, setup["m"]
    cpu = pt.get_act_patch_attn_head_out_by_pos(m, s["corrupted"], s["cache"], s["metric"])
    orig = E.PatchEngine.__init__
    seen = []

    def gpu_like(self, *a, **k):
        orig(self, *a, **k)
        self.split_last_layer, self.bucket = False, True
        seen.append(self)

    monkeypatch.setattr(E.PatchEngine, "__init__", gpu_like)
    gpu = pt.get_act_patch_attn_head_out_by_pos(m, s["corrupted"], s["cache"], s["metric"])
    assert seen and not seen[0].split_last_layer
    np.testing.assert_allclose(np.array(gpu), np.array(cpu), atol=1e-5, rtol=0)
    assert np.ptp(np.array(cpu)) > 0.1  # a real grid, not a constant

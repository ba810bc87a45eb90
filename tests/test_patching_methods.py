"""Attribution patching, exact path patching, interventions, norm diagnostics and plots."""

from __future__ import annotations

import sys

from hooked_mlx import HookedTransformer
from hooked_mlx import patching as pt
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

P = 8


def _pair(m, seed=3):
    mx.random.seed(seed)
    clean = mx.random.randint(3, m.cfg.d_vocab, (1, P)).astype(mx.int32)
    corrupted = mx.array(clean)
    corrupted[0, 3] = (clean[0, 3] + 11) % m.cfg.d_vocab
    corrupted[0, 6] = (clean[0, 6] + 29) % m.cfg.d_vocab
    cl, co = m(clean), m(corrupted)
    a, b = int(mx.argmax(cl[0, -1])), int(mx.argmax(co[0, -1]))
    if a == b:
        b = int(mx.argsort(cl[0, -1])[-2])
    return clean, corrupted, pt.LogitDiff(a, b)


@pytest.fixture(scope="module")
def pair(stories):
    clean, corrupted, metric = _pair(stories)
    _, cache = stories.run_with_cache(clean)
    return dict(m=stories, clean=clean, corrupted=corrupted, metric=metric, cache=cache,
                corr_value=float(metric(stories(corrupted))), clean_value=float(metric(stories(clean))))


# -- attribution patching ---------------------------------------------------------------------------------
def test_attribution_exact_when_the_patched_path_is_linear(stories_path):
    # ln_final with a huge eps is linear (x / sqrt(eps)), the last MLP is switched off (down_proj = 0) and
    # the metric is linear in the logits: the path from the last layer's z, v (the pattern does not depend
    # on v) and resid_mid to the metric is then linear
    m = HookedTransformer.from_pretrained(stories_path)
    m.ln_final.eps = 1e12
    m.ln_final.weight = m.ln_final.weight * 1e6
    m.blocks[-1].mlp.down_proj.weight = mx.zeros_like(m.blocks[-1].mlp.down_proj.weight)
    clean, corrupted, metric = _pair(m)
    _, cache = m.run_with_cache(clean)
    L = m.cfg.n_layers
    corr_value = float(metric(m(corrupted)))
    act_z = np.array(pt.get_act_patch_attn_head_out_by_pos(m, corrupted, cache, metric))[L - 1] - corr_value
    att_z = np.array(pt.attribution_patch_head_by_pos(m, corrupted, cache, metric, hook="z"))[L - 1]
    assert np.abs(act_z).max() > 0.05
    np.testing.assert_allclose(att_z, act_z, atol=2e-4 * np.abs(act_z).max() + 1e-5)
    act_v = np.array(pt.get_act_patch_attn_head_v_by_pos(m, corrupted, cache, metric))[L - 1] - corr_value
    att_v = np.array(pt.attribution_patch_head_by_pos(m, corrupted, cache, metric, hook="v"))[L - 1]
    np.testing.assert_allclose(att_v, act_v, atol=2e-4 * np.abs(act_v).max() + 1e-5)
    act_m = np.array(pt.get_act_patch_resid_mid(m, corrupted, cache, metric))[L - 1] - corr_value
    att_m = np.array(pt.attribution_patch_resid_mid(m, corrupted, cache, metric))[L - 1]
    np.testing.assert_allclose(att_m, act_m, atol=2e-4 * np.abs(act_m).max() + 1e-5)
    # ... and not exact where the path is nonlinear (layer 0 resid goes through every block)
    act_r = np.array(pt.get_act_patch_resid_pre(m, corrupted, cache, metric)) - corr_value
    att_r = np.array(pt.attribution_patch_resid_pre(m, corrupted, cache, metric))
    assert np.abs(att_r[0] - act_r[0]).max() > 1e-3


def test_attribution_agrees_with_activation_patching_on_stories(pair):
    s, m = pair, pair["m"]
    act = np.array(pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"])) - s["corr_value"]
    att = np.array(pt.attribution_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"]))
    assert att.shape == act.shape == (m.cfg.n_layers, P)
    r_resid = pt.correlation(att, act)
    # heads by position and attention outputs: the linear approximation is good (r ~ 0.99 here) and the
    # largest cells agree in sign; the residual stream at a swapped token's position in early layers is a
    # large, nonlinear change (a known limit of attribution patching), so resid_pre correlates less
    act_h = np.array(pt.get_act_patch_attn_head_out_by_pos(m, s["corrupted"], s["cache"], s["metric"])) - s["corr_value"]
    att_h = np.array(pt.attribution_patch_head_by_pos(m, s["corrupted"], s["cache"], s["metric"]))
    act_a = np.array(pt.get_act_patch_attn_out(m, s["corrupted"], s["cache"], s["metric"])) - s["corr_value"]
    att_a = np.array(pt.attribution_patch_attn_out(m, s["corrupted"], s["cache"], s["metric"]))
    r_heads, r_attn = pt.correlation(att_h, act_h), pt.correlation(att_a, act_a)
    print(f"\nattribution vs activation patching on stories260K: r(resid_pre) = {r_resid:.3f}, "
          f"r(head_out by pos) = {r_heads:.3f}, r(attn_out) = {r_attn:.3f}")
    assert r_resid > 0.5 and r_heads > 0.9 and r_attn > 0.9
    for a, b in ((act_h, att_h), (act_a, att_a)):
        top = np.argsort(-np.abs(a).ravel())[:8]
        assert (np.sign(b.ravel()[top]) == np.sign(a.ravel()[top])).all()
    # positions that were not corrupted have zero attribution (clean == corrupted there at layer 0)
    assert_close(att[0, [0, 1, 2, 4, 5, 7]], 0.0, tol=1e-6)
    heads = pt.attribution_patch_head_by_pos(m, s["corrupted"], s["cache"], s["metric"])
    assert heads.shape == (m.cfg.n_layers, P, m.cfg.n_heads)
    heads_all = pt.attribution_patch_head_all_pos(m, s["corrupted"], s["cache"], s["metric"], hook="k")
    assert heads_all.shape == (m.cfg.n_layers, m.cfg.n_key_value_heads)
    neurons = pt.attribution_patch_neurons(m, s["corrupted"], s["cache"], s["metric"])
    assert neurons.shape == (m.cfg.n_layers, P, m.cfg.d_mlp)
    # summing the attribution over the heads of a layer = attribution of that layer's z
    z = pt.attribution_patch(m, s["corrupted"], s["cache"], s["metric"], ["blocks.2.attn.hook_z"])
    assert_close(np.array(heads[2]), np.array(z["blocks.2.attn.hook_z"].sum(axis=(0, 3))), tol=1e-6)


# -- path patching ----------------------------------------------------------------------------------------
def _head_delta(m, cache, corr_cache, l, h):
    """(clean z - corrupted z) of head (l, h) through W_O: [B, P, dm]."""
    dh = m.cfg.d_head
    dz = cache[f"blocks.{l}.attn.hook_z"][:, :, h] - corr_cache[f"blocks.{l}.attn.hook_z"][:, :, h]
    return dz @ m.blocks[l].attn.o_proj.weight[:, h * dh:(h + 1) * dh].T


def test_path_patch_to_logits_is_the_direct_effect(pair):
    s, m = pair, pair["m"]
    L, H = m.cfg.n_layers, m.cfg.n_heads
    _, corr_cache = m.run_with_cache(s["corrupted"])
    grid = pt.get_path_patch_head_to_final_resid_post(m, s["corrupted"], s["cache"], s["metric"], freeze_mlps=True)
    assert grid.shape == (L, H)
    from hooked_mlx.patching.engine import final_logits

    final = corr_cache[f"blocks.{L - 1}.hook_resid_post"]
    for l, h in [(0, 1), (2, 5), (4, 3)]:
        direct = s["metric"](final_logits(m, final + _head_delta(m, s["cache"], corr_cache, l, h)))
        assert float(grid[l, h]) == pytest.approx(float(direct), abs=1e-5)
    # recomputed MLPs (the default) add the sender -> MLP -> logits paths
    free = pt.get_path_patch_head_to_final_resid_post(m, s["corrupted"], s["cache"], s["metric"])
    assert np.abs(np.array(free) - np.array(grid)).max() > 1e-3
    # single call == batched grid
    one = pt.path_patch(m, s["corrupted"], s["cache"], s["metric"], [(2, 5)], freeze_mlps=True)
    assert float(one) == pytest.approx(float(grid[2, 5]), abs=1e-5)


def test_path_patch_to_receiver_value_input(pair):
    s, m = pair, pair["m"]
    _, corr_cache = m.run_with_cache(s["corrupted"])
    sender, receiver = (0, 6), (2, 1)  # receiver: kv head 1 of layer 2, via its values
    got = pt.path_patch(m, s["corrupted"], s["cache"], s["metric"], [sender], [receiver], receiver_input="v",
                        freeze_mlps=True)
    # by hand: the receiver's input is the corrupted resid_pre[2] plus the sender's direct contribution
    x = corr_cache["blocks.2.hook_resid_pre"] + _head_delta(m, s["cache"], corr_cache, *sender)
    attn, dh = m.blocks[2].attn, m.cfg.d_head
    v = attn.v_proj(m.blocks[2].ln1(x)).reshape(1, P, m.cfg.n_key_value_heads, dh)

    def hook(act, hp):
        sel = (mx.arange(act.shape[2]) == receiver[1])[None, None, :, None]
        return mx.where(sel, v, act)

    ref = s["metric"](m.run_with_hooks(s["corrupted"], fwd_hooks=[("blocks.2.attn.hook_v", hook)]))
    assert float(got) == pytest.approx(float(ref), abs=1e-5)
    assert abs(float(got) - s["corr_value"]) > 1e-4
    # a sender at or after the receiver's layer cannot reach it
    grid = pt.get_path_patch_head_to_heads(m, s["corrupted"], s["cache"], s["metric"], [receiver], "q")
    assert_close(np.array(grid[2:]), s["corr_value"], tol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        pt.path_patch(m, s["corrupted"], s["cache"], s["metric"], [(0, 0)], [(2, 7)], receiver_input="k")


# -- interventions ----------------------------------------------------------------------------------------
def test_interventions(pair):
    s, m = pair, pair["m"]
    toks = s["corrupted"]
    _, base = m.run_with_cache(toks)
    got = {}

    def grab(name):
        return (name, lambda act, hp: got.__setitem__(name, act))

    z = "blocks.1.attn.hook_z"
    m.run_with_hooks(toks, fwd_hooks=[(z, pt.zero_ablate(head=3)), grab(z)])
    ref = np.array(base[z])
    ref[:, :, 3] = 0
    assert_close(np.array(got[z]), ref, tol=1e-5)  # base ran the unfused attention path
    assert float(mx.abs(got[z][:, :, 3]).max()) == 0.0

    r = "blocks.2.hook_resid_pre"
    vec = mx.arange(m.cfg.d_model).astype(mx.float32) / 10
    m.run_with_hooks(toks, fwd_hooks=[(r, pt.compose(pt.scale(2.0, pos=[1, 2]), pt.add_vector(vec, coeff=3.0, pos=-1))),
                                      grab(r)])
    ref = np.array(base[r])
    ref[:, [1, 2]] *= 2
    ref[:, -1] += 3.0 * np.array(vec)
    np.testing.assert_allclose(np.array(got[r]), ref, rtol=1e-5, atol=1e-5)

    m.run_with_hooks(toks, fwd_hooks=[(r, pt.clamp(-0.5, 0.5, pos=slice(0, 4))), grab(r)])
    ref = np.array(base[r])
    ref[:, :4] = np.clip(ref[:, :4], -0.5, 0.5)
    assert_close(np.array(got[r]), ref, tol=1e-5)
    assert float(mx.abs(got[r][:, :4]).max()) <= 0.5

    two = mx.concatenate([toks, s["clean"]])
    _, base2 = m.run_with_cache(two)
    m.run_with_hooks(two, fwd_hooks=[(r, pt.mean_ablate(pos=3)), grab(r)])
    ref = np.array(base2[r])
    ref[:, 3] = ref[:, 3].mean(axis=0)
    assert_close(np.array(got[r]), ref, tol=1e-5)

    m.run_with_hooks(toks, fwd_hooks=[(r, pt.noise(0.1, seed=7)), grab(r)])
    a = np.array(got[r])
    m.run_with_hooks(toks, fwd_hooks=[(r, pt.noise(0.1, seed=7)), grab(r)])
    np.testing.assert_array_equal(np.array(got[r]), a)
    m.run_with_hooks(toks, fwd_hooks=[(r, pt.noise(0.1, seed=8)), grab(r)])
    assert not np.array_equal(np.array(got[r]), a)
    assert 0.05 < float(np.std(a - np.array(base[r]))) < 0.2

    pat = "blocks.0.attn.hook_pattern"
    m.run_with_hooks(toks, fwd_hooks=[(pat, pt.zero_ablate(head=2, pos=5)), grab(pat)])
    assert float(mx.abs(got[pat][:, 2, 5]).max()) == 0.0 and float(got[pat][:, 2, 4].sum()) == pytest.approx(1.0)


def test_replace_with_length_policy(pair):
    s, m = pair, pair["m"]
    short = s["clean"][:, :5]
    _, short_cache = m.run_with_cache(short)
    r = "blocks.1.hook_resid_pre"
    src = short_cache[r]
    with pytest.raises(ValueError, match="5 tokens and the corrupted run has 8"):
        m.run_with_hooks(s["corrupted"], fwd_hooks=[(r, pt.replace_with(src, tokens=(short, s["corrupted"])))])
    got = {}
    m.run_with_hooks(s["corrupted"], fwd_hooks=[(r, pt.replace_with(src, align="end")),
                                                (r, lambda a, hp: got.__setitem__("x", a))])
    _, base = m.run_with_cache(s["corrupted"])
    np.testing.assert_array_equal(np.array(got["x"][:, 3:]), np.array(src))
    assert_close(np.array(got["x"][:, :3]), np.array(base[r][:, :3]), tol=1e-5)
    m.run_with_hooks(s["corrupted"], fwd_hooks=[(r, pt.replace_with(src, align="start")),
                                                (r, lambda a, hp: got.__setitem__("x", a))])
    np.testing.assert_array_equal(np.array(got["x"][:, :5]), np.array(src))


def test_norm_diagnostics_float32():
    x = mx.full((1, 4, 64), 300.0, dtype=mx.float16)
    naive = mx.sqrt(mx.sum(x * x, axis=-1))  # 64 * 90000 overflows float16 (max 65504)
    assert not bool(mx.isfinite(naive).all())
    norms = pt.activation_norm(x)
    assert norms.dtype == mx.float32 and float(norms[0, 0]) == pytest.approx(2400.0)
    store = {}
    hook = pt.record_norms(store)

    class HP:
        name = "blocks.0.hook_resid_pre"

    assert hook(x, HP()) is None and float(store[HP.name][0, 1]) == pytest.approx(2400.0)


# -- plots -----------------------------------------------------------------------------------------------
def test_plot_patching(tmp_path, pair, monkeypatch):
    pytest.importorskip("matplotlib")
    s, m = pair, pair["m"]
    grid = pt.get_act_patch_resid_pre(m, s["corrupted"], s["cache"], s["metric"])
    out = pt.plot_patching(grid, tmp_path / "p.png", labels=m.to_str_tokens(s["corrupted"][0]), title="resid_pre")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    nan_grid = np.array(grid)
    nan_grid[:, 0] = np.nan
    pt.plot_patching(nan_grid, tmp_path / "nan.png")
    with pytest.raises(ValueError, match="labels for"):
        pt.plot_patching(grid, tmp_path / "x.png", labels=["a"])
    with pytest.raises(ValueError, match="2-D"):
        pt.plot_patching(np.zeros((2, 3, 4)), tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"hooked-mlx\[plot\]"):
        pt.plot_patching(grid, tmp_path / "y.png")

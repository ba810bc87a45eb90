"""Batches of unequal length (left / right padding, masks, per-row positions) and start/stop layers."""

from __future__ import annotations

from hooked_mlx import HookedTransformer
import mlx.core as mx
import numpy as np
import pytest
from mlx_fixtures import TINY_LLAMA, build_mlx_lm_checkpoint
from tolerance import assert_close

TEXTS = ["Once upon a time there was a little", "The cat", "Lily saw a big red ball and"]


@pytest.fixture(scope="module", params=["stories", "qwen3"])
def model(request, stories_path, tmp_path_factory):
    if request.param == "stories":
        return HookedTransformer.from_pretrained(stories_path)
    cfg = {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": False}
    _, path = build_mlx_lm_checkpoint(tmp_path_factory.mktemp("qwen3pad"), cfg, seed=5)
    return HookedTransformer.from_pretrained(path)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_prompts_alone(model, side):
    toks, mask = model.to_tokens(TEXTS, padding_side=side, return_mask=True)
    lens = [len(model.to_tokens(t)[0]) for t in TEXTS]
    assert mask.sum(axis=1).tolist() == lens
    logits, cache = model.run_with_cache(TEXTS, padding_side=side)
    assert np.array_equal(np.array(cache.attention_mask), np.array(mask))
    m = np.array(mask)
    for i, text in enumerate(TEXTS):
        alone_logits, alone = model.run_with_cache(text)
        np.testing.assert_allclose(np.array(logits[i])[m[i]], np.array(alone_logits[0]), atol=1e-4, rtol=0)
        for name in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.ln2.hook_scale"):
            assert_close(np.array(cache[name][i])[m[i]], np.array(alone[name][0]), tol=1e-4)
        pat = np.array(cache["pattern", 1][i])[:, m[i]][:, :, m[i]]
        assert_close(pat, np.array(alone["pattern", 1][0]), tol=1e-5)
        # pad positions are neutral in the cache: 0 activations/patterns, 1 scales, -inf scores
        pads = ~m[i]
        if pads.any():
            assert np.all(np.array(cache["resid_post", 1][i])[pads] == 0)
            assert np.all(np.array(cache["post", 0][i])[pads] == 0)
            assert np.all(np.array(cache["scale", 0, "ln1"][i])[pads] == 1)
            assert np.all(np.array(cache["pattern", 0][i])[:, pads] == 0)
            assert np.all(np.array(cache["pattern", 0][i])[:, :, pads] == 0)
            assert np.all(np.isneginf(np.array(cache["attn_scores", 0][i])[:, :, pads]))
    assert np.isfinite(np.array(logits)).all()
    # the same batch as pre-tokenized ids with the mask gives the same logits
    again = model(toks, attention_mask=mask)
    assert_close(np.array(again), np.array(logits), tol=1e-5)


def test_padded_loss_skips_pads(model):
    toks, mask = model.to_tokens(TEXTS, padding_side="left", return_mask=True)
    per = model(TEXTS, padding_side="left", return_type="loss", loss_per_token=True)
    m = np.array(mask)
    for i, text in enumerate(TEXTS):
        alone = model(text, return_type="loss", loss_per_token=True)[0]
        keep = m[i, 1:] & m[i, :-1]
        assert_close(np.array(per[i])[keep], np.array(alone), tol=1e-4)
        assert np.all(np.array(per[i])[~keep] == 0)
    mean = model(TEXTS, padding_side="left", return_type="loss")
    assert_close(float(mean), float(np.array(per).sum() / (m[:, 1:] & m[:, :-1]).sum()), 1e-5)


def test_mask_with_hole_is_rejected(model):
    toks = mx.array([[1, 5, 9, 7]])
    with pytest.raises(ValueError, match="contiguous"):
        model(toks, attention_mask=mx.array([[True, False, True, True]]))
    with pytest.raises(ValueError, match="positions"):
        model(toks, attention_mask=mx.array([[True, True]]))


def test_start_and_stop_layers_on_every_call_path(model):
    n = model.cfg.n_layers
    toks, mask = model.to_tokens(TEXTS, padding_side="left", return_mask=True)
    full, cache = model.run_with_cache(toks, attention_mask=mask)
    for k in range(1, n):
        resid = model(toks, stop_at_layer=k, attention_mask=mask)
        assert_close(np.array(resid) * np.array(mask)[..., None],
                                   np.array(cache.cache_dict[f"blocks.{k - 1}.hook_resid_post"]), tol=1e-5)
        resid = model(toks, stop_at_layer=k, attention_mask=mask)
        out = model(resid, start_at_layer=k, attention_mask=mask)
        assert_close(np.array(out), np.array(full), tol=1e-4)
    # negative indices, run_with_hooks and run_with_cache
    r = model.run_with_hooks(toks, stop_at_layer=-1, attention_mask=mask,
                             fwd_hooks=[("blocks.0.hook_resid_post", lambda a, h: a * 1.0)])
    assert_close(np.array(r), np.array(model(toks, stop_at_layer=n - 1, attention_mask=mask)), tol=1e-6)
    mid, c2 = model.run_with_cache(toks, stop_at_layer=1, attention_mask=mask)
    assert "blocks.0.hook_resid_post" in c2 and "blocks.1.hook_resid_pre" not in c2
    out, c3 = model.run_with_cache(mid, start_at_layer=1, attention_mask=mask, tokens=toks, return_type="both")
    assert "blocks.0.hook_resid_pre" not in c3 and f"blocks.{n - 1}.hook_resid_post" in c3
    assert_close(np.array(out[0]), np.array(full), tol=1e-4)
    part = model(mid, start_at_layer=1, stop_at_layer=2, attention_mask=mask)
    assert_close(np.array(part) * np.array(mask)[..., None],
                               np.array(cache["resid_post", 1]), tol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        model(toks, stop_at_layer=n + 1)

"""Evaluation (reconstruction metrics, CE loss recovered / KL with the SAE spliced into stories260K) and
feature analysis (top_features batch 1 and >1, top_contexts, logit effects)."""

from __future__ import annotations

from hooked_mlx.sae import (
    SAE,
    SAEConfig,
    evaluate_model,
    evaluate_reconstruction,
    feature_logit_effects,
    feature_logit_weights,
    top_contexts,
    top_features,
)
from hooked_mlx.sae import metrics as M
import mlx.core as mx
import numpy as np
import pytest
from test_sae_model import _random_sae
from tolerance import assert_close

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["Once upon a time, there was a little girl named Lily.", "Tom saw a big red ball in the park.",
         "The cat was happy."]


def identity_sae(d: int = 64) -> SAE:
    """relu(x) - relu(-x) = x: a perfect reconstruction with d_sae = 2d."""
    cfg = SAEConfig(architecture="relu", d_in=d, d_sae=2 * d, hook_name=HOOK, apply_b_dec_to_input=False)
    sae = SAE(cfg)
    eye = np.eye(d, dtype=np.float32)
    sae.W_enc = mx.array(np.concatenate([eye, -eye], axis=1))
    sae.W_dec = mx.array(np.concatenate([eye, -eye], axis=0))
    sae.b_enc = mx.zeros((2 * d,))
    sae.b_dec = mx.zeros((d,))
    return sae


def test_reconstruction_metrics_match_numpy():
    sae = _random_sae("jumprelu", d_in=16, d_sae=64)
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32) + 1.0
    r = evaluate_reconstruction(sae, x, batch_size=64)  # several batches: global mean for FVU
    assert set(r) == set(M.RECONSTRUCTION_KEYS)
    f = np.array(sae.encode(mx.array(x)), dtype=np.float64)
    xh = np.array(sae(mx.array(x)), dtype=np.float64)
    xd = x.astype(np.float64)
    fvu = ((xh - xd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert r[M.FVU] == pytest.approx(fvu, rel=1e-5)
    assert r[M.EXPLAINED_VARIANCE] == pytest.approx(1 - fvu, rel=1e-5)
    assert r[M.MSE] == pytest.approx(((xh - xd) ** 2).sum(1).mean(), rel=1e-5)
    assert r[M.L0] == pytest.approx((f != 0).sum(1).mean(), rel=1e-6)
    assert r[M.L0_SPARSITY] == pytest.approx((f != 0).sum(1).mean() / 64, rel=1e-6)
    assert r[M.L1_MAGNITUDE] == pytest.approx(np.abs(f).sum(1).mean(), rel=1e-5)
    assert r[M.L2_RATIO] == pytest.approx((np.linalg.norm(xh, axis=1) / np.linalg.norm(xd, axis=1)).mean(), rel=1e-5)
    assert r[M.REL_RECONSTRUCTION_BIAS] == pytest.approx((xh * xh).sum() / (xd * xh).sum(), rel=1e-5)
    assert r[M.UNFIRED_FRACTION] == pytest.approx(1 - (f != 0).any(0).mean(), abs=1e-9)


def test_spliced_model_metrics(stories):
    perfect = evaluate_model(stories, identity_sae(), TEXTS, batch_size=2)
    assert set(perfect) == set(M.MODEL_KEYS)
    assert perfect[M.CE_LOSS_SAE] == pytest.approx(perfect[M.CE_LOSS_CLEAN], abs=1e-4)
    assert perfect[M.CE_LOSS_RECOVERED] == pytest.approx(1.0, abs=1e-3)
    assert perfect[M.KL_SAE] == pytest.approx(0.0, abs=1e-5)
    assert perfect[M.KL_SCORE] == pytest.approx(1.0, abs=1e-4)
    assert perfect[M.CE_LOSS_ZERO_ABLATION] > perfect[M.CE_LOSS_CLEAN] + 0.5
    # the clean CE equals the model's own loss on each text (pads excluded)
    losses = [float(stories(t, return_type="loss").item()) for t in TEXTS]
    lengths = [stories.to_tokens(t).shape[1] - 1 for t in TEXTS]
    assert perfect[M.CE_LOSS_CLEAN] == pytest.approx(np.dot(losses, lengths) / sum(lengths), rel=1e-4)
    # an SAE that outputs zeros everywhere (spliced at non-BOS positions) equals zero ablation
    zero = identity_sae()
    zero.W_dec = mx.zeros_like(zero.W_dec)
    z = evaluate_model(stories, zero, TEXTS)
    assert z[M.CE_LOSS_RECOVERED] == pytest.approx(0.0, abs=1e-4)
    assert z[M.KL_SCORE] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="Unknown hook name"):
        evaluate_model(stories, identity_sae(), TEXTS, hook_name="blocks.1.hook_resid_pots")


def _feature_sae():
    sae = _random_sae("topk", d_in=64, d_sae=256, k=8, seed=4, hook_name=HOOK)
    sae.b_dec = mx.zeros((64,))
    return sae


def test_top_features_single_and_batch(stories):
    sae = _feature_sae()
    one = top_features(stories, sae, TEXTS[0], k=5)
    toks = stories.to_tokens(TEXTS[0])
    P = toks.shape[1]
    assert one.indices.shape == (P, 5) and one.values.shape == (P, 5) and len(one.str_tokens) == P
    # values: the 5 largest latents of the hook activation at every position, descending
    _, cache = stories.run_with_cache(toks, names_filter=[HOOK])
    f = np.array(sae.encode(cache[HOOK]))[0]
    ref_vals = -np.sort(-f, axis=-1)[:, :5]
    assert_close(np.array(one.values), ref_vals, tol=1e-5)
    assert_close(np.take_along_axis(f, np.array(one.indices), -1), ref_vals, tol=1e-5)
    batch = top_features(stories, sae, TEXTS, k=5)
    n = [stories.to_tokens(t).shape[1] for t in TEXTS]
    assert batch.indices.shape == (3, max(n), 5) and batch.values.shape == (3, max(n), 5)
    assert np.array(batch.mask).sum(1).tolist() == n
    for i, t in enumerate(TEXTS):
        single = top_features(stories, sae, t, k=5)
        assert_close(np.array(batch.values[i, : n[i]]), np.array(single.values), tol=1e-4)
        assert batch.str_tokens[i] == single.str_tokens
        assert (np.array(batch.indices[i, n[i]:]) == -1).all() and (np.array(batch.values[i, n[i]:]) == 0).all()
    assert one.as_dict(1) == {int(i): pytest.approx(float(v)) for i, v in zip(one.indices[1].tolist(),
                                                                              one.values[1].tolist()) if v}


def test_top_contexts_are_the_max_activating_positions(stories, corpus_docs):
    sae = _feature_sae()
    docs = corpus_docs[:12]
    feature = int(top_features(stories, sae, docs[0], k=1).indices[5, 0])
    ex = top_contexts(stories, sae, feature, docs, n=5, window=(3, 2), batch_size=4, context_size=64)
    assert len(ex) == 5
    vals = [e.value for e in ex]
    assert vals == sorted(vals, reverse=True) and vals[0] > 0
    # brute force over each document alone
    best = []
    for d, text in enumerate(docs):
        toks = stories.to_tokens(text)[:, :64]
        _, cache = stories.run_with_cache(toks, names_filter=[HOOK])
        f = np.array(sae.encode(cache[HOOK]))[0, :, feature]
        for p in range(1, toks.shape[1]):  # BOS excluded
            best.append((float(f[p]), d, p))
    best.sort(reverse=True)
    assert_close(vals, [b[0] for b in best[:5]], tol=1e-4)
    e = ex[0]
    toks = stories.to_tokens(docs[e.doc_index])[0].tolist()
    assert e.tokens == toks[max(0, e.position - 3): e.position + 3]
    assert e.activations[e.highlight] == pytest.approx(e.value)
    assert "[[" in e.render()
    many = top_contexts(stories, sae, [feature, 0], docs, n=5, window=(3, 2), batch_size=4, context_size=64)
    assert set(many) == {feature, 0}
    assert [e.value for e in many[feature]] == vals and [e.position for e in many[feature]] == [e.position for e in ex]
    assert many[0] == top_contexts(stories, sae, 0, docs, n=5, window=(3, 2), batch_size=4, context_size=64)
    with pytest.raises(ValueError, match="feature = 999"):
        top_contexts(stories, sae, 999, docs)


def test_feature_logit_effects(stories):
    sae = _feature_sae()
    W_U = np.array(stories.W_E).T  # stories260K ties its embeddings: W_U = W_E^T
    L = np.array(feature_logit_weights(stories, sae, [3, 7]))
    np.testing.assert_allclose(L, np.array(sae.W_dec)[[3, 7]] @ W_U, rtol=1e-4, atol=1e-4)
    eff = feature_logit_effects(stories, sae, [3, 7], k=4)
    assert eff.top_tokens.shape == (2, 4) and eff.bottom_tokens.shape == (2, 4)
    np.testing.assert_array_equal(np.array(eff.top_tokens), np.argsort(-L, axis=1)[:, :4])
    np.testing.assert_allclose(np.array(eff.top_values), -np.sort(-L, axis=1)[:, :4], rtol=1e-5)
    np.testing.assert_array_equal(np.array(eff.bottom_tokens), np.argsort(L, axis=1)[:, :4])
    assert len(eff.top_str[0]) == 4 and all(isinstance(s, str) for s in eff.top_str[0])

"""Logit lens and tuned lens against direct computations."""

from __future__ import annotations

from hooked_mlx import HookedTransformer
from hooked_mlx.lens import TunedLens, logit_lens
import mlx.core as mx
import numpy as np
import pytest
from mlx_fixtures import TINY_LLAMA, build_mlx_lm_checkpoint
from tolerance import assert_close

TRAIN = ["Once upon a time, there was a little girl named Lily. She loved to play outside.",
         "One day, a big dog ran to the park. The dog was happy and wanted to play with a ball.",
         "Tom had a red car. He liked to drive it fast in the garden with his mom.",
         "The sun was hot. Sue and Ben went to the sea to swim and find shells."]
HELD_OUT = ["Lily saw a big tree in the park. She wanted to climb it, but her mom said no."]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def direct_lens_probs(model, resid):
    """ln_final (recomputed, RMSNorm) + unembedding in NumPy."""
    x = np.array(resid.astype(mx.float32))
    w = np.array(model.ln_final.effective_weight())
    h = x / np.sqrt((x**2).mean(-1, keepdims=True) + model.ln_final.eps) * w
    return softmax(h @ np.array(model.W_U))


@pytest.fixture(scope="module", params=["stories", "qwen3"])
def model(request, stories_path, tmp_path_factory):
    if request.param == "stories":
        return HookedTransformer.from_pretrained(stories_path)
    cfg = {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": False}
    _, path = build_mlx_lm_checkpoint(tmp_path_factory.mktemp("qwen3lens"), cfg, seed=7)
    return HookedTransformer.from_pretrained(path)


def test_logit_lens_matches_direct_computation(model):
    text = "Once upon a time there was a"
    res = logit_lens(model, text, k=4, return_logits=True)
    n = model.cfg.n_layers
    assert res.labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    assert res.top_tokens.shape == (n + 1, 1, 4)
    _, cache = model.run_with_cache(text)
    for l in range(n):
        p = direct_lens_probs(model, cache["resid_pre", l][:, -1])
        order = np.argsort(-p, axis=-1)[:, :4]
        assert res.top_tokens[l].tolist() == order.tolist()
        assert_close(np.array(res.top_probs[l]), np.take_along_axis(p, order, -1), tol=1e-5)
    # the last entry is the model's own prediction
    out = softmax(np.array(model(text)[:, -1]))
    assert int(res.top_tokens[-1, 0, 0]) == int(out.argmax())
    assert_close(float(res.top_probs[-1, 0, 0]), out.max(), tol=1e-5)
    # all positions, batches (left-padded so -1 is each row's last real token), printable table
    allpos = model.logit_lens([text, "The cat"], pos=None, k=3)
    assert allpos.top_tokens.shape == (n + 1, 2, len(model.to_tokens(text)[0]), 3)
    last = model.logit_lens([text, "The cat"], k=3)
    single = model.logit_lens("The cat", k=3)
    assert last.top_tokens[:, 1].tolist() == single.top_tokens[:, 0].tolist()
    table = str(res)
    assert "final_post" in table and len(table.splitlines()) == n + 2
    assert repr(model.to_str_tokens([int(res.top_tokens[-1, 0, 0])])[0]) in table.splitlines()[-1]


def test_tuned_lens_identity_init_training_and_round_trip(model, tmp_path):
    lens = TunedLens.for_model(model)
    # identity at init: the tuned lens is the logit lens
    a, b = lens.lens(model, HELD_OUT[0], k=5), logit_lens(model, HELD_OUT[0], k=5)
    assert a.top_tokens.tolist() == b.top_tokens.tolist()
    assert_close(np.array(a.top_probs), np.array(b.top_probs), tol=1e-5)
    before = lens.kl_per_layer(model, [HELD_OUT])
    # KL per layer against a direct NumPy computation (layer 1, identity translator)
    toks = model.to_tokens(HELD_OUT[0])
    logits, cache = model.run_with_cache(toks)
    p_final = softmax(np.array(logits[0]))
    p1 = direct_lens_probs(model, cache["resid_pre", 1][0])
    kl1 = (p_final * (np.log(p_final) - np.log(p1))).sum(-1).mean()
    np.testing.assert_allclose(float(before[1]), kl1, rtol=1e-3)
    losses = lens.fit(model, [TRAIN[:2], TRAIN[2:]], epochs=15, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    after = lens.kl_per_layer(model, [HELD_OUT])
    assert float(after.mean()) < float(before.mean())
    assert int((after < before).sum()) >= model.cfg.n_layers - 1
    path = lens.save(tmp_path / "lens.safetensors", model="test")
    loaded = TunedLens.load(path, model)
    np.testing.assert_allclose(np.array(loaded.kl_per_layer(model, [HELD_OUT])), np.array(after), rtol=1e-5)
    with pytest.raises(ValueError, match="safetensors"):
        lens.save(tmp_path / "lens.npz")
    wrong = TunedLens(model.cfg.n_layers + 1, model.cfg.d_model)
    with pytest.raises(ValueError, match="layers"):
        wrong.kl_per_layer(model, [HELD_OUT])

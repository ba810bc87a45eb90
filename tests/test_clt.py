"""Cross-layer transcoders trained by the SAE engine's kernels (hooked_mlx.circuits.clt_training), on stories260K.

* training lowers the mean per-layer FVU well below its start (TopK with AuxK; JumpReLU);
* the trained CLT's attribution graph is complete (1e-4) and its replacement model gives the model's logits;
* ``save_clt`` writes circuit-tracer's CLT layout, which ``load_transcoders`` reads back to the same graph;
* an interrupted run resumed from its checkpoint ends where an uninterrupted run ends;
* ``hooked-mlx train-clt`` trains and writes one; bad input is refused with what to do.
"""

from __future__ import annotations

from pathlib import Path

from hooked_mlx import HookedTransformer
from hooked_mlx.circuits import CrossLayerTranscoder, ReplacementModel, attribute, load_transcoders
from hooked_mlx.circuits.attribution import auto_batch_size, bytes_per_target
from hooked_mlx.circuits.clt_training import CHECKPOINT, save_clt, train_clt
from hooked_mlx.sae import ActivationStore, SAEConfig
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

DOCS = [d for d in (Path(__file__).parent / "sae" / "data" / "stories_samples.txt").read_text().split("\n\n")
        if d.strip()]
PROMPT = "Once upon a time there was a little girl named"


def _cfg(steps: int, **kw) -> SAEConfig:
    base = dict(architecture="topk", k=8, d_sae=256, lr=4e-3, lr_warmup_steps=10, train_batch_size_tokens=256,
                shuffle_buffer_tokens=512, training_tokens=steps * 256, context_size=64, log_every_steps=10)
    return SAEConfig(**{**base, **kw})


def _source(model, cfg):
    L = model.cfg.n_layers
    hooks = [f"blocks.{layer}.{h}" for h in ("ln2.hook_normalized", "hook_mlp_out") for layer in range(L)]
    return ActivationStore(model, hooks, DOCS, cfg)


@pytest.fixture(scope="module")
def stories(stories_path):
    return HookedTransformer.from_pretrained(stories_path)


@pytest.fixture(scope="module")
def trained(stories):
    history = []
    cfg = _cfg(120, dead_tokens_window=8 * 256)  # (a short window: AuxK runs in this test)
    clt = train_clt(cfg, _source(stories, cfg), n_layers=stories.cfg.n_layers, progress=False,
                    callback=lambda step, m: history.append(m))
    return clt, history


def test_training_lowers_the_fvu(trained):
    clt, history = trained
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == 5
    assert [tuple(w.shape) for w in clt.W_dec] == [(256, 5 - layer, 64) for layer in range(5)]
    fvu = [m["fvu"] for m in history]
    assert fvu[-1] < 0.6 and fvu[-1] < 0.6 * fvu[0], fvu
    # AuxK ran on dead features (a window of 8 steps), and the dead fraction is reported
    assert max(m["aux_loss"] for m in history) > 0
    assert all(0 <= m["dead_fraction"] <= 1 for m in history)


def test_trained_clt_graph_is_complete_and_exact(stories, trained):
    clt, _ = trained
    assert clt.k == 8  # a TopK CLT stays TopK outside the trainer
    g = attribute(stories, clt, PROMPT)
    assert g.n_features > 100
    _, per_site = np.unique(g.active_features[:, :2], axis=0, return_counts=True)
    assert per_site.max() <= 8  # at most k features per (layer, position)
    rows = list(range(g.n_features)) + list(range(g.logit_start, g.n_nodes))
    total = g.adjacency[rows].astype(np.float64).sum(axis=1) + g.target_biases
    assert_close(total, g.target_values, 1e-4)
    # features of early layers have edges to targets several layers later (the CLT's cross-layer decoders)
    layers = g.active_features[:, 0]
    late, early = np.nonzero(layers == 4)[0], np.nonzero(layers == 0)[0]
    assert np.abs(g.adjacency[np.ix_(late, early)]).max() > 0
    tokens = stories.to_tokens(PROMPT)[0]
    rm = ReplacementModel(stories, clt)
    assert_close(rm.run(tokens, rm.freeze(tokens)), stories(tokens[None])[0], 1e-5)


def test_clt_batches_by_depth_give_the_one_batch_graph(stories, trained):
    """A CLT feature writes to its layer and every later one: a batch whose deepest readout is layer r uses only
    the decoder rows written before r, and gives the same edges as one batch through the whole model."""
    clt, _ = trained
    one = attribute(stories, clt, PROMPT, batch_size=100_000)
    P, L, d = len(one.prompt_tokens), one.n_layers, stories.cfg.d_model
    budget = 40 * bytes_per_target(L, P, d) / 1e9  # 40 targets a batch at full depth, more above
    assert auto_batch_size(1, P, d, budget) > auto_batch_size(L, P, d, budget) > 16
    many = attribute(stories, clt, PROMPT, memory_gb=budget)
    scale = np.abs(one.adjacency).max()
    np.testing.assert_allclose(many.adjacency, one.adjacency, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(many.target_values, one.target_values, rtol=1e-6, atol=1e-6 * scale)


def test_save_clt_round_trips_through_circuit_tracer_layout(stories, trained, tmp_path):
    clt, _ = trained
    out = save_clt(clt, str(tmp_path / "clt"))
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(
        ["config.yaml"] + [f"W_{k}_{layer}.safetensors" for k in ("enc", "dec") for layer in range(5)])
    back = load_transcoders(out)
    assert isinstance(back, CrossLayerTranscoder) and back.k == 8
    a, b = attribute(stories, clt, PROMPT), attribute(stories, back, PROMPT)
    np.testing.assert_array_equal(a.active_features, b.active_features)
    assert_close(a.adjacency, b.adjacency, 1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        save_clt(clt, out)


def test_interrupted_run_resumes_exactly(stories, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    cfg = _cfg(30, checkpoint_every_steps=10)
    full = train_clt(cfg, _source(stories, cfg), n_layers=5, progress=False)

    class Stop(Exception):
        pass

    def stop_at_20(step, m):
        if step == 20:
            raise Stop  # after the step-20 metrics; the step-20 checkpoint is written only after the callback

    with pytest.raises(Stop):
        train_clt(cfg, _source(stories, cfg), n_layers=5, progress=False, checkpoint_path=ckpt, callback=stop_at_20)
    assert (Path(ckpt) / CHECKPOINT).exists()  # the step-10 checkpoint
    with pytest.raises(FileExistsError, match="resume=True"):
        train_clt(cfg, _source(stories, cfg), n_layers=5, progress=False, checkpoint_path=ckpt)
    resumed = train_clt(cfg, _source(stories, cfg), n_layers=5, progress=False, checkpoint_path=ckpt, resume=True)
    for a, b in zip(full.W_enc + full.W_dec + [full.b_enc, full.b_dec_],
                    resumed.W_enc + resumed.W_dec + [resumed.b_enc, resumed.b_dec_]):
        assert_close(a, b, 1e-6)
    with pytest.raises(ValueError, match="another configuration"):
        train_clt(cfg.replace(lr=1e-3), _source(stories, cfg), n_layers=5, progress=False, checkpoint_path=ckpt,
                  resume=True)


def test_jumprelu_clt(stories, tmp_path):
    """A JumpReLU CLT: thresholds trained by the straight-through gradients, the L0 penalty lowering the active
    fraction, the thresholds written and read back, and a complete graph."""
    cfg = _cfg(80, architecture="jumprelu", l0_coefficient=2.0, sparsity_warmup_steps=20, jumprelu_init_threshold=0.05)
    history = []
    clt = train_clt(cfg, _source(stories, cfg), n_layers=5, progress=False, callback=lambda s, m: history.append(m))
    assert clt.threshold is not None and float(mx.min(clt.threshold)) >= 0
    assert float(mx.max(mx.abs(clt.threshold - 0.05))) > 1e-3  # trained
    assert history[-1]["fvu"] < 0.8 * history[0]["fvu"]
    assert history[-1]["l0"] < 0.5 * 256  # well under half of the 256 features per layer
    back = load_transcoders(save_clt(clt, str(tmp_path / "jclt")))
    assert back.threshold is not None
    assert_close(back.threshold, clt.threshold, 1e-7)
    g = attribute(stories, back, PROMPT)
    rows = list(range(g.n_features)) + list(range(g.logit_start, g.n_nodes))
    assert_close(g.adjacency[rows].astype(np.float64).sum(axis=1) + g.target_biases, g.target_values, 1e-4)


def test_bad_input_is_refused(stories):
    cfg = _cfg(4)
    with pytest.raises(ValueError, match="does not produce"):
        train_clt(cfg, ActivationStore(stories, ["blocks.0.ln2.hook_normalized"], DOCS, cfg), n_layers=5)
    with pytest.raises(ValueError, match="'topk' or 'jumprelu'"):
        train_clt(cfg.replace(architecture="relu"), _source(stories, cfg), n_layers=5, progress=False)
    with pytest.raises(ValueError, match="shape"):
        CrossLayerTranscoder(W_enc=[mx.zeros((4, 8))] * 2, b_enc=mx.zeros((2, 8)),
                             W_dec=[mx.zeros((8, 2, 4)), mx.zeros((8, 2, 4))], b_dec_=mx.zeros((2, 4)))


def test_train_clt_command(stories_path, tmp_path, capsys):
    from hooked_mlx.cli import main

    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS))
    out = tmp_path / "clt"
    assert main(["train-clt", str(stories_path), "--data", str(data), "--out", str(out), "--k", "4", "--d-sae", "64",
                 "--tokens", str(6 * 256), "--train-batch-size-tokens", "256", "--context-size", "64",
                 "--quiet"]) == 0
    clt = load_transcoders(str(out))
    assert isinstance(clt, CrossLayerTranscoder) and clt.d_transcoder == 64
    assert (out / "checkpoint" / CHECKPOINT).exists()
    try:  # a second run into the same folder is refused (without --resume / --overwrite), before any training
        rc = main(["train-clt", str(stories_path), "--data", str(data), "--out", str(out), "--tokens", "512",
                   "--quiet"])
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None)
    assert "not empty" in capsys.readouterr().err


def test_clt_layers_as_transcoders_give_the_same_features_and_dashboard_contexts(stories, trained, tmp_path):
    """``layer_transcoder(l)`` reads features exactly as the CLT does (TopK here, JumpReLU in the parity fixture),
    so the graph's top contexts (``graph_contexts``, ``hooked-mlx attribute --corpus``) work for CLT features."""
    from hooked_mlx.circuits import graph_contexts, prune_graph

    clt, _ = trained
    _, cache = stories.run_with_cache(stories.to_tokens(PROMPT), names_filter=lambda n: n.endswith("hook_normalized"))
    for layer in range(clt.n_layers):
        x = cache[f"blocks.{layer}.ln2.hook_normalized"][0]
        np.testing.assert_array_equal(np.array(clt.layer_transcoder(layer).encode(x)), np.array(clt.encode(layer, x)))
    g = attribute(stories, clt, PROMPT)
    pr = prune_graph(g)
    ctx = graph_contexts(stories, clt, g, DOCS[:8], prune=pr, max_docs=8)
    assert ctx and all(isinstance(v, list) for v in ctx.values())
    assert any(len(v) > 0 for v in ctx.values())


def test_a_non_finite_step_writes_no_checkpoint(tmp_path):
    from hooked_mlx.sae import ArraySource

    rng = np.random.default_rng(0)
    arrays = {f"blocks.{layer}.{h}": rng.normal(size=(256, 8)).astype(np.float32)
              for layer in range(2) for h in ("ln2.hook_normalized", "hook_mlp_out")}
    arrays["blocks.1.hook_mlp_out"][:] = np.inf  # every batch's targets are infinite
    cfg = _cfg(4, k=2, d_sae=16, checkpoint_every_steps=2, log_every_steps=100)
    ckpt = tmp_path / "ck"
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_clt(cfg, ArraySource(arrays, 256, seed=0), n_layers=2, progress=False, checkpoint_path=str(ckpt))
    assert not (ckpt / CHECKPOINT).exists()

"""hooked_mlx's attribution graph against circuit-tracer 0.5.0's on the same model, transcoders and prompt.

``tests/data/circuit_tracer_0.5.0/`` was written by circuit-tracer itself (``tests/make_circuit_tracer_fixture.py``,
run in a venv with circuit-tracer 0.5.0, TransformerLens 2.16.1 and torch 2.13.0 CPU): a random 3-layer Llama in
Hugging Face's layout, per-layer skip transcoders in circuit-tracer's transcoder-set layout (``config.yaml`` and
``layer_{i}.safetensors``; layer 1 a JumpReLU), and circuit-tracer's graph for one prompt. hooked_mlx loads the
same files (the model with ``HookedTransformer.from_pretrained``, the transcoders with ``load_transcoders``) and
must give the same nodes in the same order, the same logit targets and the same adjacency matrix (1e-4 of its
scale). With ``HOOKED_MLX_CIRCUIT_TRACER_PYTHON`` set (a Python with circuit-tracer 0.5.0), circuit-tracer is also
run now and must reproduce the committed fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hooked_mlx import HookedTransformer
from hooked_mlx.circuits import attribute, load_transcoders
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

ROOT = Path(__file__).parent / "data" / "circuit_tracer_0.5.0"


def _expected(root: Path = ROOT) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(root / "expected.safetensors")).items()}


def _graph(root: Path = ROOT):
    exp = _expected(root)
    model = HookedTransformer.from_pretrained(str(root / "model"))
    tcs = load_transcoders(str(root / "transcoders"))
    graph = attribute(model, tcs, exp["tokens"].tolist(), max_n_logits=5, max_logit_prob=0.95)
    return model, tcs, graph, exp


@pytest.fixture(scope="module")
def parity():
    return _graph()


def test_circuit_tracer_transcoder_set_loads(parity):
    _, tcs, _, _ = parity
    assert sorted(tcs) == [0, 1, 2]
    assert [tcs[layer].cfg.architecture for layer in range(3)] == ["relu", "jumprelu", "relu"]
    for layer, tc in tcs.items():
        assert (tc.cfg.hook_name, tc.cfg.hook_name_out) == (f"blocks.{layer}.ln2.hook_normalized",
                                                           f"blocks.{layer}.hook_mlp_out")
        assert tc.cfg.skip_connection and not tc.cfg.apply_b_dec_to_input
        assert tc.W_enc.shape == (32, 48) and tc.W_dec.shape == (48, 32)


def test_same_model_logits_as_transformer_lens(parity):
    model, _, _, exp = parity
    logits = model(mx.array(exp["tokens"])[None])[0]
    assert_close(logits, exp["logits"], 1e-5)


def test_same_nodes_and_targets_as_circuit_tracer(parity):
    _, _, g, exp = parity
    np.testing.assert_array_equal(g.active_features, exp["active_features"])
    assert_close(g.activations, exp["activation_values"], 1e-5)
    assert g.logit_tokens == exp["logit_targets"].tolist()
    assert_close(g.logit_probabilities, exp["logit_probabilities"], 1e-5)
    assert g.adjacency.shape == exp["adjacency"].shape
    # every feature and no position-0 feature (circuit-tracer ignores the BOS position)
    assert len(g.active_features) > 300 and (g.active_features[:, 1] > 0).all()


def test_same_adjacency_as_circuit_tracer(parity):
    _, _, g, exp = parity
    A, B = g.adjacency, exp["adjacency"]
    assert np.count_nonzero(B) > 10_000  # a dense, non-trivial graph
    assert_close(A, B, 1e-4, err_msg="adjacency")
    # and block by block, so that a small block is not hidden by the scale of a large one
    nF, P, L = len(g.active_features), len(g.prompt_tokens), g.n_layers
    blocks = {"features": slice(0, nF), "errors": slice(nF, nF + L * P), "tokens": slice(nF + L * P, nF + L * P + P)}
    for name, cols in blocks.items():
        assert_close(A[:, cols], B[:, cols], 1e-4, err_msg=name)


def test_skip_paths_matter_in_the_fixture(parity):
    """The comparison covers the skip terms' linear paths: without them the graph differs."""
    model, tcs, g, exp = parity
    orig = tcs[1].skip_term
    try:
        tcs[1].skip_term = lambda x: orig(mx.stop_gradient(x))  # type: ignore[method-assign]
        cut = attribute(model, tcs, exp["tokens"].tolist(), max_n_logits=5, max_logit_prob=0.95)
    finally:
        del tcs[1].skip_term
    assert np.abs(cut.adjacency - exp["adjacency"]).max() > 1e-2 * np.abs(exp["adjacency"]).max()


def test_transcoder_set_errors(tmp_path):
    import shutil

    from hooked_mlx.circuits.transcoder_sets import load_circuit_tracer_set

    d = tmp_path / "set"
    shutil.copytree(ROOT / "transcoders", d)
    cfg = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(cfg.replace("transcoder_set", "cross_layer_transcoder"))
    with pytest.raises(ValueError, match="cross_layer_transcoder"):
        load_circuit_tracer_set(str(d))
    (d / "config.yaml").write_text(cfg.replace("ln2.hook_normalized", "mlp.hook_in"))
    with pytest.raises(ValueError, match="mlp.hook_in.*not supported"):
        load_circuit_tracer_set(str(d))
    (d / "config.yaml").write_text(cfg.replace("layer_2.safetensors", "layer_9.safetensors"))
    with pytest.raises(FileNotFoundError, match="layer_9"):
        load_circuit_tracer_set(str(d))
    (d / "config.yaml").write_text(cfg.replace("layer_2.safetensors", "hf://nobody/none/layer_2.safetensors"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_circuit_tracer_set(str(d))
    # without a 'transcoders' list: layer_{i}.safetensors in the folder
    (d / "config.yaml").write_text(cfg.split("transcoders:")[0])
    assert sorted(load_circuit_tracer_set(str(d))) == [0, 1, 2]


def _ct_python():
    return os.environ.get("HOOKED_MLX_CIRCUIT_TRACER_PYTHON")


@pytest.mark.skipif(_ct_python() is None, reason="HOOKED_MLX_CIRCUIT_TRACER_PYTHON is not set (a Python with "
                    "circuit-tracer==0.5.0; see tests/make_circuit_tracer_fixture.py)")
def test_live_circuit_tracer_reproduces_the_fixture(tmp_path):
    out = tmp_path / "ct"
    script = Path(__file__).parent / "make_circuit_tracer_fixture.py"
    subprocess.run([_ct_python(), str(script), "--out", str(out)], check=True, capture_output=True, text=True)
    new, old = _expected(out), _expected()
    for k in old:
        assert_close(new[k], old[k], 1e-6, err_msg=k)
    _, _, g, exp = _graph(out)
    assert_close(g.adjacency, exp["adjacency"], 1e-4)
    assert sys.executable  # (hooked_mlx ran in this interpreter, circuit-tracer in the other)


# -- cross-layer transcoder ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clt_parity():
    from hooked_mlx.circuits import CrossLayerTranscoder

    exp = _expected_clt = {k: np.array(v) for k, v in mx.load(str(ROOT / "expected_clt.safetensors")).items()}
    model = HookedTransformer.from_pretrained(str(ROOT / "model"))
    clt = load_transcoders(str(ROOT / "clt"))
    assert isinstance(clt, CrossLayerTranscoder)
    graph = attribute(model, clt, exp["tokens"].tolist(), max_n_logits=5, max_logit_prob=0.95)
    return model, clt, graph, _expected_clt


def test_circuit_tracer_clt_loads(clt_parity):
    _, clt, _, _ = clt_parity
    assert clt.n_layers == 3 and clt.hook_in == "hook_resid_mid" and clt.threshold is not None
    assert [tuple(w.shape) for w in clt.W_dec] == [(40, 3, 32), (40, 2, 32), (40, 1, 32)]
    assert clt.k is None  # circuit-tracer's CLTs are JumpReLU or ReLU
    x = mx.random.normal((7, 32), key=mx.random.key(0))
    for layer in range(3):  # its per-layer encoders as SAEs (the dashboards' top contexts) give the same features
        np.testing.assert_array_equal(np.array(clt.layer_transcoder(layer).encode(x)), np.array(clt.encode(layer, x)))


def test_clt_graph_same_as_circuit_tracer(clt_parity):
    """Features of layer l write to layers l..L-1: their edges sum the effects at every output layer."""
    _, _, g, exp = clt_parity
    np.testing.assert_array_equal(g.active_features, exp["active_features"])
    assert_close(g.activations, exp["activation_values"], 1e-5)
    assert g.logit_tokens == exp["logit_targets"].tolist()
    assert np.count_nonzero(exp["adjacency"]) > 10_000
    assert_close(g.adjacency, exp["adjacency"], 1e-4)


def test_clt_graph_is_complete_and_the_replacement_exact(clt_parity):
    from hooked_mlx.circuits import ReplacementModel

    model, clt, g, exp = clt_parity
    rows = list(range(g.n_features)) + list(range(g.logit_start, g.n_nodes))
    total = g.adjacency[rows].astype(np.float64).sum(axis=1) + g.target_biases
    assert_close(total, g.target_values, 1e-4)
    rm = ReplacementModel(model, clt)
    tokens = mx.array(exp["tokens"])
    state = rm.freeze(tokens)
    assert_close(rm.run(tokens, state), exp["logits"], 1e-5)


def test_clt_interventions(clt_parity):
    """Zeroing a layer-0 feature moves the logits in the replacement model and in the real model with the CLT
    spliced in (error term kept); unedited, the splice is the model; earlier positions never move."""
    from hooked_mlx.circuits import ReplacementModel, intervene, intervene_replacement, zero

    model, clt, g, exp = clt_parity
    rm = ReplacementModel(model, clt)
    tokens = mx.array(exp["tokens"])
    base = rm.run(tokens, rm.freeze(tokens))
    layer, pos, f = (int(v) for v in g.active_features[0])
    edited = intervene_replacement(rm, tokens, [(layer, pos, f, zero)])
    assert float(mx.max(mx.abs(edited - base))) > 1e-4
    assert_close(edited[:pos], base[:pos], 1e-6)  # causal: earlier positions are untouched
    same, _ = intervene(model, clt, tokens, [])
    assert_close(same, exp["logits"], 1e-5)
    real, new = intervene(model, clt, tokens, [(layer, pos, f, zero)], max_new_tokens=2)
    assert float(mx.max(mx.abs(real - same))) > 1e-4 and len(new) == 2
    assert_close(real[:pos], same[:pos], 1e-6)

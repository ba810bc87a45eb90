"""Attribution graphs (hooked_mlx.circuits): exact properties of the local replacement model and its graph, on
stories260K with per-layer transcoders trained here, and on a tiny random Gemma-3 (q/k norms, post-norms, GQA,
an embedding scale).

* the replacement is exact: frozen patterns and norm scales, MLPs replaced by transcoder + error, give the model's
  logits (1e-5 of their scale);
* completeness: every target node's incoming edges plus its bias (its value with every source zero) equal its
  value (1e-4 relative);
* edges are effects: moving a source (a feature's activation, an error node, a token embedding) changes a target in
  the frozen replacement model by exactly the edge weight times the move;
* pruning, graph scores and circuit-tracer's JSON are consistent."""

from __future__ import annotations

import json
from pathlib import Path

from hooked_mlx import HookedTransformer
from hooked_mlx.circuits import ReplacementModel, attribute, graph_scores, graph_to_json, prune_graph
from hooked_mlx.circuits.attribution import auto_batch_size, bytes_per_target
from hooked_mlx.circuits.graph import compute_influence, normalize_matrix
from hooked_mlx.sae import SAE, SAEConfig
import mlx.core as mx
import numpy as np
import pytest
from mlx_fixtures import TINY_LLAMA, build_mlx_lm_checkpoint
from tolerance import assert_close

PROMPT = "Once upon a time there was a little girl named"
GEMMA3 = dict(TINY_LLAMA, model_type="gemma3_text", head_dim=16, rms_norm_eps=1e-6, rope_theta=500000.0,
              rope_local_base_freq=20000.0, query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=2,
              hidden_activation="gelu_pytorch_tanh", num_hidden_layers=3)


def _io(layer):
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


@pytest.fixture(scope="module")
def stories_tcs(stories_path):
    """Per-layer TopK transcoders trained on stories260K (layer 1's with a skip term), from one streamed forward."""
    from hooked_mlx.sae import ActivationStore, train_saes

    model = HookedTransformer.from_pretrained(stories_path)
    batch = 256
    common = dict(architecture="topk", apply_b_dec_to_input=False, expansion_factor=8, k=16, lr=4e-3,
                  lr_warmup_steps=10, train_batch_size_tokens=batch, shuffle_buffer_tokens=2 * batch,
                  training_tokens=200 * batch, context_size=64, log_every_steps=100)
    cfgs = [SAEConfig(hook_name=_io(layer)[0], hook_name_out=_io(layer)[1], skip_connection=layer == 1, **common)
            for layer in range(model.cfg.n_layers)]
    docs = [d for d in (Path(__file__).parent / "sae" / "data" / "stories_samples.txt").read_text().split("\n\n")
            if d.strip()]
    hooks = [h for layer in range(model.cfg.n_layers) for h in _io(layer)]
    result = train_saes(cfgs, ActivationStore(model, hooks, docs, cfgs[0]), progress=False)
    return model, {layer: result[_io(layer)[0]] for layer in range(model.cfg.n_layers)}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    _, path = build_mlx_lm_checkpoint(tmp_path_factory.mktemp("g3"), GEMMA3)
    model = HookedTransformer.from_pretrained(path)
    d = model.cfg.d_model
    tcs = {}
    for layer in range(model.cfg.n_layers):
        c = SAEConfig(hook_name=_io(layer)[0], hook_name_out=_io(layer)[1], d_in=d, d_out=d, expansion_factor=4,
                      architecture="jumprelu" if layer % 2 else "topk", k=8, apply_b_dec_to_input=False, seed=layer)
        tc = SAE(c)
        tc.b_enc = 0.05 * mx.ones((tc.d_sae,))
        if c.architecture == "jumprelu":
            tc.threshold = 0.02 * mx.ones((tc.d_sae,))
        tcs[layer] = tc
    return model, tcs


def _cases(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["stories_tcs", "gemma3"])
def case(request):
    return _cases(request)


def _logits_from(model, unembed_in):
    return unembed_in @ model.unembed.W_U.astype(mx.float32) + model.unembed.b_U.astype(mx.float32)


def test_the_replacement_model_gives_the_model_s_logits(case):
    model, tcs = case
    rm = ReplacementModel(model, tcs)
    tokens = model.to_tokens(PROMPT)[0]
    state = rm.freeze(tokens)
    embed, mlp = rm.sources(state)
    outs = rm.frozen_forward(tokens, state, embed[None], [m[None] for m in mlp])
    _, cache = model.run_with_cache(tokens[None], names_filter="unembed.hook_in")
    assert_close(outs[-1], cache["unembed.hook_in"].astype(mx.float32), 1e-5)
    logits = model(tokens[None])[0].astype(mx.float32)
    assert_close(_logits_from(model, outs[-1][0]), logits, 1e-5)
    # and the transcoders really replace the MLPs: the error nodes are smaller than the MLP outputs
    errs = rm.errors(state)
    true = [state["frozen"][_io(layer)[1]][0] for layer in range(rm.n_layers)]
    ratio = sum(float(mx.sum(e * e)) for e in errs) / sum(float(mx.sum(t * t)) for t in true)
    assert ratio > 0  # (random transcoders leave most of it in the errors; the trained ones below much less)


def test_trained_transcoders_explain_most_of_the_mlps(stories_tcs):
    model, tcs = stories_tcs
    rm = ReplacementModel(model, tcs)
    state = rm.freeze(model.to_tokens(PROMPT)[0])
    fvu = []
    for layer, e in enumerate(rm.errors(state)):
        t = state["frozen"][_io(layer)[1]][0]
        fvu.append(float(mx.sum(e * e) / mx.sum(mx.square(t - t.mean(axis=0)))))
    print("per-layer FVU of the prompt's MLP outputs:", [round(v, 3) for v in fvu])
    assert np.mean(fvu) < 0.5 and max(fvu) < 0.75


def test_completeness_and_scores(case):
    model, tcs = case
    g = attribute(model, tcs, PROMPT, batch_size=16)
    assert g.n_features > 10 and len(g.logit_tokens) >= 1
    rows = list(range(g.n_features)) + list(range(g.logit_start, g.n_nodes))
    total = g.adjacency[rows].astype(np.float64).sum(axis=1) + g.target_biases
    scale = np.abs(g.target_values).max()
    np.testing.assert_allclose(total, g.target_values, rtol=0, atol=1e-4 * scale)
    # structure: only earlier layers feed a feature; nothing feeds tokens or errors
    A = g.adjacency
    assert not A[g.error_start:g.logit_start].any()
    for i, (layer, pos, _) in enumerate(g.active_features):
        srcs = np.nonzero(A[i, :g.n_features])[0]
        assert all(g.active_features[s][0] < layer and g.active_features[s][1] <= pos for s in srcs)
    replacement, completeness = graph_scores(g)
    assert 0 < replacement <= 1 and 0 < completeness <= 1


def test_batches_by_depth_give_the_one_batch_graph(case):
    """Batches sized by a memory budget (``memory_gb``: deeper readouts, fewer targets per batch), each running the
    backward of only the blocks below its last readout, give the graph of one batch with the full backward."""
    model, tcs = case
    one = attribute(model, tcs, PROMPT, batch_size=100_000)
    P, L, d = len(one.prompt_tokens), one.n_layers, model.cfg.d_model
    budget = 40 * bytes_per_target(L, P, d) / 1e9  # 40 targets a batch at full depth, 40 L at depth 1
    assert auto_batch_size(1, P, d, budget) > auto_batch_size(L, P, d, budget) > 16
    many = attribute(model, tcs, PROMPT, memory_gb=budget)
    assert np.array_equal(one.active_features, many.active_features)
    scale = np.abs(one.adjacency).max()
    np.testing.assert_allclose(many.adjacency, one.adjacency, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(many.target_values, one.target_values, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(many.target_biases, one.target_biases, rtol=1e-6, atol=1e-6 * scale)


def test_edges_are_the_effects_of_moving_their_sources(case):
    """A source moved by delta changes a target by delta x edge (the frozen model is affine in its sources)."""
    model, tcs = case
    g = attribute(model, tcs, PROMPT, batch_size=64)
    rm = ReplacementModel(model, tcs)
    tokens = mx.array(g.prompt_tokens)
    state = rm.freeze(tokens)
    embed, mlp = rm.sources(state)
    errors = rm.errors(state)
    rng = np.random.default_rng(0)

    def target_value(e, m, t):
        outs = rm.frozen_forward(tokens, state, e[None], [x[None] for x in m])
        if t >= g.logit_start:  # a de-meaned logit at the last position
            from hooked_mlx.sae.analysis import unembedding

            W_U = unembedding(model).astype(mx.float32)
            u = W_U[:, g.logit_tokens[t - g.logit_start]] - W_U.mean(axis=1)
            return float(outs[-1][0, -1] @ u)
        layer, pos, f = (int(v) for v in g.active_features[t])
        return float(outs[layer][0, pos] @ tcs[layer].W_enc[:, f])

    targets = [g.logit_start] + list(rng.choice(g.n_features, 4, replace=False))
    checked = 0
    for t in targets:
        base = target_value(embed, mlp, t)
        for s in np.nonzero(g.adjacency[t])[0][:6]:
            e, m = embed, list(mlp)
            if s < g.error_start:  # a feature: its activation scaled by 1.5 (its decoder row times 0.5 a added)
                layer, pos, f = (int(v) for v in g.active_features[s])
                bump = 0.5 * g.activations[s] * tcs[layer].W_dec[f]
                m[layer] = m[layer] + mx.zeros_like(m[layer]).at[pos].add(bump)
                want = 0.5 * g.adjacency[t, s]
            elif s < g.token_start:  # an error node, doubled
                layer, pos = divmod(int(s) - g.error_start, g.n_pos)
                m[layer] = m[layer] + mx.zeros_like(m[layer]).at[pos].add(errors[layer][pos])
                want = g.adjacency[t, s]
            else:  # a token embedding, doubled
                pos = int(s) - g.token_start
                e = e + mx.zeros_like(e).at[pos].add(embed[pos])
                want = g.adjacency[t, s]
            got = target_value(e, m, t) - base
            assert got == pytest.approx(want, rel=2e-3, abs=1e-4 * max(1.0, abs(base)))
            checked += 1
    assert checked >= 10


def test_pruning_and_json(stories_tcs):
    model, tcs = stories_tcs
    g = attribute(model, tcs, PROMPT)
    pr = prune_graph(g, node_threshold=0.8, edge_threshold=0.98)
    assert pr.node_mask[g.error_start:].all() and 0 < pr.node_mask[:g.n_features].sum() < g.n_features
    assert not (pr.edge_mask & ~(pr.node_mask[:, None] & pr.node_mask[None, :])).any()
    # the kept features carry most of the influence on the logits
    w = np.zeros(g.n_nodes)
    w[g.logit_start:] = g.logit_probabilities
    infl = compute_influence(normalize_matrix(g.adjacency), w)
    feats = np.arange(g.n_features)
    kept, over = feats[pr.node_mask[:g.n_features]], feats[pr.cumulative_scores[:g.n_features] > 0.8]
    assert infl[kept].min() >= infl[over].max()  # the most influential features are the ones kept
    looser = prune_graph(g, node_threshold=0.95, edge_threshold=0.98)
    assert looser.node_mask.sum() >= pr.node_mask.sum()
    data = json.loads(json.dumps(graph_to_json(g, model_id="stories260K", prune=pr, decode=model.to_string)))
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"]) == int(pr.node_mask.sum())
    assert all(lk["source"] in ids and lk["target"] in ids for lk in data["links"])
    assert len(data["links"]) == int(pr.edge_mask.sum())
    assert sum(n["feature_type"] == "logit" for n in data["nodes"]) == len(g.logit_tokens)
    assert data["metadata"]["prompt_tokens"] == g.str_tokens


def test_interventions_in_the_replacement_and_the_real_model(stories_tcs, stories_path):
    """Unedited, both give the model's logits. Zeroing the top logit's strongest feature lowers that logit in
    both, by the graph's edge weight at first order in the frozen model; an edit on a layer with no effect on the
    last position (a later position) changes nothing."""
    from hooked_mlx.circuits import intervene, intervene_replacement, scale, zero
    from hooked_mlx.sae import HookedSAETransformer

    model, tcs = stories_tcs
    smodel = HookedSAETransformer.from_pretrained(stories_path)
    g = attribute(model, tcs, PROMPT)
    tokens = mx.array(g.prompt_tokens)
    rm = ReplacementModel(model, tcs)
    state = rm.freeze(tokens)
    clean = model(tokens[None])[0].astype(mx.float32)
    assert_close(intervene_replacement(rm, tokens, [], state), clean, 1e-5)
    assert_close(intervene(smodel, tcs, tokens, [])[0], clean, 1e-5)
    # the feature with the largest direct edge into the top logit
    t = g.logit_start
    s = int(np.argmax(g.adjacency[t, :g.n_features]))
    layer, pos, f = (int(v) for v in g.active_features[s])
    tok = g.logit_tokens[0]

    def demeaned(logits):
        return float(logits[-1, tok] - logits[-1].mean())

    base = demeaned(clean)
    edited_rm = demeaned(intervene_replacement(rm, tokens, [(layer, pos, f, zero)], state))
    edited_real, cont = intervene(smodel, tcs, tokens, [(layer, pos, f, zero)], max_new_tokens=3)
    assert edited_rm < base and demeaned(edited_real) < base
    if layer == model.cfg.n_layers - 1:  # no later features to respond: exactly the edge
        assert edited_rm - base == pytest.approx(-g.adjacency[t, s], rel=1e-3)
    assert len(cont) == 3
    doubled = demeaned(intervene_replacement(rm, tokens, [(layer, pos, f, scale(2.0))], state))
    assert doubled > base
    # a feature edited at the last position of a layer cannot reach an earlier position's logits
    early = intervene_replacement(rm, tokens, [(0, len(g.prompt_tokens) - 1, 0, 5.0)], state)
    assert_close(early[:-1], clean[:-1], 1e-5)
    with pytest.raises(ValueError, match="no transcoder"):
        intervene_replacement(rm, tokens, [(99, 0, 0, 1.0)], state)


def test_attribute_command_writes_json_and_a_viewer_that_renders(stories_tcs, stories_path, tmp_path):
    """``hooked-mlx attribute`` on a folder of per-layer transcoders: circuit-tracer's JSON, and an HTML viewer that
    headless chromium draws with no script error; a selected node lists its incoming edges with the graph's weights
    and its top contexts."""
    from hooked_mlx.circuits import load_transcoders
    from hooked_mlx.cli import main
    from hooked_mlx.sae import save_sae
    from browser import _assert_rendered, _browser, _dom, _not_blank, _parse

    model, tcs = stories_tcs
    root = tmp_path / "tcs"
    for layer, tc in tcs.items():
        save_sae(tc, str(root / f"layer_{layer}"))
    loaded = load_transcoders(str(root))
    assert sorted(loaded) == list(range(model.cfg.n_layers)) and loaded[1].cfg.skip_connection
    corpus = str(Path(__file__).parent / "sae" / "data" / "stories_samples.txt")
    out, page = tmp_path / "graph.json", tmp_path / "graph.html"
    assert main(["attribute", str(stories_path), PROMPT, "--transcoders", str(root), "--out", str(out), "--html",
                 str(page), "--corpus", corpus, "--max-docs", "30"]) == 0
    data = json.loads(out.read_text())
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats and any(n["feature_type"] == "logit" and n["is_target_logit"] for n in data["nodes"])
    # the node with the most incoming links, selected through the URL hash
    counts: dict[str, int] = {}
    for lk in data["links"]:
        counts[lk["target"]] = counts.get(lk["target"], 0) + 1
    node = max(feats, key=lambda n: counts.get(n["node_id"], 0))["node_id"]
    dom = _dom(page, f"#node={node}")
    _assert_rendered(dom)
    items = _parse(dom).items
    assert sum(t == "circle" for t, _, _ in items) == len(data["nodes"])
    assert sum(t == "line" for t, _, _ in items) == len(data["links"])
    shown = sorted(float(a["data-weight"]) for t, a, _ in items if t == "td" and "data-weight" in a)
    incoming = sorted(lk["weight"] for lk in data["links"] if lk["target"] == node)
    outgoing = sorted(lk["weight"] for lk in data["links"] if lk["source"] == node)
    want = sorted(sorted(incoming, key=abs)[-12:] + sorted(outgoing, key=abs)[-12:])
    assert shown == pytest.approx(want, rel=1e-6)
    assert any(a.get("data-context") == "1" for t, a, _ in items)  # its top contexts, from the corpus
    _browser(f"file://{page}#node={node}", "--window-size=1100,900", f"--screenshot={tmp_path / 'g.png'}")
    _not_blank(tmp_path / "g.png")
    before = out.read_text()
    try:  # the file exists: refused without --overwrite, and left as it was
        rc = main(["attribute", str(stories_path), PROMPT, "--transcoders", str(root), "--out", str(out)])
    except SystemExit as e:
        rc = e.code
    assert rc not in (0, None) and out.read_text() == before

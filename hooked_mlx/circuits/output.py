"""Writing a graph: circuit-tracer's JSON (for Neuronpedia's graph viewer) and the HTML viewer, with each kept
feature's top contexts from a corpus (the dashboards' ``top_contexts``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..outputs import write_text_atomic
from ..sae.analysis import top_contexts_many
from ..sae.sae import SAE
from ..viz import render_graph_page
from .attribution import Graph
from .graph import PruneResult, graph_to_json
from .transcoders import CrossLayerTranscoder


def graph_contexts(model, transcoders: dict[int, SAE] | CrossLayerTranscoder, g: Graph, corpus, *,
                   prune: PruneResult | None = None, n: int = 5, window: tuple[int, int] = (8, 3),
                   max_docs: int | None = 100) -> dict[str, list[dict]]:
    """{node_id: [{"tokens", "values"}]}: each (kept) feature node's top contexts in ``corpus`` (per-layer
    transcoders, or a cross-layer transcoder's per-layer encoders)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        clt = transcoders
        transcoders = {layer: clt.layer_transcoder(layer) for layer in range(clt.n_layers)}
    wanted: dict[int, set[int]] = {}
    for i in range(g.n_features):
        if prune is None or prune.node_mask[i]:
            layer, _, f = (int(v) for v in g.active_features[i])
            wanted.setdefault(layer, set()).add(f)
    out: dict[str, list[dict]] = {}
    layers = sorted(wanted)
    many = top_contexts_many(model, [(transcoders[layer], sorted(wanted[layer])) for layer in layers], corpus, n=n,
                             window=window, max_docs=max_docs)  # (one forward per block of documents)
    for layer, found in zip(layers, many):
        for f, examples in found.items():
            ex = [{"tokens": list(e.str_tokens), "values": [float(v) for v in e.activations]} for e in examples
                  if e.value > 0]
            for i in range(g.n_features):
                if int(g.active_features[i][0]) == layer and int(g.active_features[i][2]) == f:
                    out[f"{layer}_{f}_{int(g.active_features[i][1])}"] = ex
    return out


def write_graph(g: Graph, *, json_path: str | Path | None = None, html_path: str | Path | None = None,
                prune: PruneResult | None = None, model_id: str = "", decode=None, contexts: dict | None = None,
                overwrite: bool = False) -> dict:
    """Write the graph's JSON and / or HTML viewer (new files unless ``overwrite``); returns the JSON dict."""
    data = graph_to_json(g, model_id=model_id, prune=prune, decode=decode)
    for path, text in ((json_path, lambda: json.dumps(data)), (html_path, lambda: render_graph_page(data, contexts))):
        if path is None:
            continue
        write_text_atomic(path, text(), overwrite=overwrite, what="write_graph")
    return data

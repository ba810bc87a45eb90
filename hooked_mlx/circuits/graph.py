"""Attribution-graph analysis: influence, pruning, the replacement and completeness scores, and circuit-tracer's
JSON for Neuronpedia's graph viewer.

Conventions follow circuit-tracer: ``normalize_matrix`` divides each target row by the sum of its incoming |edges|;
a node's influence is the logit-probability-weighted sum over all paths to the logits of the products of
normalised edges (``compute_influence``, a power series that ends because the graph is acyclic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attribution import Graph


def normalize_matrix(A: np.ndarray) -> np.ndarray:
    """|A| with each row divided by its sum (rows with no input stay zero)."""
    a = np.abs(A.astype(np.float64))
    s = a.sum(axis=1, keepdims=True)
    return np.divide(a, s, out=np.zeros_like(a), where=s > 0)


def compute_influence(A: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """sum_{k >= 1} weights @ A^k: every node's influence on the weighted targets through all paths."""
    current = weights @ A
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise RuntimeError("compute_influence did not converge: the adjacency matrix is not acyclic.")


def _logit_weights(g: Graph) -> np.ndarray:
    w = np.zeros(g.n_nodes)
    w[g.logit_start:] = g.logit_probabilities
    return w


def node_influence(g: Graph) -> np.ndarray:
    return compute_influence(normalize_matrix(g.adjacency), _logit_weights(g))


@dataclass
class PruneResult:
    node_mask: np.ndarray  # [n_nodes] bool
    edge_mask: np.ndarray  # [n_nodes, n_nodes] bool
    cumulative_scores: np.ndarray  # [n_nodes]: each node's cumulative influence rank (0..1)


def prune_graph(g: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the features that make up ``node_threshold`` of the total influence on the logits (with tokens, error
    nodes and logits always kept), then the edges that make up ``edge_threshold`` of the edge influence among
    them; then drop nodes left without a path (circuit-tracer's defaults: 0.8 and 0.98)."""
    n = g.n_nodes
    A = normalize_matrix(g.adjacency)
    w = _logit_weights(g)
    infl = compute_influence(A, w)

    def cumulative(scores: np.ndarray) -> np.ndarray:
        order = np.argsort(-scores, kind="stable")
        c = np.cumsum(scores[order])
        c = c / c[-1] if c.size and c[-1] > 0 else c
        out = np.zeros_like(scores)
        out[order] = c
        return out

    node_scores = cumulative(infl)
    node_mask = node_scores <= node_threshold
    node_mask[g.error_start:] = True  # errors, tokens, logits
    # edges among kept nodes, scored by their target's influence (logits: their probability)
    A_kept = A * node_mask[:, None] * node_mask[None, :]
    infl_kept = compute_influence(A_kept, w) + w
    edge_scores = A_kept * infl_kept[:, None]
    flat = edge_scores.ravel()
    order = np.argsort(-flat, kind="stable")
    c = np.cumsum(flat[order])
    c = c / c[-1] if c.size and c[-1] > 0 else c
    keep = np.zeros(flat.size, dtype=bool)
    keep[order] = c <= edge_threshold
    edge_mask = keep.reshape(n, n) & (edge_scores > 0)
    # drop features with no kept edge in or out
    for _ in range(n):
        has_out = edge_mask.any(axis=0)
        has_in = edge_mask.any(axis=1)
        feats = np.arange(n) < g.error_start
        drop = feats & node_mask & ~(has_out & has_in)
        if not drop.any():
            break
        node_mask &= ~drop
        edge_mask &= node_mask[:, None] & node_mask[None, :]
    return PruneResult(node_mask, edge_mask, node_scores)


def graph_scores(g: Graph) -> tuple[float, float]:
    """(replacement score, completeness score), as circuit-tracer defines them.

    Replacement: of the influence on the logits that ends at the graph's inputs (tokens and error nodes), the
    fraction that ends at tokens, so the fraction not explained away by reconstruction errors. Completeness: the
    influence-weighted fraction of every node's incoming (normalised) edge weight that does not come from errors."""
    A = normalize_matrix(g.adjacency)
    w = _logit_weights(g)
    infl = compute_influence(A, w)
    tok = infl[g.token_start:g.logit_start].sum()
    err = infl[g.error_start:g.token_start].sum()
    replacement = float(tok / (tok + err)) if tok + err > 0 else 1.0
    non_error = 1.0 - A[:, g.error_start:g.token_start].sum(axis=1)
    out_infl = infl + w
    completeness = float((non_error * out_infl).sum() / out_infl.sum()) if out_infl.sum() > 0 else 1.0
    return replacement, completeness


def graph_to_json(g: Graph, model_id: str = "", slug: str = "graph", prune: PruneResult | None = None,
                  decode=None) -> dict:
    """circuit-tracer's graph JSON (what Neuronpedia's graph viewer reads): ``metadata``, ``qParams``, ``nodes``
    and ``links``. ``prune`` restricts them to the kept nodes and edges; ``decode(id) -> str`` names logit tokens."""
    n = g.n_nodes
    node_mask = prune.node_mask if prune is not None else np.ones(n, dtype=bool)
    edge_mask = prune.edge_mask if prune is not None else g.adjacency != 0
    infl = node_influence(g)
    nodes, ids = [], {}
    for i in range(n):
        if not node_mask[i]:
            continue
        if i < g.error_start:
            layer, pos, feat = (int(v) for v in g.active_features[i])
            node = {"node_id": f"{layer}_{feat}_{pos}", "feature": feat, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "cross layer transcoder", "activation": float(g.activations[i])}
        elif i < g.token_start:
            layer, pos = divmod(i - g.error_start, g.n_pos)
            node = {"node_id": f"err_{layer}_{pos}", "feature": None, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error", "activation": None}
        elif i < g.logit_start:
            pos = i - g.token_start
            node = {"node_id": f"E_{g.prompt_tokens[pos]}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": "embedding", "activation": None, "clerp": f"Emb: {g.str_tokens[pos]!r}"}
        else:
            j = i - g.logit_start
            tok = g.logit_tokens[j]
            name = decode(tok) if decode else str(tok)
            node = {"node_id": f"{g.n_layers + 1}_{tok}_{g.n_pos - 1}", "feature": tok, "layer": str(g.n_layers + 1),
                    "ctx_idx": g.n_pos - 1, "feature_type": "logit", "token_prob": float(g.logit_probabilities[j]),
                    "is_target_logit": j == 0, "activation": None, "clerp": f"Output {name!r} (p={g.logit_probabilities[j]:.3f})"}
        node["influence"] = float(infl[i])
        ids[i] = node["node_id"]
        nodes.append(node)
    links = [{"source": ids[int(s)], "target": ids[int(t)], "weight": float(g.adjacency[t, s])}
             for t, s in zip(*np.nonzero(edge_mask)) if node_mask[t] and node_mask[s]]
    replacement, completeness = graph_scores(g)
    return {"metadata": {"slug": slug, "scan": model_id, "prompt_tokens": list(g.str_tokens), "prompt": "".join(g.str_tokens),
                         "node_threshold": None, "schema_version": 1, "info": {"generator": "hooked_mlx",
                         "replacement_score": replacement, "completeness_score": completeness}},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}

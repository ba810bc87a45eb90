"""Circuit tracing: the local replacement model of a prompt and its attribution graph.

* ``attribute(model, transcoders, prompt)`` -> ``Graph`` (per-layer transcoders or a ``CrossLayerTranscoder``,
  ``transcoders.py``): active transcoder features, error nodes, token
  embeddings and the top logits as nodes; edges = direct linear effects in the frozen replacement model, from
  batched vector-Jacobian products (``attribution.py``).
* ``prune_graph``, ``graph_scores`` (replacement and completeness scores), ``graph_to_json`` (``graph.py``).
* ``intervene`` (the real model, transcoders spliced in) and ``intervene_replacement`` (the frozen replacement
  model): set, scale or zero features and see the logits change (``interventions.py``).
* ``write_graph`` (JSON and the HTML viewer, with ``graph_contexts``), ``load_transcoders`` (a folder of per-layer
  transcoders, or circuit-tracer's transcoder-set layout), and the ``hooked-mlx attribute`` command (``cli.py``).
"""

from .attribution import Graph, ReplacementModel, attribute
from .graph import compute_influence, graph_scores, graph_to_json, normalize_matrix, prune_graph
from .interventions import intervene, intervene_replacement, scale, zero
from .output import graph_contexts, write_graph
from .transcoder_sets import load_transcoders
from .transcoders import CrossLayerTranscoder

__all__ = ["CrossLayerTranscoder", "Graph", "ReplacementModel", "attribute", "compute_influence", "graph_scores", "graph_to_json",
           "graph_contexts", "intervene", "intervene_replacement", "load_transcoders", "normalize_matrix",
           "prune_graph", "scale", "write_graph", "zero"]

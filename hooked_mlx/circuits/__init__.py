"""Circuit tracing: the local replacement model of a prompt and its attribution graph.

* ``attribute(model, transcoders, prompt)`` -> ``Graph``: active transcoder features, error nodes, token embeddings
  and the top logits as nodes; edges = direct linear effects in the frozen replacement model, from batched
  vector-Jacobian products (``attribution.py``). ``transcoders``: per-layer transcoders or a
  ``CrossLayerTranscoder`` (``transcoders.py``).
* ``prune_graph``, ``graph_scores`` (replacement and completeness scores), ``graph_to_json`` (``graph.py``).
* ``intervene`` (the real model, transcoders spliced in) and ``intervene_replacement`` (the frozen replacement
  model): set, scale or zero features and see the logits change (``interventions.py``).
* ``write_graph`` (JSON and the HTML viewer, with ``graph_contexts``; ``output.py``); ``load_transcoders`` (a folder
  of per-layer transcoders, or circuit-tracer's transcoder-set and CLT layouts; ``transcoder_sets.py``).
* ``train_clt`` and ``save_clt``: cross-layer transcoders trained by the SAE engine's ops (``clt_training.py``).
* the ``hooked-mlx attribute`` and ``hooked-mlx train-clt`` commands (``cli.py``).
"""

from .attribution import Graph, ReplacementModel, attribute
from .clt_training import save_clt, train_clt
from .graph import compute_influence, graph_scores, graph_to_json, normalize_matrix, prune_graph
from .interventions import intervene, intervene_replacement, scale, zero
from .output import graph_contexts, write_graph
from .transcoder_sets import load_transcoders
from .transcoders import CrossLayerTranscoder

__all__ = ["CrossLayerTranscoder", "Graph", "ReplacementModel", "attribute", "compute_influence", "graph_scores",
           "graph_to_json", "graph_contexts", "intervene", "intervene_replacement", "load_transcoders",
           "normalize_matrix", "prune_graph", "save_clt", "scale", "train_clt", "write_graph", "zero"]

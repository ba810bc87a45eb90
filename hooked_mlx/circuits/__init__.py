"""Circuit tracing: the local replacement model of a prompt and its attribution graph.

* ``attribute(model, transcoders, prompt)`` -> ``Graph``: active transcoder features, error nodes, token
  embeddings and the top logits as nodes; edges = direct linear effects in the frozen replacement model, from
  batched vector-Jacobian products (``attribution.py``).
* ``prune_graph``, ``graph_scores`` (replacement and completeness scores), ``graph_to_json`` (``graph.py``).
"""

from .attribution import Graph, ReplacementModel, attribute
from .graph import compute_influence, graph_scores, graph_to_json, normalize_matrix, prune_graph

__all__ = ["Graph", "ReplacementModel", "attribute", "compute_influence", "graph_scores", "graph_to_json",
           "normalize_matrix", "prune_graph"]

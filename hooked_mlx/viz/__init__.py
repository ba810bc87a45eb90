"""Self-contained HTML pages (no network when viewed): the feature dashboard, the attention-pattern viewer and the
attribution-graph viewer.

The pages take plain data (lists, numbers, strings) and know nothing of models or SAEs: ``hooked_mlx.sae.dashboard``
collects a feature's data, ``attention.attention_data`` a prompt's patterns.
"""

from .attention import attention_data, render_attention_page
from .feature import render_feature_index, render_feature_page
from .graph import render_graph_page

__all__ = ["attention_data", "render_attention_page", "render_feature_index", "render_feature_page",
           "render_graph_page"]

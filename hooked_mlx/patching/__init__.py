"""Activation patching, attribution patching, path patching and interventions (``hooked_mlx.patching``).

TransformerLens's ``get_act_patch_*`` functions with TL's output shapes, batched (many cells per forward),
with a strict sequence-length policy (``align=None`` / ``"end"`` / ``"start"``), float32 metrics, the
gradient approximation (``attribution_patch_*``), exact path patching and hook factories for interventions.
"""

from .activation import (  # noqa: F401
    generic_activation_patch,
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_by_pos_every,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_post,
    get_act_patch_resid_pre,
)
from .align import align_positions, position_map  # noqa: F401
from .attribution import (  # noqa: F401
    attribution_patch,
    attribution_patch_attn_out,
    attribution_patch_head_all_pos,
    attribution_patch_head_by_pos,
    attribution_patch_mlp_out,
    attribution_patch_neurons,
    attribution_patch_resid_mid,
    attribution_patch_resid_pre,
    correlation,
)
from .engine import MEMORY_BUDGET_MB, Cell  # noqa: F401
from .interventions import (  # noqa: F401
    activation_norm,
    add_vector,
    clamp,
    compose,
    mean_ablate,
    noise,
    record_norms,
    replace_with,
    scale,
    zero_ablate,
)
from .metrics import KLDivergence, LogitDiff, LogProb, Metric, NormalizedMetric, Prob, logit_diff, normalize  # noqa: F401
from .path import (  # noqa: F401
    get_path_patch_head_to_final_resid_post,
    get_path_patch_head_to_heads,
    path_patch,
    path_patch_sets,
)
from .plot import plot_patching  # noqa: F401

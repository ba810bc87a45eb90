"""Qwen mixtures of experts: ``qwen2_moe`` (Qwen2 attention with q/k/v bias, plus a shared expert) and
``qwen3_moe`` (Qwen3 attention with per-head q/k norms).

* MLP of layer l is a ``components.moe.MoEMLP`` unless l is in ``mlp_only_layers`` or
  (l + 1) % ``decoder_sparse_step`` != 0 (Hugging Face's rule), in which case it is a dense SwiGLU of width
  ``intermediate_size``. Expert width: ``moe_intermediate_size`` (``cfg.d_mlp``).
* routing: softmax over all experts, top ``num_experts_per_tok``; renormalised when ``norm_topk_prob``
  (Hugging Face default: False for qwen2_moe -- mlx-lm never renormalises there -- and required in qwen3_moe).
* qwen2_moe shared expert: ``mlp.shared_expert`` (hooks ``mlp.shared_expert.hook_pre/...``) scaled by
  sigmoid(``mlp.shared_expert_gate`` x), added to the routed output.
* weights: mlx-lm's stacked ``mlp.switch_mlp.*``; Hugging Face's ``mlp.experts.{e}.*`` are stacked on load.
"""

from __future__ import annotations

from ..components import TransformerBlock, make_mlp
from ..components.moe import MoEMLP
from ..config import HookedConfig, require
from . import llama
from .base import LLAMA_LIKE_RULES, drop_tied_head, rename
from .mixtral import stack_experts

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


def moe_layers(d: dict, n_layers: int) -> list[int]:
    step = int(d.get("decoder_sparse_step") or 1)
    dense = set(d.get("mlp_only_layers") or [])
    if not (d.get("num_experts") or d.get("num_local_experts")):
        return []
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


class Block(TransformerBlock):
    def make_mlp(self, cfg: HookedConfig):
        if self.layer_idx not in cfg.extra["moe_layers"]:
            dense = HookedConfig.from_dict({**cfg.to_dict(), "d_mlp": cfg.extra["dense_d_mlp"]})
            return make_mlp(dense)
        return MoEMLP(cfg.d_model, cfg.d_mlp, *cfg.moe_experts(), cfg.act_fn,
                      cfg.norm_topk_prob, cfg.extra.get("shared_expert_d_mlp"))


def config_from_hf(d: dict, weight_names: set[str] | None = None) -> HookedConfig:
    mt = d["model_type"]
    base = dict(d, model_type="qwen2" if mt == "qwen2_moe" else "qwen3")
    cfg = llama.config_from_hf(base, weight_names)
    cfg.architecture = mt
    cfg.d_mlp = d["moe_intermediate_size"]
    # transformers 5.24 saves qwen3_moe's expert count as num_local_experts (older: num_experts)
    cfg.num_experts = require(d, "num_experts", "num_local_experts")
    cfg.experts_per_token = require(d, "num_experts_per_tok")
    cfg.norm_topk_prob = bool(d.get("norm_topk_prob", False))
    cfg.extra = {"moe_layers": moe_layers(d, cfg.n_layers), "dense_d_mlp": d["intermediate_size"]}
    if mt == "qwen2_moe" and d.get("shared_expert_intermediate_size"):
        cfg.extra["shared_expert_d_mlp"] = d["shared_expert_intermediate_size"]
    return cfg


def convert_weights(weights: dict, cfg: HookedConfig) -> dict:
    names = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    w = stack_experts(weights, "experts", names, cfg.moe_experts()[0])
    return drop_tied_head(rename(w, LLAMA_LIKE_RULES), cfg.tie_word_embeddings)

"""Reusable blocks: norms, attention, MLPs, transformer blocks, unembedding."""

from .attention import Attention, causal_mask, linear_weight
from .block import Embed, TransformerBlock, Unembed, make_mlp
from .mlp import MLP, GatedMLP, get_activation
from .norms import Norm

__all__ = ["Attention", "Embed", "TransformerBlock", "Unembed", "MLP", "GatedMLP", "Norm", "causal_mask",
           "linear_weight", "make_mlp", "get_activation"]

"""Array shapes of the public API as jaxtyping annotations (``Float[mx.array, "batch pos d_model"]``).

One name per kind of array, used in the signatures of ``HookedTransformer.forward``, the cache's analysis
methods, the patching functions and the SAE. Axis names follow ``names.py`` (TransformerLens's); ``*batch``
means any leading axes (a cache built with ``remove_batch_dim`` has none, a [batch, pos] one has two).
The annotations are documentation that type checkers read as ``mx.array``; ``isinstance(x, Residual)``
checks rank and dtype at run time (``tests/test_shapes.py`` does it for every annotated function).
"""

from __future__ import annotations

import mlx.core as mx
from jaxtyping import Bool, Float, Integer

#: token ids
Tokens = Integer[mx.array, "batch pos"]
#: True at real (not padding) positions
AttentionMask = Bool[mx.array, "batch pos"]
Logits = Float[mx.array, "batch pos d_vocab"]
#: the mean next-token loss (a 0-d array) or, per token, [batch, pos - 1]
Loss = Float[mx.array, "*batch_pos"]
#: the residual stream (or what stop_at_layer returns / start_at_layer takes)
Residual = Float[mx.array, "batch pos d_model"]
#: components of the residual stream stacked on axis 0 (layers, heads, neurons, ...)
ResidStack = Float[mx.array, "component *batch_pos d_model"]
#: each component's direct effect on a logit (difference)
ComponentAttrs = Float[mx.array, "component *batch_pos"]
#: one patching metric value per patched cell, laid out by the cell's axes (layer, pos, head, ...)
PatchResult = Float[mx.array, "*cells"]
#: an SAE's input, latents and reconstruction
SAEInput = Float[mx.array, "*batch d_in"]
SAELatents = Float[mx.array, "*batch d_sae"]
#: TopK latents in sparse form: values and latent indices of the k kept per row
SparseValues = Float[mx.array, "*batch k"]
SparseIndices = Integer[mx.array, "*batch k"]

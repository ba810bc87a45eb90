"""TransformerLens weight views: ``W_Q`` [L,H,dm,dh], ``W_O`` [L,H,dh,dm], ``W_in`` [L,dm,dmlp], ...

Weights are stored as ``nn.Linear`` ([out, in], ``x @ W.T``); TL's matrices right-multiply (``x @ W``).
These properties rearrange the stored weights into TL's layout on access (a view for float weights; for
quantized models the weights are dequantized on every access -- keep the result if you reuse it).
Biases a model lacks come back as zeros of the right shape, as in TL.

GQA: ``W_K`` / ``W_V`` / ``b_K`` / ``b_V`` repeat each key/value head ``n_heads // n_kv_heads`` times
(head h reads kv head h // group), so every view has H heads; ``_W_K`` / ``_W_V`` / ``_b_K`` / ``_b_V``
are the stored [L,Hkv,...] tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .components import linear_weight
from .factored_matrix import FactoredMatrix

if TYPE_CHECKING:
    from .config import HookedConfig


def _bias(layer, n: int, dtype) -> mx.array:
    b = layer.get("bias") if hasattr(layer, "get") else None
    return b if b is not None else mx.zeros((n,), dtype=dtype)


class WeightsViewMixin:
    """Adds TL's ``W_*`` / ``b_*`` properties and ``OV`` / ``QK`` to ``HookedTransformer``."""

    if TYPE_CHECKING:  # what the mixin reads of the model it is mixed into
        cfg: HookedConfig
        blocks: list[Any]
        embed: Any
        pos_embed: Any
        unembed: Any

        def to_single_token(self, string: str) -> int: ...

        def __contains__(self, key: object) -> bool: ...

    # -- helpers -----------------------------------------------------------------------------------
    def _dtype(self):
        return linear_weight(self.blocks[0].attn.q_proj).dtype

    def _stack(self, fn) -> mx.array:
        return mx.stack([fn(b) for b in self.blocks])

    def _mlp_linear(self, block, name: str, what: str):
        mlp = block.mlp
        if name not in mlp:
            kind = type(mlp).__name__
            raise AttributeError(
                f"{what} needs an MLP with `{name}`; block {block.layer_idx} has {kind}"
                + (" (a mixture of experts: read blocks[l].mlp's expert weights instead)"
                   if "expert" in kind.lower() or "moe" in kind.lower() else "")
                + ("" if name != "gate_proj" else " (W_gate exists only for gated MLPs)") + "."
            )
        return mlp[name]

    # -- embeddings and unembedding ------------------------------------------------------------------
    @property
    def W_E(self) -> mx.array:
        """Embedding [d_vocab, d_model] (dequantized; without any embedding scale)."""
        return linear_weight(self.embed)

    @property
    def W_pos(self) -> mx.array:
        """Learned position embedding [n_ctx, d_model] (models with ``positional == "learned"`` only)."""
        if "pos_embed" not in self:
            raise AttributeError(f"W_pos: this {self.cfg.architecture} model has {self.cfg.positional} positions, "
                                 f"not a learned position embedding.")
        return linear_weight(self.pos_embed)

    @property
    def W_E_pos(self) -> mx.array:
        """[d_vocab + n_ctx, d_model]: W_E stacked on W_pos (TL)."""
        return mx.concatenate([self.W_E, self.W_pos], axis=0)

    @property
    def W_U(self) -> mx.array:
        """Unembedding [d_model, d_vocab] (dequantized; the embedding's transpose when tied)."""
        return self.unembed.W_U

    @property
    def b_U(self) -> mx.array:
        """Unembedding bias [d_vocab] (zeros when the model has none)."""
        return self.unembed.b_U

    # -- attention (each layer's view is its ``blocks[l].attn`` property; see components/attention.py) ---
    @property
    def W_Q(self) -> mx.array:
        """Query weights [L, H, d_model, d_head]."""
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def _W_K(self) -> mx.array:
        """Stored key weights [L, Hkv, d_model, d_head]."""
        return self._stack(lambda b: b.attn._W_K)

    @property
    def _W_V(self) -> mx.array:
        """Stored value weights [L, Hkv, d_model, d_head]."""
        return self._stack(lambda b: b.attn._W_V)

    @property
    def W_K(self) -> mx.array:
        """Key weights [L, H, d_model, d_head] (GQA: kv heads repeated to H)."""
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> mx.array:
        """Value weights [L, H, d_model, d_head] (GQA: kv heads repeated to H)."""
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> mx.array:
        """Output weights [L, H, d_head, d_model]."""
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> mx.array:
        """[L, H, d_head]"""
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def _b_K(self) -> mx.array:
        return self._stack(lambda b: b.attn._b_K)

    @property
    def _b_V(self) -> mx.array:
        return self._stack(lambda b: b.attn._b_V)

    @property
    def b_K(self) -> mx.array:
        """[L, H, d_head] (GQA repeated)"""
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> mx.array:
        """[L, H, d_head] (GQA repeated)"""
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> mx.array:
        """[L, d_model]"""
        return self._stack(lambda b: b.attn.b_O)

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head as a FactoredMatrix [L, H, d_model, d_model] (GQA: V repeated)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head as a FactoredMatrix [L, H, d_model, d_model] (GQA: K repeated). Rotary
        embeddings and q/k norms act between the two factors, so for such models this is the bilinear form
        at zero relative position without the norms."""
        return FactoredMatrix(self.W_Q, self.W_K.swapaxes(-1, -2))

    # -- MLP -----------------------------------------------------------------------------------------
    @property
    def W_in(self) -> mx.array:
        """[L, d_model, d_mlp]: the linear branch (``up_proj``) of a gated MLP, the input of a plain one."""
        return self._stack(lambda b: linear_weight(self._mlp_linear(b, "up_proj", "W_in")).T)

    @property
    def W_gate(self) -> mx.array:
        """[L, d_model, d_mlp]: the gate branch (``gate_proj``) of a gated MLP."""
        return self._stack(lambda b: linear_weight(self._mlp_linear(b, "gate_proj", "W_gate")).T)

    @property
    def W_out(self) -> mx.array:
        """[L, d_mlp, d_model]"""
        return self._stack(lambda b: linear_weight(self._mlp_linear(b, "down_proj", "W_out")).T)

    @property
    def b_in(self) -> mx.array:
        """[L, d_mlp]"""
        dt = self._dtype()
        return self._stack(lambda b: _bias(self._mlp_linear(b, "up_proj", "b_in"), self.cfg.d_mlp, dt))

    @property
    def b_out(self) -> mx.array:
        """[L, d_model]"""
        dt = self._dtype()
        return self._stack(lambda b: _bias(self._mlp_linear(b, "down_proj", "b_out"), self.cfg.d_model, dt))

    # -- helpers used by the analysis code --------------------------------------------------------------
    def tokens_to_residual_directions(self, tokens) -> mx.array:
        """The unembedding columns W_U[:, tokens]: int / str -> [d_model]; [N] -> [N, d_model];
        [B, P] -> [B, P, d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        t = mx.array(tokens)
        W = self.W_U
        return W[:, t] if t.ndim == 0 else mx.moveaxis(W[:, t.reshape(-1)], 0, -1).reshape(tuple(t.shape) + (-1,))

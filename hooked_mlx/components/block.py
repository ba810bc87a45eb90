"""Transformer blocks, embeddings and the unembedding, with TL's residual-stream hooks."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import HookedConfig
from ..hooks import HookPoint
from .attention import Attention, linear_weight
from .mlp import MLP, GatedMLP
from .norms import Norm


def make_mlp(cfg: HookedConfig) -> nn.Module:
    if cfg.gated_mlp:
        return GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.mlp_bias)
    return MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.mlp_bias)


class TransformerBlock(nn.Module):
    """One block: pre-norm (optionally post-norm too, or parallel attention + MLP).

    Sequential: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid)).
    Parallel (NeoX): resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)); no hook_resid_mid.
    With ``cfg.post_norms`` the sublayer outputs pass ``ln1_post`` / ``ln2_post`` before their hooks.
    Hooks (all [B,P,dm]): hook_resid_pre, hook_attn_out, hook_resid_mid, hook_mlp_in (the MLP's own copy of its
    input, before ln2: patching it changes the MLP's input only), hook_mlp_out, hook_resid_post.
    """

    def __init__(self, cfg: HookedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.parallel = cfg.parallel_attn_mlp
        self.pre_norms = cfg.pre_norms
        if cfg.pre_norms:
            self.ln1 = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        if cfg.post_norms:
            self.ln1_post = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        if cfg.pre_norms:
            self.ln2 = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        self.mlp = self.make_mlp(cfg)
        if cfg.post_norms:
            self.ln2_post = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        self.hook_resid_pre = HookPoint()
        # TransformerLens's per-head attention inputs (set_use_attn_in / set_use_split_qkv_input): computed only
        # when hooked
        self.hook_attn_in = HookPoint()
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()
        self.hook_attn_out = HookPoint()
        if not self.parallel:
            self.hook_resid_mid = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def make_mlp(self, cfg: HookedConfig) -> nn.Module:
        return make_mlp(cfg)

    def _attn(self, x, mask, cache, offset):
        if any(p.has_hooks for p in (self.hook_attn_in, self.hook_q_input, self.hook_k_input, self.hook_v_input)):
            h = self.attn(None, mask, cache, offset, split_inputs=self._split_inputs(x))
        else:
            h = self.attn(self.ln1(x) if self.pre_norms else x, mask, cache, offset)
        return self.hook_attn_out(self.ln1_post(h) if "ln1_post" in self else h)

    def _split_inputs(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """TransformerLens's per-head attention inputs: the residual [B, P, d_model] repeated per head
        (``hook_attn_in`` [B, P, H, d_model]; ``hook_q_input`` from it; ``hook_k_input`` / ``hook_v_input``
        [B, P, Hkv, d_model], each KV head reading the ``attn_in`` copy of the first query head of its group),
        then ln1 on each copy. ln1's own hooks fire once, on the unsplit residual (their documented shapes):
        with split inputs, change the inputs through these hooks, not through ln1's."""
        B, P, dm = x.shape
        H, Hkv = self.attn.n_heads, self.attn.n_kv_heads
        if self.pre_norms:
            self.ln1(x)  # ln1's hooks (lazy: computed only if a hook keeps the value)
        attn_in = self.hook_attn_in(mx.broadcast_to(x[:, :, None], (B, P, H, dm)))
        q_in = self.hook_q_input(attn_in)
        kv = attn_in[:, :, :: H // Hkv] if self.hook_attn_in.has_hooks else mx.broadcast_to(x[:, :, None],
                                                                                              (B, P, Hkv, dm))
        k_in, v_in = self.hook_k_input(kv), self.hook_v_input(kv)
        norm = self.ln1.unhooked if self.pre_norms else (lambda t: t)
        return norm(q_in), norm(k_in), norm(v_in)

    def _mlp(self, x):
        x = self.hook_mlp_in(x)
        h = self.mlp(self.ln2(x) if self.pre_norms else x)
        return self.hook_mlp_out(self.ln2_post(h) if "ln2_post" in self else h)

    def __call__(self, resid: mx.array, mask: Any = "causal", cache: Any = None, offset: Any = None) -> mx.array:
        resid = self.hook_resid_pre(resid)
        if self.parallel:
            resid = resid + self._attn(resid, mask, cache, offset) + self._mlp(resid)
        else:
            resid = self.hook_resid_mid(resid + self._attn(resid, mask, cache, offset))
            resid = resid + self._mlp(resid)
        return self.hook_resid_post(resid)


class Embed(nn.Embedding):
    """The token embedding (``weight`` [V, dm]) with TransformerLens's view ``W_E`` (``model.embed.W_E``).
    Quantized, it becomes MLX's ``QuantizedEmbedding``: read ``model.W_E`` (dequantized) then."""

    @property
    def W_E(self) -> mx.array:
        """[d_vocab, d_model] (without any embedding scale)."""
        return linear_weight(self)


class Unembed(nn.Module):
    """Logits from the final residual. Tied models use the embedding (``embed.as_linear``), else
    ``lm_head`` ([V, dm]). Hooks: ``hook_in`` [B,P,dm], ``hook_out`` [B,P,V] (before any soft-cap).
    ``W_U`` / ``b_U`` are TransformerLens's views (``model.unembed.W_U``)."""

    def __init__(self, cfg: HookedConfig, embed_of=None):
        super().__init__()
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = nn.Linear(cfg.d_model, cfg.d_vocab, bias=bool(cfg.extra.get("unembed_bias", False)))
        # the tied embedding, looked up when needed (quantizing or dequantizing replaces the module)
        object.__setattr__(self, "_embed_of", embed_of)
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    @property
    def W_U(self) -> mx.array:
        """[d_model, d_vocab] (dequantized; the embedding's transpose when tied)."""
        if not self.tied:
            return linear_weight(self.lm_head).T
        if self._embed_of is None:
            raise AttributeError("W_U: this Unembed is tied to an embedding it was not given (embed_of=...).")
        return linear_weight(self._embed_of()).T

    @property
    def b_U(self) -> mx.array:
        """[d_vocab] (zeros when the model has none)."""
        if not self.tied and "bias" in self.lm_head:
            return self.lm_head.bias
        W = self.W_U
        return mx.zeros((W.shape[1],), dtype=W.dtype)

    def __call__(self, x: mx.array, embed: nn.Module) -> mx.array:
        x = self.hook_in(x)
        logits = embed.as_linear(x) if self.tied else self.lm_head(x)
        return self.hook_out(logits)

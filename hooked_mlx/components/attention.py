"""Multi-head attention with GQA, rotary, q/k norms, soft-capping and sliding windows.

Canonical weights (``nn.Linear``, [out, in]): ``q_proj`` [H*dh, dm], ``k_proj`` / ``v_proj`` [Hkv*dh, dm],
``o_proj`` [dm, H*dh]; optional ``q_norm`` / ``k_norm``.

Fast path: when neither ``hook_attn_scores`` nor ``hook_pattern`` has a hook (and there is no soft-cap),
attention runs through ``mx.fast.scaled_dot_product_attention``: GQA without tiling k/v, no [B,H,P,P]
tensor materialised. ``hook_result`` ([B,P,H,dm]) is computed only when hooked.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from einops import rearrange
from mlx_lm.models.rope_utils import initialize_rope

from ..config import HookedConfig
from ..hooks import HookPoint
from .norms import Norm


def linear_weight(layer: nn.Module) -> mx.array:
    """The float [out, in] weight of an ``nn.Linear`` / ``nn.QuantizedLinear`` (dequantized); also the
    [vocab, dm] table of an ``nn.Embedding`` / ``nn.QuantizedEmbedding``."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits,
                             mode=getattr(layer, "mode", "affine"))
    return layer.weight


@cache
def _scores_fn(scale: float, softcap: float, bool_mask: bool):
    """Compiled: raw q.k -> scaled, soft-capped, masked scores (-inf where a bool mask is False; an additive
    mask is added)."""

    def fn(raw, mask):
        s = raw * mx.array(scale, raw.dtype)
        if softcap:
            s = mx.tanh(s / softcap) * softcap
        if bool_mask:
            return mx.where(mask, s, mx.array(-mx.inf, s.dtype))
        return s + mask.astype(s.dtype)

    return mx.compile(fn)


@cache
def _pattern_fn(padded: bool):
    """Compiled softmax over keys in the scores' dtype (float32 accumulation); with a padding mask, rows
    with no key (all -inf: NaN) become 0."""

    def fn(scores):
        p = mx.softmax(scores, axis=-1, precise=True)
        return mx.where(mx.isnan(p), mx.array(0.0, p.dtype), p) if padded else p

    return mx.compile(fn)


def causal_mask(q_len: int, k_len: int, window: int | None = None) -> mx.array:
    """Bool [q_len, k_len], True where query i (at absolute position k_len - q_len + i) may attend key j."""
    offset = k_len - q_len
    qi = mx.arange(offset, offset + q_len)[:, None]
    kj = mx.arange(k_len)[None, :]
    mask = kj <= qi
    if window is not None:
        mask = mask & (kj > qi - window)
    return mask


class Attention(nn.Module):
    """Attention for one block.

    Input x: [B,P,dm] (already normalised). ``mask``: None (no masking), ``"causal"``, or a bool array
    broadcastable to [B,1,Pq,Pk] (True = attend). ``cache``: an mlx-lm KV cache (``update_and_fetch``).
    """

    def __init__(self, cfg: HookedConfig, layer_idx: int):
        super().__init__()
        dm, H, Hkv, dh = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.n_heads, self.n_kv_heads, self.d_head = H, Hkv, dh
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.layer_type = cfg.layer_types[layer_idx]
        self.window = cfg.sliding_window if self.layer_type == "sliding_attention" else None
        self.q_proj = nn.Linear(dm, H * dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(dm, Hkv * dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(dm, Hkv * dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * dh, dm, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = Norm(dh, cfg.normalization if cfg.normalization != "ln" else "rms", cfg.norm_eps)
            self.k_norm = Norm(dh, cfg.normalization if cfg.normalization != "ln" else "rms", cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = Norm(H * dh, "rms", cfg.norm_eps)
            self.k_norm = Norm(Hkv * dh, "rms", cfg.norm_eps)
        self.use_rope = cfg.positional == "rotary"
        if self.use_rope:
            base = cfg.rope_theta
            scaling = cfg.rope_scaling
            if self.layer_type == "sliding_attention" and cfg.rope_local_theta is not None:
                base, scaling = cfg.rope_local_theta, None
            self.rope = initialize_rope(cfg.rotary_dim, base, cfg.rope_traditional, scaling, cfg.n_ctx)
        self.hook_q = HookPoint()  # [B,P,H,dh]
        self.hook_k = HookPoint()  # [B,P,Hkv,dh]
        self.hook_v = HookPoint()  # [B,P,Hkv,dh]
        self.hook_rot_q = HookPoint()  # [B,P,H,dh]
        self.hook_rot_k = HookPoint()  # [B,P,Hkv,dh]
        self.hook_attn_scores = HookPoint()  # [B,H,Pq,Pk]
        self.hook_pattern = HookPoint()  # [B,H,Pq,Pk]
        self.hook_z = HookPoint()  # [B,P,H,dh]
        self.hook_result = HookPoint()  # [B,P,H,dm]

    # -- TransformerLens's per-layer weight views (``model.blocks[l].attn.W_Q``; the model's ``W_Q`` stacks
    # them over layers). GQA: W_K / W_V / b_K / b_V repeat each kv head n_heads // n_kv_heads times;
    # ``_W_K`` / ``_W_V`` / ``_b_K`` / ``_b_V`` are the stored [Hkv, ...] tensors. Quantized: dequantized.
    def _heads_in(self, proj: nn.Module, n: int) -> mx.array:
        """[n*dh, dm] stored weight -> [n, dm, dh]."""
        return rearrange(linear_weight(proj), "(head d_head) d_model -> head d_model d_head", head=n)

    def _bias(self, proj: nn.Module, n: int) -> mx.array:
        b = proj.get("bias")
        return b if b is not None else mx.zeros((n,), dtype=linear_weight(self.q_proj).dtype)

    def _repeat_kv(self, x: mx.array) -> mx.array:
        g = self.n_heads // self.n_kv_heads
        return mx.repeat(x, g, axis=0) if g > 1 else x

    @property
    def W_Q(self) -> mx.array:
        """Query weights [H, d_model, d_head]."""
        return self._heads_in(self.q_proj, self.n_heads)

    @property
    def _W_K(self) -> mx.array:
        return self._heads_in(self.k_proj, self.n_kv_heads)

    @property
    def _W_V(self) -> mx.array:
        return self._heads_in(self.v_proj, self.n_kv_heads)

    @property
    def W_K(self) -> mx.array:
        """Key weights [H, d_model, d_head] (GQA: kv heads repeated to H)."""
        return self._repeat_kv(self._W_K)

    @property
    def W_V(self) -> mx.array:
        """Value weights [H, d_model, d_head] (GQA: kv heads repeated to H)."""
        return self._repeat_kv(self._W_V)

    @property
    def W_O(self) -> mx.array:
        """Output weights [H, d_head, d_model]."""
        return rearrange(linear_weight(self.o_proj), "d_model (head d_head) -> head d_head d_model", head=self.n_heads)

    @property
    def b_Q(self) -> mx.array:
        """[H, d_head] (zeros when the model has no attention bias)."""
        return self._bias(self.q_proj, self.n_heads * self.d_head).reshape(self.n_heads, self.d_head)

    @property
    def _b_K(self) -> mx.array:
        return self._bias(self.k_proj, self.n_kv_heads * self.d_head).reshape(self.n_kv_heads, self.d_head)

    @property
    def _b_V(self) -> mx.array:
        return self._bias(self.v_proj, self.n_kv_heads * self.d_head).reshape(self.n_kv_heads, self.d_head)

    @property
    def b_K(self) -> mx.array:
        """[H, d_head] (GQA repeated)"""
        return self._repeat_kv(self._b_K)

    @property
    def b_V(self) -> mx.array:
        """[H, d_head] (GQA repeated)"""
        return self._repeat_kv(self._b_V)

    @property
    def b_O(self) -> mx.array:
        """[d_model]"""
        return self._bias(self.o_proj, linear_weight(self.o_proj).shape[0])

    @property
    def needs_manual(self) -> bool:
        return bool(self.softcap) or self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks

    def _per_head_projection(self, x: mx.array, proj: nn.Module, n: int) -> mx.array:
        """x [B, P, n, d_model] (one input per head) -> [B, P, n, d_head]: head i's input times head i's weights."""
        y = mx.einsum("bpnm,nmd->bpnd", x, self._heads_in(proj, n).astype(x.dtype))
        b = proj.get("bias")
        return y if b is None else y + b.reshape(n, self.d_head).astype(y.dtype)

    def __call__(self, x: mx.array | None, mask: Any = "causal", cache: Any = None, offset: Any = None,
                 split_inputs: tuple[mx.array, mx.array, mx.array] | None = None) -> mx.array:
        """x [B, P, d_model] (normalised); or ``split_inputs``: one (normalised) input per head for the
        queries [B, P, H, d_model], keys and values [B, P, Hkv, d_model] (TransformerLens's split q/k/v input)."""
        H, Hkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        if split_inputs is None:
            assert x is not None
            B, P, _ = x.shape
            q, k, v = (self.q_proj(x).reshape(B, P, H, dh), self.k_proj(x).reshape(B, P, Hkv, dh),
                       self.v_proj(x).reshape(B, P, Hkv, dh))
        else:
            xq, xk, xv = split_inputs
            B, P = xq.shape[:2]
            q = self._per_head_projection(xq, self.q_proj, H)
            k = self._per_head_projection(xk, self.k_proj, Hkv)
            v = self._per_head_projection(xv, self.v_proj, Hkv)
        # hook_q / hook_k are the projections before any q/k norm, in every family (as TransformerLens)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.qk_norm == "full":  # OLMo2: one norm over all heads' features
            q = self.q_norm(q.reshape(B, P, H * dh)).reshape(B, P, H, dh)
            k = self.k_norm(k.reshape(B, P, Hkv * dh)).reshape(B, P, Hkv, dh)
        elif self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        # [B,heads,P,dh] for rope and attention
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if offset is None:
            offset = cache.offset if cache is not None else 0
        if self.use_rope:
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if self.hook_rot_q.has_hooks:
            q = self.hook_rot_q(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        if self.hook_rot_k.has_hooks:
            k = self.hook_rot_k(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        if self.needs_manual:
            z = self._manual_attention(q, k, v, mask)
        else:
            if isinstance(mask, str) and (self.window is not None or q.shape[2] != k.shape[2]):
                mask = causal_mask(q.shape[2], k.shape[2], self.window)
            elif mask is not None and not isinstance(mask, str) and self.window is not None:
                mask = mask & causal_mask(q.shape[2], k.shape[2], self.window)
            z = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        z = self.hook_z(z.transpose(0, 2, 1, 3))  # [B,P,H,dh]
        if self.hook_result.has_hooks:
            w_o = linear_weight(self.o_proj).reshape(-1, H, dh).astype(z.dtype)  # [dm,H,dh]
            result = self.hook_result(mx.einsum("bphd,mhd->bphm", z, w_o))  # [B,P,H,dm]
            out = result.sum(axis=2)
            if "bias" in self.o_proj:
                out = out + self.o_proj.bias
            return out
        return self.o_proj(z.reshape(B, P, H * dh))

    def _manual_attention(self, q, k, v, mask):
        """Explicit softmax(q k^T) v, materialising scores and pattern for the hooks.

        GQA without copying K/V: the G query heads of each KV head are stacked along the query axis
        ([B, Hkv, G*Pq, dh] @ [B, Hkv, dh, Pk]), then viewed as [B, H, Pq, Pk]. The elementwise work on either
        side of the hooks runs compiled (one pass each), and the softmax reads the scores in their own dtype
        with float32 accumulation (``precise``), so no float32 copy of [B, H, Pq, Pk] is made."""
        B, H, Pq, dh = q.shape
        Hkv, Pk = k.shape[1], k.shape[2]
        G = H // Hkv
        qg, kt = q.reshape(B, Hkv, G * Pq, dh), k.swapaxes(-1, -2)
        if isinstance(mask, str):
            mask, padded = causal_mask(Pq, Pk, self.window), False  # the diagonal is never masked
        else:
            padded = mask is not None  # a padding mask can leave a query row with no key at all
            if mask is not None and self.window is not None:
                mask = mask & causal_mask(Pq, Pk, self.window)
        if not self.softcap and mask is not None and mask.dtype == mx.bool_:
            # scale and mask in the GEMM's epilogue: one write of [B, H, Pq, Pk]. The mask as 0 / -inf, its
            # query rows repeated for the G stacked query heads (row g * Pq + p is query p of head g).
            bias = mx.where(mask, mx.array(0.0, q.dtype), mx.array(-mx.inf, q.dtype))
            bias = mx.tile(bias, (1,) * (bias.ndim - 2) + (G, 1)) if G > 1 else bias
            scores = mx.addmm(bias, qg, kt, alpha=float(self.scale)).reshape(B, H, Pq, Pk)
        else:
            scores = (qg @ kt).reshape(B, H, Pq, Pk)
            scores = _scores_fn(float(self.scale), float(self.softcap or 0.0),
                                mask is not None and mask.dtype == mx.bool_)(
                scores, mask if mask is not None else mx.array(0.0, scores.dtype))
        scores = self.hook_attn_scores(scores)
        pattern = _pattern_fn(padded)(scores)
        pattern = self.hook_pattern(pattern)
        return (pattern.reshape(B, Hkv, G * Pq, Pk) @ v).reshape(B, H, Pq, dh)

"""Attribution patching: the gradient (first-order) approximation of activation patching.

From one clean cache and one corrupted forward + backward (``run_with_cache(incl_bwd=True, metric=...)``):

    attribution[cell] = sum over the cell's entries of (clean_act - corrupted_act) * d metric / d act

evaluated at the corrupted run. It is exact when the metric is linear in the patched activation along the
patch, and otherwise a cheap screen for the cells worth patching exactly. Grids match the activation
patching functions: resid/attn_out/mlp_out [L,P], heads by position [L,P,H] (k/v: Hkv), heads over all
positions [L,H], neurons [L,P,d_mlp]. Every function also accepts ``align=`` (same policy as
activation patching; unpaired positions are NaN) and ``clean_tokens=`` (shown in length errors).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .activation import as_tokens, clean_activations
from .align import align_positions, check_align, require_lengths
from .engine import hook_info


def attribution_patch(model, corrupted_tokens, clean_cache, metric, names: Sequence[str], align=None,
                      clean_tokens=None, whole_sequence: bool = False) -> dict[str, mx.array]:
    """{hook name: (clean - corrupted) * grad, elementwise, float32, [B, ...]} for each hook in ``names``.

    Positions of the corrupted run with no clean counterpart (unequal lengths with ``align``) are NaN."""
    check_align(align)
    tokens = as_tokens(model, corrupted_tokens)
    B, P = tokens.shape
    names = [model.resolve_hook_names(n)[0] for n in names]
    clean, toks = clean_activations(model, clean_cache, names)
    clean_tokens = toks if clean_tokens is None else clean_tokens
    _, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True, metric=metric)
    out = {}
    for n in names:
        info = hook_info(model, n)
        if info.pos_axis is None:
            raise ValueError(f"attribute: {n!r} has no position axis; attribution patching here reads hooks with "
                             f"positions (residual stream, attention, MLP activations).")
        a = mx.broadcast_to(clean[n], (B,) + clean[n].shape[1:])
        Pc = a.shape[info.pos_axis + 1]
        pmap = require_lengths(model, Pc, P, align, clean_tokens, tokens, what=f"attribute {n}",
                               whole_sequence=whole_sequence or info.src_axis is not None)
        if Pc != P or align == "end":
            a = align_positions(a, P, info.pos_axis + 1, pmap)
        corr, grad = cache[n].astype(mx.float32), cache[n + "_grad"].astype(mx.float32)
        attr = (a.astype(mx.float32) - corr) * grad
        if (pmap < 0).any():
            shape = [1] * attr.ndim
            shape[info.pos_axis + 1] = P
            attr = mx.where(mx.array(pmap >= 0).reshape(shape), attr, mx.nan)
        out[n] = attr
    mx.eval(out)
    return out


def _layers(model, hook: str) -> list[str]:
    return [f"blocks.{l}.{hook}" for l in range(model.cfg.n_layers)]


def _by_pos(hook: str):
    def f(model, corrupted_tokens, clean_cache, metric, **kw):
        attrs = attribution_patch(model, corrupted_tokens, clean_cache, metric, _layers(model, hook), **kw)
        # [B,P,d] -> sum over batch and d -> [P]
        return mx.stack([a.reshape(a.shape[0], a.shape[1], -1).sum(axis=(0, 2)) for a in attrs.values()])

    f.__doc__ = f"Attribution for ``blocks.{{l}}.{hook}`` per (layer, position): float32 [n_layers, pos]."
    return f


attribution_patch_resid_pre = _by_pos("hook_resid_pre")
attribution_patch_resid_mid = _by_pos("hook_resid_mid")
attribution_patch_attn_out = _by_pos("hook_attn_out")
attribution_patch_mlp_out = _by_pos("hook_mlp_out")


def attribution_patch_head_by_pos(model, corrupted_tokens, clean_cache, metric, hook: str = "z", **kw):
    """Per (layer, position, head) for ``hook`` in z (head output), q, k, v: float32 [L, P, H] (k/v: Hkv)."""
    attrs = attribution_patch(model, corrupted_tokens, clean_cache, metric, _layers(model, f"attn.hook_{hook}"), **kw)
    return mx.stack([a.sum(axis=(0, 3)) for a in attrs.values()])


def attribution_patch_head_all_pos(model, corrupted_tokens, clean_cache, metric, hook: str = "z", **kw):
    """Per (layer, head), summed over positions: float32 [L, H] (k/v: Hkv). Needs equal lengths."""
    attrs = attribution_patch(model, corrupted_tokens, clean_cache, metric, _layers(model, f"attn.hook_{hook}"),
                              whole_sequence=True, **kw)
    return mx.stack([a.sum(axis=(0, 1, 3)) for a in attrs.values()])


def attribution_patch_neurons(model, corrupted_tokens, clean_cache, metric, hook: str = "post", **kw):
    """Per (layer, position, neuron) of ``mlp.hook_{hook}``: float32 [L, P, d_mlp]."""
    attrs = attribution_patch(model, corrupted_tokens, clean_cache, metric, _layers(model, f"mlp.hook_{hook}"), **kw)
    return mx.stack([a.sum(axis=0) for a in attrs.values()])


def correlation(a: mx.array, b: mx.array) -> float:
    """Pearson correlation of two grids (NaN cells ignored)."""
    x, y = np.array(a, dtype=np.float64).ravel(), np.array(b, dtype=np.float64).ravel()
    ok = ~(np.isnan(x) | np.isnan(y))
    return float(np.corrcoef(x[ok], y[ok])[0, 1])

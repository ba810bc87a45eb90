"""Exact path patching (Wang et al. 2022, "Interpretability in the Wild"): the standard two-pass algorithm.

The effect of sender head(s) on the metric *through* a receiver only:

1. Run the corrupted input with the sender heads' outputs (``hook_z``) set to their clean values and every
   other head's output frozen to its corrupted value (MLPs recompute unless ``freeze_mlps=True``). Record
   the receivers' inputs (``hook_q`` / ``hook_k`` / ``hook_v`` of the receiver heads), or, for the
   residual/unembedding receiver, the final residual (the metric is read from this pass).
2. Run the corrupted input again, patching only the receivers' inputs with the values from pass 1.

Both passes are batched: one row block per sender set. Sequences must have equal lengths (the sender
outputs are patched at every position). Receivers ``(layer, head)`` index key/value heads for k and v.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .activation import as_tokens, clean_activations
from .align import require_lengths
from .engine import _flops_per_token_layer, _scalar, blas_threads
from .metrics import Metric

_INPUTS = ("q", "k", "v")


def _tile(x: mx.array, n: int) -> mx.array:
    return mx.broadcast_to(x[None], (n,) + x.shape).reshape((n * x.shape[0],) + x.shape[1:])


def _values(metric, logits: mx.array, n: int, B: int) -> mx.array:
    logits = logits.reshape((n, B) + logits.shape[1:])
    if isinstance(metric, Metric):
        return metric(logits).astype(mx.float32)
    return mx.stack([_scalar(metric(logits[k]), metric) for k in range(n)]).astype(mx.float32)


def path_patch_sets(model, corrupted_tokens, clean_cache, metric, sender_sets: Sequence[Sequence[tuple[int, int]]],
                    receivers: Sequence[tuple[int, int]] | None = None, receiver_input: str = "q",
                    freeze_mlps: bool = False, clean_tokens=None, max_rows: int = 256) -> mx.array:
    """Metric after path patching each sender set -> receivers: float32 [len(sender_sets)].

    receivers: None = the residual stream / unembedding (direct paths to the logits), else a list of
    (layer, head). receiver_input: "q", "k" or "v" (for several, call once per input)."""
    if receiver_input not in _INPUTS:
        raise ValueError(f"receiver_input must be one of {_INPUTS}; got {receiver_input!r}.")
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    tokens = as_tokens(model, corrupted_tokens)
    B, P = tokens.shape
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    mlp_names = [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    clean, toks = clean_activations(model, clean_cache, z_names)
    Pc = clean[z_names[0]].shape[1]
    require_lengths(model, Pc, P, None, toks if clean_tokens is None else clean_tokens, tokens,
                    what="path patch (sender outputs at every position)", whole_sequence=True)
    _, corr = model.run_with_cache(tokens, names_filter=z_names + mlp_names)
    for s in sender_sets:
        for l, h in s:
            if not (0 <= l < L and 0 <= h < H):
                raise ValueError(f"Sender head ({l}, {h}) is out of range: {L} layers x {H} heads.")
    if receivers is not None:
        n_rh = cfg.n_heads if receiver_input == "q" else cfg.n_key_value_heads
        for l, h in receivers:
            if not (0 <= l < L and 0 <= h < n_rh):
                raise ValueError(f"Receiver ({l}, {h}) is out of range for hook_{receiver_input}: {L} layers x "
                                 f"{n_rh} heads.")
        stop = max(l for l, _ in receivers) + 1
    else:
        stop = L
    out = []
    step = max(1, max_rows // B)
    small = _flops_per_token_layer(cfg, 1) < 1e6
    with blas_threads(1 if (mx.default_device() == mx.cpu and small) else None):
        for a in range(0, len(sender_sets), step):
            sets = sender_sets[a:a + step]
            out.append(_run(model, tokens, clean, corr, metric, sets, receivers, receiver_input, freeze_mlps, stop))
            mx.eval(out[-1])
    return mx.concatenate(out) if out else mx.zeros((0,))


def _run(model, tokens, clean, corr, metric, sets, receivers, receiver_input, freeze_mlps, stop):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    B = tokens.shape[0]
    n = len(sets)
    tiled = _tile(tokens, n)
    mask = [[[False] * H for _ in range(L)] for _ in range(n)]
    for r, s in enumerate(sets):
        for l, h in s:
            mask[r][l][h] = True
    mask = mx.array(mask)  # [n, L, H]

    def freeze_z(l):
        cz, kz = clean[f"blocks.{l}.attn.hook_z"], corr[f"blocks.{l}.attn.hook_z"]

        def hook(act, hp):
            m = mask[:, l][:, None, None, :, None]  # [n,1,1,H,1]
            v = mx.where(m, cz.astype(act.dtype)[None], kz.astype(act.dtype)[None])  # [n,B,P,H,dh]
            return v.reshape(act.shape)

        return hook

    def freeze_mlp(l):
        v = corr[f"blocks.{l}.hook_mlp_out"]
        return lambda act, hp: _tile(v.astype(act.dtype), n)

    hooks = [(f"blocks.{l}.attn.hook_z", freeze_z(l)) for l in range(stop)]
    if freeze_mlps:
        hooks += [(f"blocks.{l}.hook_mlp_out", freeze_mlp(l)) for l in range(stop)]
    if receivers is None:
        logits = model.run_with_hooks(tiled, fwd_hooks=hooks)
        return _values(metric, logits, n, B)

    captured = {}
    recv_names = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers})

    def capture(act, hp):
        captured[hp.name] = act

    model.run_with_hooks(tiled, fwd_hooks=hooks + [(nm, capture) for nm in recv_names], stop_at_layer=stop)
    heads_by_name: dict[str, list[int]] = {}
    for l, h in receivers:
        heads_by_name.setdefault(f"blocks.{l}.attn.hook_{receiver_input}", []).append(h)

    def patch_receiver(name):
        heads = heads_by_name[name]

        def hook(act, hp):
            sel = mx.array([h in heads for h in range(act.shape[2])])[None, None, :, None]
            return mx.where(sel, captured[name].astype(act.dtype), act)

        return hook

    logits = model.run_with_hooks(tiled, fwd_hooks=[(nm, patch_receiver(nm)) for nm in recv_names])
    return _values(metric, logits, n, B)


def path_patch(model, corrupted_tokens, clean_cache, metric, senders: Sequence[tuple[int, int]],
               receivers: Sequence[tuple[int, int]] | None = None, receiver_input: str = "q",
               freeze_mlps: bool = False, clean_tokens=None) -> mx.array:
    """Metric after path patching ``senders`` (list of (layer, head)) -> ``receivers``: a float32 scalar."""
    return path_patch_sets(model, corrupted_tokens, clean_cache, metric, [list(senders)], receivers,
                           receiver_input, freeze_mlps, clean_tokens)[0]


def get_path_patch_head_to_final_resid_post(model, corrupted_tokens, clean_cache, metric,
                                            freeze_mlps: bool = False, **kw) -> mx.array:
    """Each head as the sender, the residual stream / unembedding as the receiver: float32 [L, H]."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sets = [[(l, h)] for l in range(L) for h in range(H)]
    return path_patch_sets(model, corrupted_tokens, clean_cache, metric, sets, None, "q", freeze_mlps,
                           **kw).reshape(L, H)


def get_path_patch_head_to_heads(model, corrupted_tokens, clean_cache, metric, receivers, receiver_input="q",
                                 freeze_mlps: bool = False, **kw) -> mx.array:
    """Each head as the sender, ``receivers`` (their ``receiver_input``) as the receiver: float32 [L, H].
    Heads in or after the first receiver layer cannot reach it through that input: their cells equal the
    corrupted metric."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sets = [[(l, h)] for l in range(L) for h in range(H)]
    return path_patch_sets(model, corrupted_tokens, clean_cache, metric, sets, receivers, receiver_input,
                           freeze_mlps, **kw).reshape(L, H)

"""Interventions on transcoder features: set, scale or zero chosen features and see the logits (and a greedy
continuation) change. The same edit two ways:

* in the real model with the transcoders spliced in (``HookedSAETransformer``, ``use_error_term=True``): the
  edited features change their layer's MLP output by (new - old) x decoder row; everything downstream (attention
  patterns, norms, later MLPs) is recomputed by the model;
* in the local replacement model (``ReplacementModel.run``): attention patterns, norm scales and error nodes stay
  frozen at the prompt's forward, and the later layers' features are recomputed by their transcoders.

An intervention is ``(layer, pos, feature, value)``: ``value`` a number sets the activation; a callable
``value(old) -> new`` scales or shifts it (``scale(2.0)``, ``zero``). ``pos=None`` edits every position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from ..host import to_int
from ..sae.sae import SAE
from .attribution import ReplacementModel
from .transcoders import HOOK_OUT, CrossLayerTranscoder

Intervention = tuple[int, int | None, int, float | Callable[[mx.array], mx.array]]


def scale(factor: float) -> Callable[[mx.array], mx.array]:
    """An intervention value that multiplies the feature's activation by ``factor``."""
    return lambda old: old * factor


def zero(old: mx.array) -> mx.array:
    """An intervention value that sets the feature to 0."""
    return mx.zeros_like(old)


def apply_interventions(acts: mx.array, edits: Sequence[Intervention]) -> mx.array:
    """Latents [..., P, F] with the edits of one layer applied (positions index the second-to-last axis)."""
    P = acts.shape[-2]
    for _, pos, f, value in edits:
        positions = range(P) if pos is None else [pos]
        for p in positions:
            if not -P <= p < P:
                raise ValueError(f"Intervention position {p} is outside the prompt ({P} tokens).")
            old = acts[..., p, f]
            new = value(old) if callable(value) else mx.full(old.shape, float(value), dtype=acts.dtype)
            acts = acts.at[..., p, f].add(new.astype(acts.dtype) - old)
    return acts


def _by_layer(interventions: Sequence[Intervention], n_features: dict[int, int]) -> dict[int, list[Intervention]]:
    out: dict[int, list[Intervention]] = {}
    for iv in interventions:
        layer, _, f, _ = iv
        if layer not in n_features:
            raise ValueError(f"Intervention on layer {layer}: there is no transcoder there ({sorted(n_features)}).")
        if not 0 <= f < n_features[layer]:
            raise ValueError(f"Intervention on feature {f} of layer {layer}: expected 0 <= feature < "
                             f"{n_features[layer]}.")
        out.setdefault(layer, []).append(iv)
    return out


def intervene(model, transcoders: dict[int, SAE] | CrossLayerTranscoder, tokens: mx.array,
              interventions: Sequence[Intervention], *, max_new_tokens: int = 0) -> tuple[mx.array, list[int]]:
    """The real model with the transcoders spliced in (error term kept: unedited, it is the model) and the features
    edited: (logits [P, V] of the prompt, greedy continuation of ``max_new_tokens`` tokens). The edits stay at their
    prompt positions while the continuation is generated (one full forward per new token).

    Per-layer transcoders splice through ``HookedSAETransformer`` (``use_error_term=True``). A cross-layer
    transcoder splices through hooks: each layer's features are computed from this forward's MLP input, and layer
    t's MLP output becomes itself minus the CLT's output from the unedited features of layers <= t plus its output
    from the edited ones (so any model class works)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return _intervene_clt(model, transcoders, tokens, interventions, max_new_tokens)
    from ..sae.splice import HookedSAETransformer

    if not isinstance(model, HookedSAETransformer):
        raise TypeError("intervene splices transcoders into the model: load it as HookedSAETransformer.from_pretrained"
                        "(...) (the graph itself works on any HookedTransformer).")
    edits = _by_layer(interventions, {layer: tc.d_sae for layer, tc in transcoders.items()})
    hooks = []
    for layer, ivs in edits.items():
        name = f"{transcoders[layer].cfg.hook_name_out}.hook_sae_acts_post"
        hooks.append((name, lambda acts, hook, ivs=ivs: apply_interventions(acts, ivs)))
    with model.saes(list(transcoders.values()), use_error_term=True):
        return _generate(model, tokens, hooks, max_new_tokens)


def _generate(model, tokens: mx.array, hooks: list, max_new_tokens: int) -> tuple[mx.array, list[int]]:
    seq = tokens[None] if tokens.ndim == 1 else tokens
    new: list[int] = []
    logits = model.run_with_hooks(seq, fwd_hooks=hooks)
    first = logits
    for _ in range(max_new_tokens):
        nxt = to_int(mx.argmax(logits[0, -1]))
        new.append(nxt)
        seq = mx.concatenate([seq, mx.array([[nxt]], dtype=seq.dtype)], axis=1)
        logits = model.run_with_hooks(seq, fwd_hooks=hooks)
    return first[0], new


def _intervene_clt(model, clt: CrossLayerTranscoder, tokens: mx.array, interventions: Sequence[Intervention],
                   max_new_tokens: int) -> tuple[mx.array, list[int]]:
    L = clt.n_layers
    if L != model.cfg.n_layers:
        raise ValueError(f"The cross-layer transcoder has {L} layers; the model has {model.cfg.n_layers}.")
    edits = _by_layer(interventions, {layer: clt.n_features(layer) for layer in range(L)})
    clean: list[mx.array] = []
    edited: list[mx.array] = []

    def read(layer):
        def fn(act, hook):
            if layer == 0:
                clean.clear()
                edited.clear()
            f = clt.encode(layer, act[0].astype(mx.float32))  # [P, F] (batch 1)
            clean.append(f)
            edited.append(apply_interventions(f, edits.get(layer, [])))
            return act

        return fn

    def write(layer):
        def fn(act, hook):
            delta = clt.decode_layer(layer, edited) - clt.decode_layer(layer, clean)
            return act + delta[None].astype(act.dtype)

        return fn

    hooks = [(f"blocks.{layer}.{clt.hook_in}", read(layer)) for layer in range(L)]
    hooks += [(f"blocks.{layer}.{HOOK_OUT}", write(layer)) for layer in range(L)]
    seq = tokens[None] if tokens.ndim == 1 else tokens
    if seq.shape[0] != 1:
        raise ValueError(f"intervene takes one prompt; got a batch of {seq.shape[0]}.")
    return _generate(model, tokens, hooks, max_new_tokens)


def intervene_replacement(rm: ReplacementModel, tokens: mx.array, interventions: Sequence[Intervention],
                          state: dict | None = None) -> mx.array:
    """The same edits in the local replacement model frozen at ``tokens``: logits [P, V]."""
    edits = _by_layer(interventions, {layer: rm.rep.n_features(layer) for layer in range(rm.n_layers)})
    state = rm.freeze(tokens) if state is None else state
    return rm.run(tokens, state, edit=lambda layer, acts: apply_interventions(acts, edits.get(layer, [])))

"""Feature analysis: which latents fire on a text, where a latent fires most, and what it writes to logits.

* ``top_features(model, sae, text, k)`` -- per token, the k strongest latents (indices and values).
* ``top_contexts(model, sae, feature, corpus)`` -- max-activating examples with token windows.
* ``feature_stats(model, sae, features, corpus)`` -- activation density and histogram.
* ``feature_logit_effects(model, sae, features, k)`` -- W_dec[f] @ W_U: the tokens each latent promotes
  and suppresses (direct path, ignoring the final norm's scale).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..host import to_floats, to_ints, to_nested
from .corpus import ContextBuilder, open_corpus
from .model_io import stop_layer_for, validate_hooks
from .sae import SAE


def _hooks_acts(model, saes: list[SAE], tokens: mx.array, attention_mask: mx.array | None = None
                ) -> list[mx.array]:
    """The activations each SAE reads, from one forward (stopped after the last hook any of them needs)."""
    hooks = []
    for sae in saes:
        if not sae.cfg.hook_name:
            raise ValueError("The SAE has no hook_name, so the activations it reads are unknown; set sae.cfg.hook_name.")
        hooks.append(sae.cfg.hook_name)
    validate_hooks(model, hooks)
    kw: dict[str, Any] = {"names_filter": sorted(set(hooks))}
    stop = stop_layer_for(model, hooks)
    if stop is not None:
        kw["stop_at_layer"] = stop
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    _, cache = model.run_with_cache(tokens, **kw)
    out = []
    for sae, hook in zip(saes, hooks):
        acts = cache[hook]
        if acts.shape[-1] != sae.d_in:
            raise ValueError(f"Hook {hook} has width {acts.shape[-1]} but the SAE takes d_in = {sae.d_in}.")
        out.append(acts)
    return out


def _hook_acts(model, sae: SAE, tokens: mx.array, attention_mask: mx.array | None = None) -> mx.array:
    return _hooks_acts(model, [sae], tokens, attention_mask)[0]


@dataclass
class TokenFeatures:
    """Top latents per token. One text: tokens [P], indices / values [P,k]. Several: [B,P] and [B,P,k],
    right-padded; ``mask`` [B,P] marks real tokens (padded entries: index -1, value 0)."""

    tokens: mx.array
    str_tokens: list
    indices: mx.array
    values: mx.array
    mask: mx.array

    def as_dict(self, position: int, row: int | None = None) -> dict[int, float]:
        """{latent: value} of the active top latents at one position."""
        idx = self.indices[position] if row is None else self.indices[row, position]
        val = self.values[position] if row is None else self.values[row, position]
        return {int(i): float(v) for i, v in zip(to_ints(idx), to_floats(val)) if v != 0}


def top_features(model, sae: SAE, text, k: int = 10, prepend_bos: bool | None = None) -> TokenFeatures:
    """The k strongest latents at every token of ``text`` (a string, a list of strings, or tokens [B,P]).

    Values are sorted descending per token; latents that are not active have value 0.
    """
    single = isinstance(text, str) or (isinstance(text, mx.array) and text.ndim == 1)
    if isinstance(text, mx.array):
        tokens = text[None] if text.ndim == 1 else text
        mask = mx.ones(tokens.shape, dtype=mx.bool_)
    else:
        tokens, mask = model.to_tokens([text] if isinstance(text, str) else list(text), prepend_bos=prepend_bos,
                                       return_mask=True)
    acts = _hook_acts(model, sae, tokens, mask if not bool(mx.all(mask).item()) else None)
    vals, idx = sae.encode_sparse(acts, k)
    idx = mx.where(mask[..., None], idx.astype(mx.int32), -1)
    vals = mx.where(mask[..., None], vals, 0)
    mx.eval(idx, vals)
    strs = model.to_str_tokens(tokens)
    if single:
        return TokenFeatures(tokens[0], strs[0], idx[0], vals[0], mask[0])
    lengths = to_ints(mask.sum(axis=1))
    strs = [s[: int(n)] for s, n in zip(strs, lengths)]
    return TokenFeatures(tokens, strs, idx, vals, mask)


@dataclass
class FeatureExample:
    """One max-activating example: the latent's ``value`` at ``position`` of document ``doc_index``."""

    value: float
    doc_index: int
    position: int
    tokens: list  # the window's token ids
    str_tokens: list
    highlight: int  # index of ``position`` inside the window
    activations: list  # the latent's value at every window token

    def render(self) -> str:
        return "".join(f"[[{t}]]" if i == self.highlight else t for i, t in enumerate(self.str_tokens))


def _latent_blocks(model, saes: list[SAE], feats: list[list[int]], corpus, batch_size: int,
                   context_size: int | None, max_docs: int | None, text_field: str):
    """Yield (first document index, tokens [b, P], per SAE its latents ``feats[i]`` [b, P, n_i] as NumPy, -inf where
    the position is padding, or BOS for an SAE trained without it) for blocks of the corpus's documents (one context
    each; the first SAE's context settings), all SAEs from one forward per block."""
    cfg = saes[0].cfg
    P = context_size or cfg.context_size
    bos = getattr(model, "bos_token_id", None)
    pad = getattr(model, "pad_token_id", None)
    builder = ContextBuilder(open_corpus(corpus, text_field), model.tokenizer, P, bos=bos, pad=pad,
                             prepend_bos=cfg.prepend_bos, packing=False,
                             exclude_special=cfg.exclude_special_tokens, cycle=False)
    sels = [mx.array(f) for f in feats]
    doc = 0
    while max_docs is None or doc < max_docs:
        block = builder.next_block(batch_size if max_docs is None else min(batch_size, max_docs - doc))
        if block is None:
            return
        toks, mask = block
        m = mx.array(mask)[..., None]
        acts = _hooks_acts(model, saes, mx.array(toks))
        yield doc, toks, [np.array(mx.where(m, sae.encode(a)[..., sel], -mx.inf)) for sae, a, sel in
                          zip(saes, acts, sels)]
        doc += toks.shape[0]


def _features(sae: SAE, feature) -> list[int]:
    feats = [feature] if isinstance(feature, int) else [int(f) for f in feature]
    for f_ in feats:
        if not 0 <= f_ < sae.d_sae:
            raise ValueError(f"feature = {f_} is invalid: expected 0 <= feature < d_sae ({sae.d_sae}).")
    return feats


@dataclass
class FeatureStats:
    """Per feature over ``n_tokens`` corpus tokens: ``frac_nonzero`` (the activation density), ``max_value``, and
    a histogram of its non-zero values (``hist_counts`` in ``bins`` equal bins from 0 to ``max_value``, whose
    centres are ``hist_centres``)."""

    features: list
    n_tokens: int
    frac_nonzero: list
    max_value: list
    hist_centres: list
    hist_counts: list


def feature_stats(model, sae: SAE, feature: int | list[int], corpus, *, bins: int = 30, batch_size: int = 8,
                  context_size: int | None = None, max_docs: int | None = None, text_field: str = "text"
                  ) -> FeatureStats:
    """Activation density and histogram of latents ``feature`` over ``corpus`` (the positions ``top_contexts``
    reads: each document one context; padding, and BOS when the SAE was trained without it, left out)."""
    feats = _features(sae, feature)
    values: list[list[np.ndarray]] = [[] for _ in feats]
    n_tokens = 0
    for _, _, (f,) in _latent_blocks(model, [sae], [feats], corpus, batch_size, context_size, max_docs, text_field):
        live = np.isfinite(f[..., 0])
        n_tokens += int(live.sum())
        for j in range(len(feats)):
            v = f[..., j][live]
            values[j].append(v[v > 0])
    fracs, maxes, centres, counts = [], [], [], []
    for vs in values:
        v = np.concatenate(vs) if vs else np.zeros(0)
        fracs.append(float(v.size / max(n_tokens, 1)))
        top = float(v.max()) if v.size else 0.0
        maxes.append(top)
        if v.size:
            c, edges = np.histogram(v, bins=bins, range=(0.0, top))
            centres.append([float(x) for x in (edges[:-1] + edges[1:]) / 2])
            counts.append([int(x) for x in c])
        else:
            centres.append([])
            counts.append([])
    return FeatureStats(feats, n_tokens, fracs, maxes, centres, counts)


def top_contexts(model, sae: SAE, feature: int | list[int], corpus, *, n: int = 10,
                 window: tuple[int, int] = (10, 5), batch_size: int = 8, context_size: int | None = None,
                 max_docs: int | None = None, text_field: str = "text"):
    """The ``n`` token positions of ``corpus`` where latent ``feature`` is largest, with (before, after) windows.

    Each document is one context (truncated at ``context_size``, default ``sae.cfg.context_size``); BOS and
    pad positions are skipped when the SAE was trained without them. Sorted by value, descending.
    ``feature`` may be a list: one pass over the corpus then returns {feature: [FeatureExample, ...]}.
    """
    out = top_contexts_many(model, [(sae, [feature] if isinstance(feature, int) else list(feature))], corpus, n=n,
                            window=window, batch_size=batch_size, context_size=context_size, max_docs=max_docs,
                            text_field=text_field)[0]
    return out[int(feature)] if isinstance(feature, int) else out


def top_contexts_many(model, requests: list[tuple[SAE, list[int]]], corpus, *, n: int = 10,
                      window: tuple[int, int] = (10, 5), batch_size: int = 8, context_size: int | None = None,
                      max_docs: int | None = None, text_field: str = "text") -> list[dict[int, list[FeatureExample]]]:
    """``top_contexts`` for several SAEs (e.g. one transcoder per layer) in one pass over the corpus, one forward
    per block of documents: per request (sae, features), {feature: [FeatureExample, ...]}."""
    saes = [sae for sae, _ in requests]
    feats = [_features(sae, f) for sae, f in requests]
    heaps = [{f_: [] for f_ in fs} for fs in feats]  # type: list[dict[int, list[tuple[float, int, int]]]]
    rows: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}  # doc -> (tokens [P], per request latents [P, n])
    for doc, toks, fs in _latent_blocks(model, saes, feats, corpus, batch_size, context_size, max_docs, text_field):
        for i, f in enumerate(fs):
            for j, f_ in enumerate(feats[i]):
                heap = heaps[i][f_]
                for r, p in zip(*np.nonzero(np.isfinite(f[..., j]))):
                    item = (float(f[r, p, j]), doc + int(r), int(p))
                    if len(heap) < n:
                        heapq.heappush(heap, item)
                    elif item[0] > heap[0][0]:
                        heapq.heapreplace(heap, item)
        for r in range(toks.shape[0]):
            rows[doc + r] = (toks[r], [f[r] for f in fs])
        keep = {d for hs in heaps for heap in hs.values() for _, d, _ in heap}
        rows = {d: v for d, v in rows.items() if d in keep}
    before, after = window
    results = []
    for i in range(len(requests)):
        out = {}
        for j, f_ in enumerate(feats[i]):
            examples = []
            for value, d, p in sorted(heaps[i][f_], reverse=True):
                row_toks, row_fs = rows[d]
                lo, hi = max(0, p - before), min(len(row_toks), p + after + 1)
                ids = [int(t) for t in row_toks[lo:hi]]
                window_acts = [float(a) if np.isfinite(a) else 0.0 for a in row_fs[i][lo:hi, j]]
                examples.append(FeatureExample(value, d, p, ids, model.to_str_tokens(ids), p - lo, window_acts))
            out[f_] = examples
        results.append(out)
    return results


def unembedding(model) -> mx.array:
    """The model's unembedding W_U [d_model, d_vocab]."""
    if hasattr(model, "W_U"):
        return model.W_U
    if getattr(model.cfg, "tie_word_embeddings", False):
        return model.embed.weight.T
    return model.unembed.weight.T


@dataclass
class LogitEffects:
    """Per feature: ``top_tokens`` / ``top_values`` [n,k] (promoted), ``bottom_tokens`` / ``bottom_values``
    [n,k] (suppressed), and the string forms."""

    features: list
    top_tokens: mx.array
    top_values: mx.array
    bottom_tokens: mx.array
    bottom_values: mx.array
    top_str: list
    bottom_str: list


def feature_logit_weights(model, sae: SAE, features=None) -> mx.array:
    """W_dec[features] @ W_U: [n, d_vocab] (all features when None)."""
    W_U = unembedding(model)
    if W_U.shape[0] != sae.d_in:
        raise ValueError(f"The SAE writes d_in = {sae.d_in} dims but W_U is {tuple(W_U.shape)}: logit effects need an "
                         f"SAE on a d_model-wide hook (residual stream, attn_out, mlp_out).")
    W = sae.W_dec if features is None else sae.W_dec[mx.array(features)]
    return W @ W_U.astype(mx.float32)


def feature_logit_effects(model, sae: SAE, features: int | list[int], k: int = 10) -> LogitEffects:
    feats = [features] if isinstance(features, int) else list(features)
    L = feature_logit_weights(model, sae, feats)
    order = mx.argsort(-L, axis=-1)
    top = order[:, :k]
    bottom = order[:, ::-1][:, :k]
    tv = mx.take_along_axis(L, top, axis=-1)
    bv = mx.take_along_axis(L, bottom, axis=-1)
    mx.eval(top, bottom, tv, bv)
    return LogitEffects(feats, top, tv, bottom, bv, [model.to_str_tokens(r) for r in to_nested(top)],
                        [model.to_str_tokens(r) for r in to_nested(bottom)])

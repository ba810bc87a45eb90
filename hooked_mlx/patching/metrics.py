"""Patching metrics, computed from ``log_softmax`` in float32.

A metric is a callable on logits: ``metric(logits [B,P,V]) -> scalar`` (TransformerLens's convention), and
also ``metric(logits [..., B,P,V]) -> [...]`` for a stack of runs. The patching engine only unembeds the
positions a metric reads (``metric.positions``) and calls ``metric.on_selected(sel [..., B, n, V])`` with the
logits at those positions; a plain callable instead gets the full logits of each patched run.

``pos`` is one position for every prompt (an int, negative counts from the end) or one per prompt (a list:
e.g. the last non-pad token of right-padded prompts). Token arguments are an int (every prompt) or one int
per prompt. Values are averaged over the prompts (the batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn


def _as_index(v, name: str) -> mx.array:
    try:
        a = mx.array(v) if not isinstance(v, mx.array) else v
    except (TypeError, ValueError):
        a = None
    if a is None or not mx.issubdtype(a.dtype, mx.integer) or a.ndim > 1 or a.size == 0:
        raise ValueError(f"{name} must be a token id (int) or one id per prompt (a non-empty list of ints); "
                         f"got {v!r}.")
    if int(a.min()) < 0:
        raise ValueError(f"{name}: token ids are >= 0; got {a.tolist()}. Use model.to_single_token(' word') to "
                         f"look an id up.")
    return a.astype(mx.int32)


class _TokenIds:
    """Token ids of a metric ([] or one per prompt) with their largest id read once, at construction, so
    that the checks below never evaluate an array (safe inside compile and grad)."""

    def __init__(self, v, what: str):
        self.ids, self.what = _as_index(v, what), what
        self.max_id = int(self.ids.max())

    def check(self, V: int, B: int) -> mx.array:
        """The ids, after checking them against a vocabulary of V and a batch of B prompts."""
        if self.max_id >= V:
            raise ValueError(f"{self.what}: token id {self.max_id} is out of range for a vocabulary of {V} (ids "
                             f"0..{V - 1}). Check the id (model.to_single_token) and that the metric belongs to "
                             f"this model.")
        if self.ids.ndim == 1 and self.ids.shape[0] != B:
            raise ValueError(f"{self.what}: {self.ids.shape[0]} token ids (one per prompt) but the batch has {B} "
                             f"prompts. Pass one id for every prompt, or a single int for all.")
        return self.ids


class Metric:
    """Base class. Subclasses define ``on_selected(sel)`` with ``sel``: float logits [..., B, n, V] at
    ``self.positions`` (n of them). ``positions`` is a tuple of ints (negative = from the end)."""

    positions: tuple[int, ...] = (-1,)

    def __init__(self, pos: int | Sequence[int] = -1):
        self._pos: int | list[int]
        if isinstance(pos, int):
            self._pos = pos
            self.positions = (pos,)
        else:
            pos_list = [int(p) for p in pos]
            self._pos = pos_list
            self.positions = tuple(sorted(set(pos_list)))

    def _last(self, sel: mx.array) -> mx.array:
        """[..., B, n, V] -> [..., B, V]: each prompt's own metric position."""
        if isinstance(self._pos, int):
            return sel[..., 0, :]
        idx = mx.array([self.positions.index(p) for p in self._pos])  # [B]
        B = sel.shape[-3]
        if idx.shape[0] != B:
            raise ValueError(f"The metric has {idx.shape[0]} positions (one per prompt) but the batch has {B} prompts.")
        onehot = (mx.arange(sel.shape[-2])[None, :] == idx[:, None]).astype(sel.dtype)  # [B,n]
        return (sel * onehot[..., None]).sum(axis=-2)

    def select(self, logits: mx.array) -> mx.array:
        """Full logits [..., B, P, V] -> the metric's positions [..., B, n, V]."""
        idx = self.absolute_positions(logits.shape[-2])
        return mx.take(logits, mx.array(idx), axis=-2)

    def absolute_positions(self, P: int) -> list[int]:
        out = []
        for p in self.positions:
            q = p + P if p < 0 else p
            if not 0 <= q < P:
                raise ValueError(f"{type(self).__name__}: metric position {p} is out of range for sequences of {P} "
                                 f"tokens. Expected a position in -{P}..{P - 1} (negative counts from the end).")
            out.append(q)
        return out

    def on_selected(self, sel: mx.array) -> mx.array:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, logits: mx.array) -> mx.array:
        if logits.ndim < 3:
            raise ValueError(f"A metric takes logits [..., batch, pos, vocab]; got shape {tuple(logits.shape)}.")
        return self.on_selected(self.select(logits).astype(mx.float32))

    def normalized(self, clean_logits: mx.array, corrupted_logits: mx.array) -> NormalizedMetric:
        """This metric rescaled so that the corrupted run scores 0 and the clean run scores 1."""
        return NormalizedMetric(self, float(self(clean_logits)), float(self(corrupted_logits)))


def _logprobs(sel: mx.array) -> mx.array:
    return nn.log_softmax(sel.astype(mx.float32), axis=-1)


def _gather(x: mx.array, tok: mx.array) -> mx.array:
    """x [..., B, V], tok [] or [B] -> [..., B]."""
    if tok.ndim == 0:
        return x[..., tok]
    return mx.take_along_axis(x, mx.broadcast_to(tok[:, None], x.shape[:-1] + (1,)), axis=-1)[..., 0]


class LogitDiff(Metric):
    """logit[correct] - logit[incorrect] at ``pos``, averaged over prompts (e.g. IOI: IO minus S)."""

    def __init__(self, correct, incorrect, pos: int | Sequence[int] = -1):
        super().__init__(pos)
        self._correct = _TokenIds(correct, "LogitDiff correct")
        self._incorrect = _TokenIds(incorrect, "LogitDiff incorrect")
        self.correct, self.incorrect = self._correct.ids, self._incorrect.ids

    def on_selected(self, sel):
        V, B = sel.shape[-1], sel.shape[-3]
        correct, incorrect = self._correct.check(V, B), self._incorrect.check(V, B)
        x = self._last(sel.astype(mx.float32))
        return (_gather(x, correct) - _gather(x, incorrect)).mean(axis=-1)


class LogProb(Metric):
    """log p(token) at ``pos`` (log_softmax in float32), averaged over prompts."""

    def __init__(self, token, pos: int | Sequence[int] = -1):
        super().__init__(pos)
        self._token = _TokenIds(token, f"{type(self).__name__} token")
        self.token = self._token.ids

    def on_selected(self, sel):
        tok = self._token.check(sel.shape[-1], sel.shape[-3])
        return _gather(_logprobs(self._last(sel)), tok).mean(axis=-1)


class Prob(LogProb):
    """p(token) at ``pos`` (exp of the float32 log-probability), averaged over prompts."""

    def on_selected(self, sel):
        tok = self._token.check(sel.shape[-1], sel.shape[-3])
        return mx.exp(_gather(_logprobs(self._last(sel)), tok)).mean(axis=-1)


class KLDivergence(Metric):
    """KL(reference || patched) at ``pos``: sum_v p_ref (log p_ref - log p), float32, averaged over prompts.

    ``reference_logits``: [B,P,V] (e.g. the clean run's logits). 0 when the patched run matches the
    reference. Terms with p_ref == 0 contribute 0 (no NaN from 0 * -inf)."""

    def __init__(self, reference_logits: mx.array, pos: int | Sequence[int] = -1):
        super().__init__(pos)
        ref = self._last(self.select(reference_logits).astype(mx.float32))  # [B,V]
        self.ref_logp = _logprobs(ref)
        mx.eval(self.ref_logp)

    def on_selected(self, sel):
        if sel.shape[-1] != self.ref_logp.shape[-1] or sel.shape[-3] != self.ref_logp.shape[0]:
            raise ValueError(f"KLDivergence: the reference logits are [batch {self.ref_logp.shape[0]}, vocab "
                             f"{self.ref_logp.shape[-1]}], the patched run's [batch {sel.shape[-3]}, vocab "
                             f"{sel.shape[-1]}]. Pass reference logits of the same prompts and model.")
        logp = _logprobs(self._last(sel))
        p_ref = mx.exp(self.ref_logp)
        terms = mx.where(p_ref > 0, p_ref * (self.ref_logp - logp), 0.0)
        return terms.sum(axis=-1).mean(axis=-1)


class NormalizedMetric(Metric):
    """(metric - corrupted) / (clean - corrupted): 0 = the corrupted run, 1 = the clean run."""

    def __init__(self, metric: Metric, clean_value: float, corrupted_value: float):
        if not isinstance(metric, Metric):
            raise TypeError("NormalizedMetric wraps a hooked_mlx.patching Metric (LogitDiff, Prob, ...).")
        if abs(clean_value - corrupted_value) < 1e-12:
            raise ValueError(
                f"The metric is {clean_value} on both the clean and the corrupted run, so it cannot be "
                f"normalised (division by zero). Pick prompts or a metric that separates the two runs."
            )
        self.metric, self.clean_value, self.corrupted_value = metric, clean_value, corrupted_value
        self.positions = metric.positions
        self._pos = metric._pos

    def on_selected(self, sel):
        return (self.metric.on_selected(sel) - self.corrupted_value) / (self.clean_value - self.corrupted_value)


def logit_diff(logits: mx.array, correct, incorrect, pos: int | Sequence[int] = -1) -> mx.array:
    """Functional form of ``LogitDiff``."""
    return LogitDiff(correct, incorrect, pos)(logits)


def normalize(value, clean_value: float, corrupted_value: float):
    """(value - corrupted) / (clean - corrupted)."""
    return (value - corrupted_value) / (clean_value - corrupted_value)

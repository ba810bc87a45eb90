"""Logit lens and tuned lens: what the residual stream at each layer would predict.

* ``logit_lens(model, input)``: decode the residual stream entering every layer (and the final one) with
  the model's own final norm + unembedding (norm recomputed per layer, final soft-cap applied): top tokens
  and probabilities as arrays, and a printable table.
* ``TunedLens``: one affine translator per layer, h -> h + W h + b (identity at initialisation, so an
  untrained tuned lens is the logit lens), trained to minimise KL(final distribution || lens
  distribution); saved / loaded as safetensors; ``kl_per_layer`` evaluates it.

Both only use ``blocks.{l}.hook_resid_pre``, the last ``hook_resid_post``, ``ln_final`` and the
unembedding, so they work for every architecture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn


def _resid_filter(n_layers: int):
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    return lambda name: name.endswith("hook_resid_pre") or name == last


def _resid_stack(model, input, pos, **kwargs):
    """Residual before each layer + final residual: ([L+1, B, (P), dm], labels, cache)."""
    _, cache = model.run_with_cache(input, names_filter=_resid_filter(model.cfg.n_layers), **kwargs)
    stack, labels = cache.accumulated_resid(pos_slice=pos, return_labels=True)
    return stack, labels, cache


@dataclass
class LensResult:
    """Per-layer predictions. ``top_tokens`` / ``top_probs``: [L+1, B, (P), k] (P absent for an integer
    ``pos``), best first; ``labels``: "{l}_pre" (residual entering layer l) ... "final_post";
    ``logits`` [L+1, B, (P), V] only with ``return_logits``; ``str_tokens``: the input's tokens per row."""

    labels: list[str]
    top_tokens: mx.array
    top_probs: mx.array
    positions: Any
    logits: mx.array | None = None
    str_tokens: list[list[str]] | None = None
    token_strings: list | None = field(default=None, repr=False)  # decoded top_tokens, same nesting
    kind: str = "logit lens"

    def table(self, batch: int = 0, pos: int = -1, k: int | None = None) -> str:
        """A text table: one line per layer with its top-k tokens and probabilities (for one row and, when
        several positions were decoded, position index ``pos`` of them)."""
        tt, tp = self.top_tokens[:, batch], self.top_probs[:, batch]
        strings = [row[batch] for row in self.token_strings] if self.token_strings is not None else None
        multi = tt.ndim == 3
        if multi:
            tt, tp = tt[:, pos], tp[:, pos]
            if strings is not None:
                strings = [s[pos] for s in strings]
        k = tt.shape[-1] if k is None else min(k, tt.shape[-1])
        where = f"{pos} of {self.positions!r}" if multi else repr(self.positions)
        head = f"{self.kind} (row {batch}, position {where})"
        if self.str_tokens is not None and isinstance(self.positions, int):
            head += f": next token after {self.str_tokens[batch][self.positions]!r}"
        lines = [head]
        width = max(len(label) for label in self.labels)
        for i, label in enumerate(self.labels):
            cells = []
            for j in range(k):
                t = int(tt[i, j])
                s = strings[i][j] if strings is not None else str(t)
                cells.append(f"{s!r} {float(tp[i, j]):.3f}")
            lines.append(f"{label:>{width}} | " + "  ".join(cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _topk(logits: mx.array, k: int):
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    idx = mx.argsort(-probs, axis=-1)[..., :k]
    return idx, mx.take_along_axis(probs, idx, axis=-1)


def _decode(model, tokens: mx.array):
    if model.tokenizer is None:
        return None
    return _map_nested(tokens.tolist(), lambda t: model.to_str_tokens([t])[0])


def _map_nested(x, fn):
    return [_map_nested(v, fn) for v in x] if isinstance(x, list) else fn(x)


def logit_lens(model, input, pos: int | list | slice | None = -1, k: int = 5, return_logits: bool = False,
               prepend_bos: bool | None = None, padding_side: str | None = "left",
               attention_mask: mx.array | None = None) -> LensResult:
    """The logit lens of ``input``: the residual stream entering each layer and the final residual, each
    through ``ln_final`` (recomputed for that residual) and the unembedding (and any final soft-cap).

    pos: which positions (-1: the last; None: all; an int / list / slice). A batch of texts is
    left-padded by default, so pos=-1 is every row's last real token. The last entry (``final_post``)
    equals the model's own output distribution. Print the result (or ``.table(batch, pos)``) for a table.
    """
    kw: dict = {"prepend_bos": prepend_bos, "padding_side": padding_side}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    stack, labels, cache = _resid_stack(model, input, pos, **kw)
    return _lens_result(model, input, model._final(stack), labels, pos, k, return_logits, prepend_bos,
                        padding_side, "logit lens")


def _lens_result(model, input, logits, labels, pos, k, return_logits, prepend_bos, padding_side,
                 kind: str) -> LensResult:
    """Top-k tokens and probabilities of per-layer ``logits`` [L+1, B, (P), V], with the input's tokens."""
    top, probs = _topk(logits, k)
    mx.eval(top, probs)
    str_tokens = None
    if model.tokenizer is not None:
        toks = model._as_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        str_tokens = [model.to_str_tokens(row) for row in toks]
    return LensResult(labels=labels, top_tokens=top, top_probs=probs, positions=pos,
                      logits=logits if return_logits else None, str_tokens=str_tokens,
                      token_strings=_decode(model, top), kind=kind)


def _kl(logp_ref: mx.array, logp: mx.array) -> mx.array:
    """KL(ref || other) over the last axis, from log-probabilities: [...]."""
    return (mx.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1)


class TunedLens(nn.Module):
    """One affine translator per layer: lens_l(h) = final(h + h @ W_l.T + b_l), W_l = b_l = 0 at init.

    Translator ``l`` reads the residual entering layer ``l`` (``blocks.{l}.hook_resid_pre``). Float32."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.n_layers, self.d_model = n_layers, d_model
        self.translators = [nn.Linear(d_model, d_model) for _ in range(n_layers)]
        for t in self.translators:
            t.weight = mx.zeros((d_model, d_model))
            t.bias = mx.zeros((d_model,))

    @classmethod
    def for_model(cls, model) -> TunedLens:
        return cls(model.cfg.n_layers, model.cfg.d_model)

    def _check(self, model):
        if (model.cfg.n_layers, model.cfg.d_model) != (self.n_layers, self.d_model):
            raise ValueError(f"This tuned lens has {self.n_layers} layers of width {self.d_model}; the model has "
                             f"{model.cfg.n_layers} layers of width {model.cfg.d_model}.")

    def translate(self, resid: mx.array, layer: int) -> mx.array:
        h = resid.astype(mx.float32)
        return h + self.translators[layer](h)

    def logits(self, model, resid: mx.array, layer: int) -> mx.array:
        """Lens logits [..., V] of a residual [..., dm] entering ``layer``."""
        return model._final(self.translate(resid, layer))

    def _targets(self, model, tokens, mask):
        kw = {} if mask is None else {"attention_mask": mask}
        logits, cache = model.run_with_cache(tokens, names_filter=_resid_filter(model.cfg.n_layers), **kw)
        resid = [cache[f"blocks.{l}.hook_resid_pre"].astype(mx.float32) for l in range(model.cfg.n_layers)]
        ref = nn.log_softmax(logits.astype(mx.float32), axis=-1)
        weight = mx.ones(tokens.shape, mx.float32) if mask is None else mask.astype(mx.float32)
        return resid, ref, weight

    def _loss(self, model, resid, ref, weight, layers=None):
        layers = range(self.n_layers) if layers is None else layers
        total = 0.0
        for l in layers:
            logp = nn.log_softmax(self.logits(model, resid[l], l).astype(mx.float32), axis=-1)
            total = total + (_kl(ref, logp) * weight).sum() / weight.sum()
        return total / len(layers)

    def fit(self, model, data: Iterable, epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.0,
            prepend_bos: bool | None = None, verbose: bool = False) -> list[float]:
        """Train the translators with Adam on ``data``: an iterable of batches, each a text, a list of
        texts (left-padded, masked), or token ids [B,P]. Returns the mean-over-layers KL of every step."""
        import mlx.optimizers as optim

        self._check(model)
        opt = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)
        batches = list(data)
        losses: list[float] = []

        def loss_fn(lens, resid, ref, weight):
            return lens._loss(model, resid, ref, weight)

        step = nn.value_and_grad(self, loss_fn)
        for _ in range(epochs):
            for batch in batches:
                toks, mask = model._as_tokens(batch, prepend_bos=prepend_bos, padding_side="left", return_mask=True)
                resid, ref, weight = self._targets(model, toks, mask)
                loss, grads = step(self, resid, ref, weight)
                opt.update(self, grads)
                mx.eval(self.parameters(), opt.state, loss)
                losses.append(float(loss))
                if verbose:
                    print(f"tuned lens step {len(losses)}: KL {losses[-1]:.4f}")
        return losses

    def kl_per_layer(self, model, data: Iterable, prepend_bos: bool | None = None) -> mx.array:
        """Mean KL(final || lens) [n_layers] over the (unpadded) tokens of ``data`` (batches as in ``fit``).
        ``TunedLens.for_model(model).kl_per_layer(...)`` is the logit lens's KL."""
        self._check(model)
        sums = mx.zeros((self.n_layers,), mx.float32)
        count = mx.array(0.0)
        for batch in data:
            toks, mask = model._as_tokens(batch, prepend_bos=prepend_bos, padding_side="left", return_mask=True)
            resid, ref, weight = self._targets(model, toks, mask)
            per = []
            for l in range(self.n_layers):
                logp = nn.log_softmax(self.logits(model, resid[l], l).astype(mx.float32), axis=-1)
                per.append((_kl(ref, logp) * weight).sum())
            sums = sums + mx.stack(per)
            count = count + weight.sum()
            mx.eval(sums, count)
        return sums / count

    def save(self, path: str | os.PathLike, overwrite: bool = False, **metadata) -> Path:
        """Write the translators to a .safetensors file (atomically), with n_layers / d_model metadata. An
        existing file is refused unless ``overwrite=True``."""
        from .host import flat_items
        from .outputs import write_file_atomic

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"A tuned lens is saved as .safetensors; got {path.name!r}.")
        meta = {"format": "hooked_mlx.tuned_lens", "n_layers": str(self.n_layers), "d_model": str(self.d_model),
                "extra": json.dumps(metadata)}
        weights = dict(flat_items(self.parameters()))
        return write_file_atomic(path, lambda tmp: mx.save_safetensors(tmp, weights, metadata=meta),
                                 overwrite=overwrite, what="TunedLens.save", suffix=".safetensors")

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> TunedLens:
        """Read a lens written by ``save`` (checked against ``model`` when given)."""
        from .host import load_with_metadata
        from .readers import check_safetensors

        check_safetensors(path)
        weights, meta = load_with_metadata(str(path))
        if meta.get("format") != "hooked_mlx.tuned_lens":
            raise ValueError(f"{path} is not a hooked_mlx tuned lens (metadata format {meta.get('format')!r}).")
        lens = cls(int(meta["n_layers"]), int(meta["d_model"]))
        lens.load_weights(list(weights.items()), strict=True)
        if model is not None:
            lens._check(model)
        return lens

    def lens(self, model, input, pos: int | list | slice | None = -1, k: int = 5, return_logits: bool = False,
             prepend_bos: bool | None = None, padding_side: str | None = "left") -> LensResult:
        """Like ``logit_lens`` but through the translators (the final entry is the model's output)."""
        self._check(model)
        stack, labels, _ = _resid_stack(model, input, pos, prepend_bos=prepend_bos, padding_side=padding_side)
        logits = mx.stack([self.logits(model, stack[l], l) for l in range(self.n_layers)]
                          + [model._final(stack[-1]).astype(mx.float32)])
        return _lens_result(model, input, logits, labels, pos, k, return_logits, prepend_bos, padding_side,
                            "tuned lens")

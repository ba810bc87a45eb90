"""Text generation with a KV cache (mlx-lm's ``KVCache``), hooks active at every step.

``model.generate(...)`` runs the hooked forward, so any hook attached with ``model.hooks([...])``,
``add_hook`` or ``generate(..., fwd_hooks=[...])`` fires on every step: on the whole prompt first, then
(with ``use_past_kv_cache``) on each new token only -- ``hook_k`` / ``hook_v`` see the new positions,
patterns are [B,H,1,past+1]. A steering vector added to ``blocks.L.hook_resid_post`` therefore steers every
generated token.

Prompts of unequal length are left-padded and masked, with per-row positions, so each row generates what
it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import mlx.core as mx


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is not None:
        return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    ids: set[int] = set()
    tok = model.tokenizer
    if tok is not None:
        ids |= set(getattr(tok, "eos_token_ids", None) or [])
        if isinstance(getattr(tok, "eos_token_id", None), int):
            ids.add(tok.eos_token_id)
    cfg_eos = model.cfg.eos_token_id
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids |= set(cfg_eos)
    return ids


def sample_logits(logits: mx.array, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, do_sample: bool = True, key: mx.array | None = None) -> mx.array:
    """Next tokens [B] from last-position logits [B,V]: greedy when ``do_sample`` is False or temperature is
    0, else sampling from softmax(logits / temperature) restricted to the top_k tokens and the smallest set
    of tokens whose probability reaches top_p (nucleus)."""
    logits = logits.astype(mx.float32)
    if not do_sample or temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / temperature
    neg = mx.array(-mx.inf, mx.float32)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = mx.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # probability mass of strictly better tokens
        sorted_logits = mx.where(before >= top_p, neg, sorted_logits)
        choice = mx.random.categorical(sorted_logits, key=key)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits, key=key)


def _check_generate_args(max_new_tokens, temperature, top_k, top_p, freq_penalty) -> None:
    """One clear error per bad sampling argument (TransformerLens's generate takes the same ones)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}.")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1; got {top_k!r}.")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be None or a number in (0, 1]; got {top_p!r}.")
    if not isinstance(freq_penalty, (int, float)) or not math.isfinite(freq_penalty):
        raise ValueError(f"generate: freq_penalty must be a finite number; got {freq_penalty!r}.")


def generate(
    model,
    input: Any = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    padding_side: str = "left",
    return_type: str = "input",
    attention_mask: mx.array | None = None,
    fwd_hooks: Iterable = (),
    seed: int | None = None,
    verbose: bool = False,
):
    """Generate ``max_new_tokens`` tokens after ``input`` (TL's signature; samples by default like TL --
    pass ``do_sample=False`` or ``temperature=0`` for greedy decoding).

    input: text, a list of texts (left-padded and masked), or token ids [B,P] / [P] (with
    ``attention_mask`` [B,P] if they are left-padded). return_type: "input" (text for text input, else
    tokens), "str" (text without the padding), "tokens" ([B, P + new] ids, prompt included). Rows that
    hit an EOS token (``stop_at_eos``) keep emitting it; generation stops when all rows are done.
    use_past_kv_cache: reuse keys/values (mlx-lm ``KVCache`` per layer) instead of re-running the prefix.
    fwd_hooks: hooks active for this call only (in addition to hooks already attached).
    """
    from mlx_lm.models.cache import KVCache

    _check_generate_args(max_new_tokens, temperature, top_k, top_p, freq_penalty)
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens'; got {return_type!r}.")
    text_input = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    if text_input:
        if padding_side != "left":
            raise ValueError("generate pads a batch of prompts on the left (new tokens follow each prompt); "
                             f"got padding_side={padding_side!r}.")
        tokens, mask = model.to_tokens(input, prepend_bos=prepend_bos, padding_side="left", return_mask=True)
    else:
        tokens = model._as_token_array(input)
        mask = None if attention_mask is None else mx.array(attention_mask).astype(mx.bool_).reshape(tokens.shape)
    if mask is not None and bool(mask.all()):
        mask = None
    if mask is not None and bool((~mask[:, -1]).any()):
        raise ValueError("generate needs left padding (every prompt ending at the last position); the "
                         "attention_mask has pads at the end of a row.")
    B = tokens.shape[0]
    if model.cfg.positional == "learned":  # there are no positions past n_ctx: refuse before generating
        model.check_context(tokens.shape[1] + max_new_tokens, what="The prompt plus max_new_tokens")
    eos = _eos_ids(model, eos_token_id) if stop_at_eos else set()
    if stop_at_eos and not eos:
        raise ValueError("stop_at_eos=True but neither the tokenizer nor the config defines an EOS token; pass "
                         "eos_token_id=... or stop_at_eos=False.")
    fill = min(eos) if eos else model.pad_token_id
    key = mx.random.key(seed) if seed is not None else None
    cache = [KVCache() for _ in range(model.cfg.n_layers)] if use_past_kv_cache else None
    finished = mx.zeros((B,), dtype=mx.bool_)
    eos_arr = mx.array(sorted(eos), dtype=mx.int32) if eos else None
    counts = mx.zeros((B, model.cfg.d_vocab), dtype=mx.float32) if freq_penalty else None
    all_tokens, full_mask = tokens, mask
    step_input = tokens
    new = []
    with model.hooks(list(fwd_hooks)):
        for i in range(max_new_tokens):
            if use_past_kv_cache:
                logits = model.forward(step_input, past_kv_cache=cache, attention_mask=full_mask)
            else:
                logits = model.forward(all_tokens, attention_mask=full_mask)
            last = logits[:, -1, :].astype(mx.float32)
            if counts is not None:
                last = last - freq_penalty * counts
            if key is not None:
                key, sub = mx.random.split(key)
            else:
                sub = None
            nxt = sample_logits(last, temperature, top_k, top_p, do_sample, key=sub).astype(mx.int32)
            if eos_arr is not None:
                nxt = mx.where(finished, mx.array(fill, mx.int32), nxt)
                finished = finished | (nxt[:, None] == eos_arr[None]).any(axis=1)
            if counts is not None:
                counts = counts + (mx.arange(model.cfg.d_vocab)[None] == nxt[:, None])
            mx.eval(nxt, finished)
            new.append(nxt)
            all_tokens = mx.concatenate([all_tokens, nxt[:, None]], axis=1)
            if full_mask is not None:
                full_mask = mx.concatenate([full_mask, mx.ones((B, 1), dtype=mx.bool_)], axis=1)
            step_input = nxt[:, None]
            if verbose:
                print(f"step {i + 1}/{max_new_tokens}: {nxt.tolist()}")
            if eos_arr is not None and bool(finished.all()):
                break
    if return_type == "tokens" or (return_type == "input" and not text_input):
        return all_tokens
    rows = all_tokens.tolist()
    if mask is not None:
        m = mask.tolist()
        rows = [[t for j, t in enumerate(r) if j >= len(mr) or mr[j]] for r, mr in zip(rows, m)]
    texts = [model.to_string(r) for r in rows]
    return texts[0] if isinstance(input, str) else texts

"""TransformerLens's ``utils`` functions that its users reach for, on MLX arrays.

``to_numpy``, ``get_corner``, ``test_prompt``, ``tokenize_and_concatenate``, ``lm_cross_entropy_loss``,
``lm_accuracy``, ``get_act_name``. Differences from TransformerLens are stated in each docstring and in
docs/from-transformerlens.md.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from .factored_matrix import FactoredMatrix
from .host import to_int
from .model import lm_cross_entropy
from .names import get_act_name

__all__ = ["to_numpy", "get_corner", "test_prompt", "tokenize_and_concatenate", "lm_cross_entropy_loss",
           "lm_accuracy", "get_act_name"]


def to_numpy(x: Any) -> np.ndarray:
    """An ``np.ndarray`` of an mx.array, a FactoredMatrix (its product), a list, tuple or number."""
    if isinstance(x, FactoredMatrix):
        return np.array(x.AB)
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, int, float, bool)):
        return np.array(x)
    raise TypeError(f"to_numpy takes an mx.array, FactoredMatrix, np.ndarray, list, tuple or number; got "
                    f"{type(x).__name__}.")


def get_corner(x: Any, n: int = 3):
    """The [:n, :n, ...] corner of an array (every axis), or of a FactoredMatrix's product (computed on the
    corner only, as TransformerLens does)."""
    if isinstance(x, FactoredMatrix):
        return x.get_corner(n)
    return x[tuple(slice(n) for _ in range(x.ndim))]


def lm_cross_entropy_loss(logits: mx.array, tokens: mx.array, attention_mask: mx.array | None = None,
                          per_token: bool = False) -> mx.array:
    """Next-token cross-entropy in float32 (stable for any vocabulary): the mean, or [B, P-1] per token.
    ``attention_mask`` [B, P] (True = real token) leaves pad predictions out."""
    return lm_cross_entropy(logits, tokens, per_token=per_token, attention_mask=attention_mask)


def lm_accuracy(logits: mx.array, tokens: mx.array, per_token: bool = False) -> mx.array:
    """Top-1 next-token accuracy: the mean, or a [B, P-1] bool array."""
    right = mx.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    return right if per_token else right.astype(mx.float32).mean()


def test_prompt(prompt: str, answer: str | list[str], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10
                ) -> list[tuple[str, int]]:
    """TransformerLens's ``test_prompt``: how the model ranks each token of ``answer`` after ``prompt``.

    Prints the tokenized prompt and answer, then per answer token its rank, logit, probability and the
    ``top_k`` predictions, then the list of ranks (plain text where TransformerLens uses ``rich``).
    Returns [(answer token, rank)] (TransformerLens returns None). Ranks count from 0."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    ranks: list[tuple[str, int]] = []
    for ans in answers:
        if prepend_space_to_answer and not ans.startswith(" "):
            ans = " " + ans
        prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
        answer_tokens = model.to_tokens(ans, prepend_bos=False)
        tokens = mx.concatenate([prompt_tokens, answer_tokens], axis=1)
        prompt_str = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
        answer_str = model.to_str_tokens(ans, prepend_bos=False)
        n_prompt, n_answer = prompt_tokens.shape[1], answer_tokens.shape[1]
        if print_details:
            print("Tokenized prompt:", prompt_str)
            print("Tokenized answer:", answer_str)
        logits = model(tokens).astype(mx.float32)
        probs = mx.softmax(logits, axis=-1)
        for j in range(n_answer):
            pos = n_prompt + j - 1  # the prediction of token n_prompt + j
            target = to_int(tokens[0, n_prompt + j])
            order = np.argsort(-np.array(logits[0, pos]), kind="stable")
            rank = int(np.nonzero(order == target)[0][0])
            ranks.append((answer_str[j], rank))
            if print_details:
                print(f"Performance on answer token:\nRank: {rank: <8} Logit: {logits[0, pos, target].item():5.2f} "
                      f"Prob: {probs[0, pos, target].item():6.2%} Token: |{answer_str[j]}|")
                for i in range(min(top_k, order.size)):
                    t = int(order[i])
                    print(f"Top {i}th token. Logit: {logits[0, pos, t].item():5.2f} Prob: "
                          f"{probs[0, pos, t].item():6.2%} Token: |{model.to_str_tokens([t])[0]}|")
    print(f"Ranks of the answer tokens: {ranks}")
    return ranks


test_prompt.__test__ = False  # type: ignore[attr-defined]  # a library function named test_*: not a pytest test


def tokenize_and_concatenate(dataset: Any, tokenizer, streaming: bool = False, max_length: int = 1024,
                             column_name: str = "text", add_bos_token: bool = True, num_proc: int = 10
                             ) -> dict[str, mx.array]:
    """TransformerLens's ``tokenize_and_concatenate``: join the texts with the EOS token, tokenize, cut
    into rows of ``max_length`` (each starting with BOS when ``add_bos_token``; the remainder is dropped).

    ``dataset``: a list of strings, or anything indexable by ``column_name`` (a Hugging Face dataset).
    ``tokenizer``: the model's (``model.tokenizer``) or a Hugging Face tokenizer. Returns
    ``{"tokens": mx.array [rows, max_length]}`` (TransformerLens returns a ``datasets.Dataset``; both are
    read as ``ds["tokens"]``). The whole text is tokenized at once, so rows do not depend on ``num_proc``
    (accepted for compatibility, unused; so is ``streaming``)."""
    texts = list(dataset[column_name]) if not isinstance(dataset, (list, tuple)) else list(dataset)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"tokenize_and_concatenate needs strings; got {type(texts[0]).__name__} items.")
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError("The tokenizer has no eos_token to join the texts with.")
    ids = tokenizer.encode(eos.join(texts), add_special_tokens=False)
    seq = max_length - 1 if add_bos_token else max_length
    if seq < 1:
        raise ValueError(f"max_length = {max_length} leaves no room for tokens.")
    rows = len(ids) // seq
    if rows == 0:
        raise ValueError(f"The texts make {len(ids)} tokens, fewer than one row of {seq}; lower max_length.")
    toks = np.array(ids[: rows * seq], dtype=np.int32).reshape(rows, seq)
    if add_bos_token:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("add_bos_token=True but the tokenizer has no BOS token; pass add_bos_token=False.")
        toks = np.concatenate([np.full((rows, 1), bos, dtype=np.int32), toks], axis=1)
    return {"tokens": mx.array(toks)}

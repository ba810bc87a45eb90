"""The sequence-length policy shared by patching and interventions.

Default (``align=None``): clean and corrupted sequences must have the same length, else a ``ValueError``
showing both lengths, both token lists and the options. ``align="end"`` pairs the last tokens (corrupted
position i <-> clean position i - (P_corrupted - P_clean)); ``align="start"`` pairs position i with i.
Positions without a counterpart are not patched (their cells are NaN in a result grid). A patch of a whole
sequence axis (``_all_pos`` patches, attention source positions) of mismatched lengths is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ALIGN_OPTIONS = (None, "end", "start")


def _token_strings(model: Any, tokens) -> str:
    if tokens is None:
        return "(not given: pass clean_tokens=... to see them)"
    try:
        import mlx.core as mx

        t = tokens
        if isinstance(t, mx.array):
            t = t.tolist()
        if t and isinstance(t[0], list):
            t = t[0]
        if model is not None and getattr(model, "tokenizer", None) is not None:
            return repr(model.to_str_tokens(list(t)))
        return repr(list(t))
    except Exception:  # pragma: no cover - display only
        return repr(tokens)


def check_align(align) -> None:
    if align not in ALIGN_OPTIONS:
        raise ValueError(f"align must be None (strict: equal lengths), 'end' or 'start'; got {align!r}.")


def length_error(model, clean_len: int, corrupted_len: int, clean_tokens=None, corrupted_tokens=None,
                 what: str = "patch", whole_sequence: bool = False) -> ValueError:
    head = (f"Cannot {what}: the clean run has {clean_len} tokens and the corrupted run has {corrupted_len}.\n"
            f"  clean     ({clean_len}): {_token_strings(model, clean_tokens)}\n"
            f"  corrupted ({corrupted_len}): {_token_strings(model, corrupted_tokens)}\n")
    if whole_sequence:
        return ValueError(
            head + "This patch copies a whole sequence axis (every position, or attention source positions), "
            "which has no meaning across different lengths, so align= cannot help. Options: make the prompts "
            "the same length (pad or reword them so that corresponding tokens line up), or use a by-position "
            "patch with align='end' or align='start'."
        )
    return ValueError(
        head + "Options: make the prompts the same length (pad or reword them so that corresponding tokens line "
        "up); or pass align='end' (pair the last tokens: useful when the prompts differ at the start) or "
        "align='start' (pair the first tokens). Positions without a counterpart are left unpatched (NaN "
        "cells in a result grid)."
    )


def position_map(clean_len: int, corrupted_len: int, align) -> np.ndarray:
    """int array [corrupted_len]: the clean position paired with each corrupted position, or -1."""
    check_align(align)
    i = np.arange(corrupted_len)
    if align == "end":
        j = i - (corrupted_len - clean_len)
    else:
        j = i.copy()
    j[(j < 0) | (j >= clean_len)] = -1
    return j


def require_lengths(model, clean_len: int, corrupted_len: int, align, clean_tokens=None, corrupted_tokens=None,
                    what: str = "patch", whole_sequence: bool = False) -> np.ndarray:
    """The position map, or the policy's ValueError."""
    check_align(align)
    if clean_len != corrupted_len and (align is None or whole_sequence):
        raise length_error(model, clean_len, corrupted_len, clean_tokens, corrupted_tokens, what, whole_sequence)
    return position_map(clean_len, corrupted_len, align or "start")


def align_positions(clean, corrupted_len: int, pos_axis: int, pmap: np.ndarray, fill=None):
    """Take ``clean`` [..., P_clean (at pos_axis), ...] onto corrupted positions: [..., P_corrupted, ...].

    Positions whose map is -1 get ``fill`` (an array of the output shape) or zeros."""
    import mlx.core as mx

    src = np.where(pmap < 0, 0, pmap)
    out = mx.take(clean, mx.array(src.astype(np.int32)), axis=pos_axis)
    if (pmap < 0).any():
        shape = [1] * out.ndim
        shape[pos_axis] = corrupted_len
        valid = mx.array(pmap >= 0).reshape(shape)
        out = mx.where(valid, out, fill if fill is not None else mx.zeros_like(out))
    return out


def seq_len_of(x: Sequence | Any) -> int:
    return len(x) if not hasattr(x, "shape") else x.shape[-1]

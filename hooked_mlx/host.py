"""Typed host reads of MLX values: ``mx.array.tolist()`` / ``item()`` and ``mlx.utils.tree_flatten`` are
annotated with unions (a scalar or a nested list; a list or a dict) that every caller would have to narrow.
These wrappers say what the caller knows: the rank of the array, or that the flattened tree is a list."""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten


def to_float(a: mx.array) -> float:
    """A one-element array as a Python float."""
    return float(cast(float, a.item()))


def to_int(a: mx.array) -> int:
    """A one-element integer (or bool) array as a Python int."""
    return int(cast(int, a.item()))


def to_floats(a: mx.array) -> list[float]:
    """A 1-D array as a list of floats."""
    return [float(v) for v in cast(list, a.tolist())]


def to_ints(a: mx.array) -> list[int]:
    """A 1-D integer array as a list of ints."""
    return [int(v) for v in cast(list, a.tolist())]


def to_nested(a: mx.array) -> list[Any]:
    """An array of rank >= 1 as nested lists."""
    return cast(list, a.tolist())


def flat_items(tree: Any) -> list[tuple[str, Any]]:
    """``tree_flatten(tree)`` as its (dotted key, leaf) list."""
    return cast(list, tree_flatten(tree))


def load_with_metadata(path: str) -> tuple[dict[str, mx.array], dict[str, str]]:
    """``mx.load(path, return_metadata=True)`` of a .safetensors file: (tensors, string metadata)."""
    tensors, meta = cast(tuple, mx.load(path, return_metadata=True))
    return tensors, meta

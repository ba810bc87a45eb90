"""Reading the files a user hands us, with one clear error when a file is not what it claims to be.

``read_json`` and ``load_safetensors`` name the file and say whether it is corrupt or truncated, instead
of a bare ``JSONDecodeError`` or MLX's "Unable to read 8 bytes from file". ``check_safetensors`` reads only
the header (8-byte length, JSON table of tensors) and compares the data it promises with the file's size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, cast

import mlx.core as mx


class CorruptFileError(ValueError):
    """A checkpoint, config or data file cannot be read: not its format, corrupt or truncated."""


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse ``path`` as JSON; a file that is not JSON raises ``CorruptFileError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); the file is "
                               f"corrupt. Expected a JSON file; restore or re-create it.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        state = "truncated" if e.pos >= len(text.rstrip()) else "corrupt"
        raise CorruptFileError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is "
            f"{state}. Expected a JSON object; restore or re-create it."
        ) from None


_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                   "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise ``CorruptFileError`` unless ``path`` has a well-formed safetensors header and all the tensor
    bytes that header promises."""
    path = Path(path)
    size = path.stat().st_size
    hint = "Re-download or re-create it."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte "
                                   f"header length. The file is truncated or empty. {hint}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CorruptFileError(f"{path} is not a readable safetensors file: its header claims {n:,} bytes but "
                                   f"the file has {size:,}. The file is corrupt or truncated. {hint}")
        raw = f.read(n)
    try:
        table = json.loads(raw)
        if not isinstance(table, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise CorruptFileError(f"{path} is not a readable safetensors file: its header is not a JSON object. "
                               f"The file is corrupt. {hint}") from None
    end = 0
    for name, t in table.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in t["data_offsets"])
            count = 1
            for d in t["shape"]:
                count *= int(d)
            width = _ST_DTYPE_BYTES.get(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path}: the header entry of tensor {name!r} is malformed. The file is "
                                   f"corrupt. {hint}") from None
        if width is not None and stop - begin != count * width:
            raise CorruptFileError(f"{path}: tensor {name!r} spans {stop - begin} bytes, its shape and dtype need "
                                   f"{count * width}. The file is corrupt. {hint}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CorruptFileError(f"{path} is truncated: its header lists {8 + n + end:,} bytes of tensors, the file "
                               f"has {size:,}. {hint}")


def load_safetensors(path: str | os.PathLike) -> dict[str, mx.array]:
    """``mx.load`` of a checked safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a .safetensors file).")
    check_safetensors(path)
    try:
        return cast(dict, mx.load(str(path)))  # a .safetensors file loads as a dict
    except (RuntimeError, ValueError) as e:
        raise CorruptFileError(f"{path} could not be read as safetensors ({e}); the file is corrupt.") from None

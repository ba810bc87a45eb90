"""Training checkpoints: one atomic safetensors file holding every trainer's SAE, optimizer and bookkeeping
state and the source's position; written only from finite states."""

from __future__ import annotations

import json
import os
import tempfile

import mlx.core as mx

from ..host import load_with_metadata
from ..outputs import OutputExistsError
from ..readers import CorruptFileError, check_safetensors
from .config import FORMAT_VERSION
from .trainer import SAETrainer

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(path: str, trainers: list[SAETrainer], source, step: int, extra: dict | None = None) -> str:
    """Write every trainer's state and the source's state to ``path``/checkpoint.safetensors atomically
    (``write_checkpoint``)."""
    tensors: dict[str, mx.array] = {}
    for i, t in enumerate(trainers):
        tensors.update(t.tensors(f"t{i}."))
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "configs": [t.cfg.to_dict() for t in trainers],
        "input_scales": [t.input_scale for t in trainers],
        "extra": extra or {},
    }
    return write_checkpoint(path, tensors, meta, source)


def write_checkpoint(path: str, tensors: dict[str, mx.array], meta: dict, source, file: str = CHECKPOINT_FILE) -> str:
    """``tensors`` and the source's state (``source.state_dict()``, as ``source.*`` tensors and ``meta["source"]``)
    in ``path``/``file``, with ``meta`` as the file's ``hooked_mlx`` metadata.

    The file is written beside its destination under a temporary name, flushed, then ``os.replace``-d,
    so a crash leaves either the previous checkpoint or the new one, never a partial file.
    """
    os.makedirs(path, exist_ok=True)
    tensors = dict(tensors)
    src_meta = {}
    if source is not None and hasattr(source, "state_dict"):
        src_arrays, src_meta = source.state_dict()
        for k, v in src_arrays.items():
            tensors[f"source.{k}"] = mx.array(v)
    meta = {**meta, "source": src_meta}
    dest = os.path.join(path, file)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp.safetensors", dir=path)  # MLX appends .safetensors otherwise
    os.close(fd)
    try:
        mx.save_safetensors(tmp, tensors, metadata={"hooked_mlx": json.dumps(meta)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def load_checkpoint(path: str) -> tuple[dict[str, mx.array], dict]:
    f = os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise FileNotFoundError(f"No checkpoint at {f}; train with checkpoint_path set to create one.")
    check_safetensors(f)
    tensors, metadata = load_with_metadata(f)
    if "hooked_mlx" not in metadata:
        raise CorruptFileError(f"{f} is a safetensors file but not a hooked_mlx training checkpoint (no "
                               f"'hooked_mlx' metadata). Point checkpoint_path at a folder written by train_saes.")
    return tensors, json.loads(metadata["hooked_mlx"])


def check_checkpoint_path(path: str | None, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint file in folder ``path`` (None without one), checked before any work: ``path`` may not
    be a file, and a checkpoint already there is continued (``resume``) or replaced (``overwrite``), never
    silently overwritten."""
    if not path:
        return None
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"checkpoint_path {path} is a file; expected a folder for {CHECKPOINT_FILE}. "
                                f"Choose a folder path.")
    f = os.path.join(path, CHECKPOINT_FILE)
    if os.path.exists(f) and not resume and not overwrite:
        step = load_checkpoint(f)[1].get("step", "?")
        raise OutputExistsError(
            f"{f} already holds a training checkpoint (step {step}) from an earlier run. Pass resume=True "
            f"(--resume) to continue it, overwrite=True (--overwrite) to start again and replace it, or choose "
            f"another checkpoint folder."
        )
    return f

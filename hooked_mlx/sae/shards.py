"""Activations at rest: ``harvest`` (run the model once, write safetensors shards and a manifest),
``ShardSource`` (read them memory-mapped, in a seeded per-epoch shuffled order) and ``ArraySource`` (the same
over in-memory arrays)."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np

from ..readers import check_safetensors, read_json

MANIFEST = "manifest.json"


class ArraySource:
    """Seeded, per-epoch shuffled batches from row arrays (one or more segments per hook).

    ``arrays``: {hook: ndarray [N,d]} or {hook: [segment [n_i,d], ...]} (segments may be ``np.memmap``).
    The batch at step s of epoch e is a pure function of (seed, e, s), so resuming is exact.
    """

    def __init__(self, arrays: dict, batch_size: int, seed: int = 0, description: str = "in-memory arrays"):
        if not arrays:
            raise ValueError("ArraySource needs at least one hook's array.")
        self.segments = {h: (list(v) if isinstance(v, (list, tuple)) else [v]) for h, v in arrays.items()}
        self.hook_names = list(self.segments)
        sizes = [[s.shape[0] for s in segs] for segs in self.segments.values()]
        if any(sz != sizes[0] for sz in sizes):
            raise ValueError("Every hook needs the same number of rows (tokens) in the same segments.")
        self.offsets = np.cumsum([0] + sizes[0])
        self.n = int(self.offsets[-1])
        self.batch_size = batch_size
        if self.n < batch_size:
            raise ValueError(f"Only {self.n} activation rows, fewer than one batch ({batch_size}).")
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = None
        self._description = description
        self.shard = (0, 1)

    def set_shard(self, rank: int, size: int) -> None:
        """Data-parallel use: every rank draws the same global batches and returns rows
        [rank*b, (rank+1)*b) of each (b = batch_size / size), reading nothing else."""
        if self.batch_size % size:
            raise ValueError(f"batch size {self.batch_size} does not split evenly over {size} ranks.")
        self.shard = (rank, size)

    def d_in(self, hook: str) -> int:
        return int(self.segments[hook][0].shape[1])

    def describe(self) -> str:
        return f"{self._description} ({self.n:,} tokens, shuffled each epoch)"

    def _permutation(self):
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._perm

    def _gather(self, segs, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        seg_of = np.searchsorted(self.offsets, sidx, side="right") - 1
        out = np.empty((idx.shape[0], segs[0].shape[1]), dtype=np.float32)
        for s in np.unique(seg_of):
            sel = seg_of == s
            out[order[sel]] = segs[s][sidx[sel] - self.offsets[s]]
        return out

    def next_batch(self) -> dict[str, mx.array]:
        B = self.batch_size
        if self.pos + B > self.n:  # drop the ragged tail of an epoch
            self.epoch += 1
            self.pos = 0
            self._perm = None
        idx = self._permutation()[self.pos:self.pos + B]
        self.pos += B
        rank, size = self.shard
        if size > 1:
            b = B // size
            idx = idx[rank * b:(rank + 1) * b]
        return {h: mx.array(self._gather(segs, idx)) for h, segs in self.segments.items()}

    def state_dict(self):
        return {}, {"kind": type(self).__name__, "epoch": self.epoch, "pos": self.pos, "seed": self.seed,
                    "n": self.n}

    def load_state_dict(self, arrays, meta) -> None:
        if int(meta["n"]) != self.n:
            raise ValueError(f"Checkpoint was taken on a source of {meta['n']} rows; this one has {self.n}.")
        self.epoch, self.pos, self.seed = int(meta["epoch"]), int(meta["pos"]), int(meta["seed"])
        self._perm = None


def _safetensors_memmap(path: str) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array (nothing is read yet)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64, "I32": np.int32}
    check_safetensors(path)  # a corrupt or truncated shard is named, before any memory map
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = dtypes.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; shards must be F32/F16.")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        out[name] = np.memmap(path, dtype=dt, mode="r", offset=8 + n + start, shape=shape)
    return out


class ShardSource(ArraySource):
    """Batches from a ``harvest`` folder, memory-mapped (see ``ArraySource`` for the order)."""

    def __init__(self, path: str, batch_size: int, seed: int = 0, hook_names: list[str] | None = None):
        man_path = os.path.join(path, MANIFEST)
        if not os.path.exists(man_path):
            raise FileNotFoundError(f"{path} has no {MANIFEST}; create the folder with `hooked-mlx harvest` or "
                                    f"hooked_mlx.sae.harvest().")
        self.manifest = read_json(man_path, "harvest manifest")
        hooks = hook_names or self.manifest["hook_names"]
        missing = [h for h in hooks if h not in self.manifest["hook_names"]]
        if missing:
            raise ValueError(f"Hooks {missing} were not harvested in {path}; it holds {self.manifest['hook_names']}.")
        arrays: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
        for shard in self.manifest["shards"]:
            mm = _safetensors_memmap(os.path.join(path, shard["file"]))
            for h in hooks:
                arrays[h].append(mm[h])
        super().__init__(arrays, batch_size, seed, description=f"harvested shards in {path}, memory-mapped")


def is_harvest_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST))

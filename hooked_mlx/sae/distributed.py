"""Data-parallel SAE training and sharded harvesting on ``mx.distributed``.

Launch any SAE entry point with MLX's launcher; every process is one rank of the global group::

    mlx.launch --backend ring -n 2 -- hooked-mlx train-sae ...      # local processes on the CPU (ring)
    mlx.launch --backend nccl -n 8 -- hooked-mlx train-sae ...      # 8 GPUs of one host (NCCL)
    mlx.launch --hostfile hosts.json -- hooked-mlx train-sae ...    # several machines

What a rank does (``World`` holds the group; every collective goes through it):

* **data**: each rank takes its contiguous slice of every global batch of ``train_batch_size_tokens``
  rows (``ArraySource`` / ``ShardSource``: all ranks draw the same global batch order and read only their
  slice), or streams from its own document shard (``ActivationStore``: documents ``i`` with
  ``i % size == rank``, a shuffle buffer and RNG of its own).
* **step**: inside the compiled step the small gradients, the fired-latent mask, the metrics and the
  global FVU sums travel in ONE packed ``all_sum``, the large gradients (W_enc, W_dec) in one each, with
  no copy; gradients are averaged, so every rank applies the same update and the
  parameters stay identical (they are also broadcast from rank 0 once, at the start). The losses that are
  not means over tokens are made global too: the AuxK normaliser (the residual's total variance) and the
  BatchTopK cut (the k*B-th largest activation of the global batch, from an ``all_gather`` of each rank's
  top k*B candidates). With equal shards, N ranks compute the single-process step on the same global
  batch, up to float rounding.
* **bookkeeping**: dead-latent counters count global tokens (a latent fired if it fired on any rank);
  metrics are global; rank 0 prints, shows the progress bar, logs to W&B and writes checkpoints (the
  streaming sources' per-rank states are gathered into rank 0's one checkpoint file).

Single-process runs never touch this module's collectives (``world().size == 1``).
"""

from __future__ import annotations

import io
import json
import os

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from ..host import flat_items, to_ints
from . import metrics as M

#: gradients with at least this many elements get an all_sum of their own (see World.reduce_step)
PACK_LIMIT = 1 << 20


class World:
    """The process group of a (possibly) distributed run: ``rank``, ``size`` and the collectives used here."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    # -- collectives (host side) ----------------------------------------------------------------------
    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.distributed else x

    def gather_rows(self, x: mx.array) -> mx.array:
        """[b, d] per rank -> [size*b, d] on every rank (rank 0's rows first): a global batch from its slices."""
        if not self.distributed:
            return x
        return mx.distributed.all_gather(x, group=self.group)

    def broadcast(self, tree):
        """Rank 0's arrays, on every rank (a sum where only rank 0 contributes)."""
        if not self.distributed:
            return tree
        keep = 1.0 if self.is_main else 0.0
        flat = [(k, mx.distributed.all_sum(v * keep, group=self.group).astype(v.dtype))
                for k, v in flat_items(tree)]
        return tree_unflatten(flat)

    def gather_bytes(self, blob: bytes) -> list[bytes]:
        """Every rank's byte string, on every rank (lengths first, then one padded all_gather)."""
        if not self.distributed:
            return [blob]
        n = mx.distributed.all_gather(mx.array([len(blob)], dtype=mx.int32), group=self.group)
        lengths = to_ints(n)
        pad = max(lengths)
        buf = np.zeros((1, pad), dtype=np.uint8)
        buf[0, : len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        allb = np.array(mx.distributed.all_gather(mx.array(buf), group=self.group))
        return [allb[r, : lengths[r]].tobytes() for r in range(self.size)]

    def barrier(self) -> None:
        if self.distributed:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def local_rows(self, global_batch: int, what: str = "train_batch_size_tokens") -> int:
        """Rows of each rank's slice; the global batch must split evenly."""
        if global_batch % self.size:
            raise ValueError(
                f"{what} = {global_batch} does not split evenly over {self.size} ranks; use a multiple of "
                f"{self.size} (e.g. {global_batch - global_batch % self.size or self.size}) so that every rank "
                f"takes an equal shard of each global batch.")
        return global_batch // self.size

    # -- the compiled step's reduction -----------------------------------------------------------------
    def reduce_step(self, x, loss, mets, fired, grads, big_dtype: str = "float32"):
        """Averaged gradients, global metrics, the global fired mask and FVU, in few all_sums.

        x [b, D] is this rank's scaled slice; returns (loss, mets, fired, grads), all global. Gradients of
        ``PACK_LIMIT`` elements or more (W_enc, W_dec) get one all_sum each, without a copy into a packed
        buffer (at S2 that copy would be another 2 x D x F floats), in ``big_dtype`` (``bfloat16``: half
        the bytes; the sum comes back as float32); everything else travels together in one packed
        float32 all_sum.
        """
        wire = getattr(mx, big_dtype)
        n = self.size
        flat = flat_items(grads)
        keys = list(mets)
        b = x.shape[0]
        sse = mets[M.MSE] * b  # sum over this slice of ||x - x_hat||^2
        big = [v.size >= PACK_LIMIT for _, v in flat]
        parts = [v.reshape(-1).astype(mx.float32) for (_, v), large in zip(flat, big) if not large]
        parts += [fired.astype(mx.float32), mx.stack([loss] + [mets[k] for k in keys] + [sse]).astype(mx.float32),
                  mx.sum(x, axis=0), mx.sum(mx.square(x)).reshape(1)]
        packed = mx.distributed.all_sum(mx.concatenate(parts), group=self.group)
        out, i = [], 0
        for (_, v), large in zip(flat, big):
            if large:
                out.append(mx.distributed.all_sum(v.astype(wire), group=self.group).astype(v.dtype) / n)
            else:
                out.append(packed[i:i + v.size].reshape(v.shape).astype(v.dtype) / n)
                i += v.size
        grads = tree_unflatten([(k, g) for (k, _), g in zip(flat, out)])
        F = fired.size
        fired = packed[i:i + F] > 0
        i += F
        scal = packed[i:i + len(keys) + 2]
        i += len(keys) + 2
        sum_x = packed[i:i + x.shape[1]]
        sumsq = packed[i + x.shape[1]]
        loss = scal[0] / n
        mets = {k: scal[1 + j] / n for j, k in enumerate(keys)}
        total_var = sumsq - mx.sum(mx.square(sum_x)) / (b * n)
        mets[M.FVU] = scal[-1] / mx.maximum(total_var, 1e-30)
        return loss, mets, fired, grads

    def global_min(self, v: mx.array) -> mx.array:
        return mx.distributed.all_min(v, group=self.group) if self.distributed else v

    # -- batch-wide statistics of the global batch (``step_kernels.StepKernels`` on a data-parallel world) --
    def batchtopk_mask(self, acts: mx.array, k: int):
        """Keep the k*B_global largest entries of the global batch: the cut is found among every rank's
        top min(k*B_global, b*F) candidates (the global top set is always inside their union)."""
        b, F = acts.shape
        n = self.size
        n_keep = min(k * b * n, b * n * F)
        flat = mx.stop_gradient(acts.reshape(-1))
        cand = mx.topk(flat, min(n_keep, b * F))
        everyone = mx.distributed.all_gather(cand, group=self.group)
        cut = mx.min(mx.topk(everyone, n_keep))
        return mx.where(acts >= cut, acts, 0), cut

    def total_variances(self, xs: list[mx.array]) -> list[mx.array]:
        """The global batch's total variance sum_b |x_b - mean|^2 of each array of ``xs`` (this rank's [b, d] slices
        of equal length), from one all_sum of their sums and sums of squares (a local computation on one rank)."""
        s = self.all_sum(mx.concatenate([mx.concatenate([mx.sum(x, axis=0), mx.sum(mx.square(x)).reshape(1)])
                                         for x in xs]))
        n = xs[0].shape[0] * self.size
        out, i = [], 0
        for x in xs:
            part = s[i:i + x.shape[-1] + 1]
            out.append(part[-1] - mx.sum(mx.square(part[:-1])) / n)
            i += x.shape[-1] + 1
        return out

    def total_variance_share(self, e: mx.array) -> mx.array:
        """The global batch's total variance, divided by the rank count: a rank's share of a normalised loss
        whose gradients are then averaged (sum_r loss_r / N == the global loss)."""
        return self.total_variances([e])[0] / self.size


_WORLD: World | None = None


def _empty_file(path: str | None) -> bool:
    if path is None:
        return False
    try:
        with open(path) as fh:
            return not fh.read().strip()
    except OSError:
        return path == ""


def world(backend: str = "any") -> World:
    """The global group (created once). Size 1 unless launched by ``mlx.launch`` (or mpirun)."""
    global _WORLD
    if _WORLD is None:
        launched = any(v in os.environ for v in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
        # `mlx.launch -n 1` (ring) points MLX_HOSTFILE at an empty file: one process, nothing to initialise
        alone = os.environ.get("MLX_WORLD_SIZE", "1") == "1" and _empty_file(os.environ.get("MLX_HOSTFILE"))
        if launched and not alone:
            try:
                group = mx.distributed.init(backend=backend)
            except RuntimeError as e:
                raise RuntimeError(
                    f"This process was launched as rank {os.environ.get('MLX_RANK', '?')} of a distributed job, but "
                    f"mx.distributed could not initialise ({e}). Launch with `mlx.launch --backend ring|nccl -n N ...`"
                    f" (see `mlx.launch --help`), or run a single process without the launcher.") from e
        else:
            group = None
        _WORLD = World(group)
        if _WORLD.size == 1:
            _WORLD = World(None)
    return _WORLD


# ---------------------------------------------------------------------------------------------------
# sources and checkpoints
# ---------------------------------------------------------------------------------------------------


def shard_source(source, w: World):
    """Make ``source`` yield this rank's part of every global batch (in place; returns it).

    ``ArraySource`` / ``ShardSource``: the same global order on every rank, each reading its contiguous
    slice of rows. ``ActivationStore``: its own documents (i % size == rank), batches of B/size, its own RNG.
    """
    if not w.distributed:
        return source
    if hasattr(source, "set_shard"):
        source.set_shard(w.rank, w.size)
        return source
    raise TypeError(f"{type(source).__name__} cannot be sharded over {w.size} ranks: use an ActivationStore, "
                    f"ShardSource or ArraySource (they have set_shard), or launch a single process.")


def _per_rank_state(source) -> bool:
    return bool(getattr(source, "per_rank_state", False))


class _GatheredSource:
    """Stands in for the source when rank 0 writes a checkpoint: every rank's state in one entry."""

    def __init__(self, arrays, meta):
        self._state = (arrays, meta)

    def state_dict(self):
        return self._state


def gathered_source_state(source, w: World):
    """Collective: the source state to save, as an object with ``state_dict`` (identical-state sources
    keep their own entry; per-rank streaming states are gathered, ``rank{r}.`` prefixes)."""
    if source is None or not hasattr(source, "state_dict"):
        return source
    if not _per_rank_state(source):
        return source
    arrays, meta = source.state_dict()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    blobs = w.gather_bytes(buf.getvalue())
    all_arrays, metas = {}, []
    for r, blob in enumerate(blobs):
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            metas.append(json.loads(z["__meta__"].tobytes().decode()))
            for k in z.files:
                if k != "__meta__":
                    all_arrays[f"rank{r}.{k}"] = z[k]
    return _GatheredSource(all_arrays, {"kind": "per_rank", "world_size": w.size, "ranks": metas})


def check_resume_world(meta: dict, source, w: World, ckpt_file: str, out) -> None:
    """Say clearly when the checkpoint was written by a different number of ranks, and refuse when the
    source's state is per rank (streaming) since it cannot be re-split."""
    saved = int(meta.get("extra", {}).get("world_size", 1))
    if saved == w.size:
        return
    if _per_rank_state(source) or meta.get("source", {}).get("kind") == "per_rank":
        raise ValueError(
            f"Cannot resume {ckpt_file}: it was written by {saved} rank(s) and this run has {w.size}. A streaming "
            f"ActivationStore keeps one document shard, shuffle buffer and RNG per rank, which cannot be re-split: "
            f"relaunch with {saved} rank(s) (`mlx.launch -n {saved} ...`{' or a single process' if saved == 1 else ''}"
            f"), or start a new run without --resume.")
    if w.is_main:
        print(f"Note: the checkpoint {ckpt_file} was written by {saved} rank(s); this run has {w.size}. The global "
              f"batches ({type(source).__name__}) do not depend on the rank count, so training continues on the same "
              f"batches.", file=out)


def load_source_state(source, tensors: dict, meta: dict, w: World) -> None:
    src_meta = meta["source"]
    if src_meta.get("kind") == "per_rank":
        p = f"source.rank{w.rank}."
        arrays = {k[len(p):]: np.array(v) for k, v in tensors.items() if k.startswith(p)}
        source.load_state_dict(arrays, src_meta["ranks"][w.rank])
    else:
        arrays = {k[len("source."):]: np.array(v) for k, v in tensors.items() if k.startswith("source.")}
        source.load_state_dict(arrays, src_meta)


# ---------------------------------------------------------------------------------------------------
# harvest
# ---------------------------------------------------------------------------------------------------


def rank_tokens(n_tokens: int | None, w: World) -> int | None:
    """This rank's share of a harvest of n_tokens rows (the first n % size ranks take one more)."""
    if n_tokens is None:
        return None
    return n_tokens // w.size + (1 if w.rank < n_tokens % w.size else 0)


def merge_shard_lists(shards: list[dict], written: int, w: World) -> tuple[list[dict], int]:
    """Collective: every rank's shard entries (rank order) and the total row count."""
    if not w.distributed:
        return shards, written
    blobs = w.gather_bytes(json.dumps({"shards": shards, "n": written}).encode())
    parts = [json.loads(b.decode()) for b in blobs]
    return [s for p in parts for s in p["shards"]], sum(p["n"] for p in parts)

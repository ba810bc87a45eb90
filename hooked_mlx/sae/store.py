"""Activation sources for SAE training: stream from a model, read harvested shards, or wrap arrays.

Every source yields ``next_batch() -> {hook_name: mx.array [B, d_in]}`` with B = ``train_batch_size_tokens``
and can save / restore its exact position (``state_dict`` / ``load_state_dict``) for resumable training.

* ``ActivationStore`` -- streams from a ``HookedTransformer``: documents (a list of strings, a .txt or
  .jsonl file, or a ``datasets`` dataset) are tokenized into fixed contexts, run with ``stop_at_layer``
  (one forward feeds every hook), BOS and pad positions are dropped, and a fixed-size shuffle buffer
  per hook mixes tokens across contexts (memory stays flat: buffer + one forward's activations).
* ``harvest`` -- runs the model once and writes safetensors shards (one tensor per hook) plus a manifest.
* ``ShardSource`` -- reads harvested shards memory-mapped (nothing is loaded up front) in a seeded,
  per-epoch shuffled order.
* ``ArraySource`` -- the same over in-memory arrays (synthetic activations, tests, benchmarks).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..outputs import check_output_dir, write_file_atomic
from .config import SAEConfig
from .corpus import ContextBuilder, Corpus, _model_token_ids, encode_text, open_corpus
from .model_io import hook_activations, stop_layer_for, validate_hooks
from .shards import MANIFEST, ArraySource, ShardSource, is_harvest_dir

__all__ = ["MANIFEST", "ActivationStore", "ArraySource", "ContextBuilder", "Corpus", "ShardSource", "encode_text",
           "harvest", "hook_activations", "is_harvest_dir", "open_corpus", "stop_layer_for", "validate_hooks"]


class ActivationStore:
    """Streams shuffled activation batches for one or more hooks of a model (see the module docstring)."""

    def __init__(self, model, hook_names: str | list[str], corpus, cfg: SAEConfig | None = None, *,
                 text_field: str = "text", batch_size: int | None = None):
        cfg = cfg or SAEConfig()
        self.model = model
        self.hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not self.hook_names:
            raise ValueError("ActivationStore needs at least one hook name.")
        validate_hooks(model, self.hook_names)
        model.check_context(cfg.context_size, what="The ActivationStore context (cfg.context_size)")
        self.cfg = cfg
        self.batch_size = batch_size or cfg.train_batch_size_tokens
        self.buffer_size = max(cfg.shuffle_buffer_tokens, self.batch_size)
        self.stop_at_layer = stop_layer_for(model, self.hook_names)
        bos, pad = _model_token_ids(model)
        self.contexts = ContextBuilder(
            open_corpus(corpus, text_field), model.tokenizer, cfg.context_size, bos=bos, pad=pad,
            prepend_bos=cfg.prepend_bos, packing=cfg.packing, exclude_special=cfg.exclude_special_tokens,
        )
        self.rng = np.random.default_rng(cfg.seed)
        self._d_in: dict[str, int] = {}
        self.buffers: dict[str, np.ndarray] | None = None
        self.filled = 0
        self.pending: deque = deque()  # of dicts {hook: np [n, d]}
        self.tokens_processed = 0
        self.forwards = 0
        self.per_rank_state = False  # set by set_shard: each rank streams its own documents

    def set_shard(self, rank: int, size: int) -> None:
        """Data-parallel use: stream only documents i with i % size == rank, in batches of
        batch_size / size, with an RNG of this rank's own (call before the first batch)."""
        if getattr(self, "shard", None) == (rank, size):
            return  # already sharded this way
        if self.buffers is not None or self.tokens_processed:
            raise RuntimeError("ActivationStore.set_shard must be called before the store produced any batch.")
        if self.batch_size % size:
            raise ValueError(f"batch size {self.batch_size} does not split evenly over {size} ranks.")
        corpus_fn = self.contexts.corpus_fn
        self.contexts.corpus_fn = lambda: (d for i, d in enumerate(corpus_fn()) if i % size == rank)
        self.batch_size //= size
        self.rng = np.random.default_rng([self.cfg.seed, rank])
        self.per_rank_state = True
        self.shard = (rank, size)

    # -- info ---------------------------------------------------------------------------------------------
    def d_in(self, hook: str) -> int:
        if hook not in self._d_in:
            probe = mx.array([[self.contexts.bos if self.contexts.bos is not None else 0, 0]], dtype=mx.int32)
            acts = hook_activations(self.model, probe, self.hook_names, self.stop_at_layer)
            for h, a in acts.items():
                if a.ndim != 3:
                    raise ValueError(f"Hook {h} gives activations of shape {tuple(a.shape)}; SAEs train on "
                                     f"[batch, pos, d] hooks (residual, attn_out, mlp_out, mlp.hook_post, ...).")
                self._d_in[h] = int(a.shape[-1])
        return self._d_in[hook]

    def describe(self) -> str:
        stop = f"stop_at_layer={self.stop_at_layer}" if self.stop_at_layer is not None else "full forward"
        return (f"streaming from the model ({len(self.hook_names)} hook(s), context {self.cfg.context_size}, "
                f"{self.cfg.store_batch_size_prompts} contexts per forward, {stop}, shuffle buffer "
                f"{self.buffer_size:,} tokens)")

    # -- producing -------------------------------------------------------------------------------------------
    def _forward(self) -> bool:
        block = self.contexts.next_block(self.cfg.store_batch_size_prompts)
        if block is None:
            return False
        toks, mask = block
        acts = hook_activations(self.model, mx.array(toks), self.hook_names, self.stop_at_layer)
        flat = mask.reshape(-1)
        out = {}
        for h, a in acts.items():
            a = np.asarray(a.astype(mx.float32)).reshape(-1, a.shape[-1])
            out[h] = a[flat]
            self._d_in[h] = a.shape[-1]
        self.pending.append(out)
        self.tokens_processed += int(flat.sum())
        self.forwards += 1
        return True

    def _take(self, n: int) -> dict[str, np.ndarray] | None:
        """Up to n fresh rows (in corpus order) per hook, or None if the corpus ended."""
        have = sum(next(iter(p.values())).shape[0] for p in self.pending)
        while have < n:
            if not self._forward():
                break
            have += next(iter(self.pending[-1].values())).shape[0]
        if have == 0:
            return None
        parts: dict[str, list[np.ndarray]] = {h: [] for h in self.hook_names}
        got = 0
        while got < n and self.pending:
            p = self.pending[0]
            m = next(iter(p.values())).shape[0]
            use = min(m, n - got)
            for h in self.hook_names:
                parts[h].append(p[h][:use])
            if use == m:
                self.pending.popleft()
            else:
                self.pending[0] = {h: v[use:] for h, v in p.items()}
            got += use
        return {h: np.concatenate(v, axis=0) for h, v in parts.items()}

    def iter_activations(self, chunk_tokens: int) -> Iterator[dict[str, np.ndarray]]:
        """Unshuffled activations in corpus order, ``chunk_tokens`` rows at a time, until the corpus ends
        (one pass: the corpus is not cycled here). Used by ``harvest``."""
        cycle = self.contexts.cycle
        self.contexts.cycle = False
        try:
            while True:
                got = self._take(chunk_tokens)
                if got is None:
                    return
                yield got
        finally:
            self.contexts.cycle = cycle

    def next_batch(self) -> dict[str, mx.array]:
        """A shuffled batch {hook: [B, d]} drawn from the buffer, whose slots are refilled with new tokens."""
        B, N = self.batch_size, self.buffer_size
        if self.buffers is None:
            first = self._take(N)
            if first is None:
                raise ValueError("The corpus produced no tokens (after dropping BOS/pad positions).")
            self.buffers = {h: np.empty((N, v.shape[1]), dtype=np.float32) for h, v in first.items()}
            n = next(iter(first.values())).shape[0]
            for h, v in first.items():
                self.buffers[h][:n] = v
            self.filled = n
        while self.filled < N:
            more = self._take(N - self.filled)
            if more is None:
                break
            n = next(iter(more.values())).shape[0]
            for h, v in more.items():
                self.buffers[h][self.filled:self.filled + n] = v
            self.filled += n
        if self.filled < B:
            raise ValueError(f"Only {self.filled} tokens available, fewer than one batch ({B}).")
        idx = self.rng.choice(self.filled, size=B, replace=False)
        out = {h: mx.array(buf[idx]) for h, buf in self.buffers.items()}
        fresh = self._take(B)
        if fresh is not None:
            n = next(iter(fresh.values())).shape[0]
            for h, v in fresh.items():
                self.buffers[h][idx[:n]] = v
        return out

    # -- exact resume -------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {}
        if self.buffers is not None:
            for i, h in enumerate(self.hook_names):
                arrays[f"buffer{i}"] = self.buffers[h][: self.filled].copy()
                pend = [p[h] for p in self.pending]
                if pend:
                    arrays[f"pending{i}"] = np.concatenate(pend, axis=0)
        meta = {"kind": "ActivationStore", "hooks": self.hook_names, "filled": self.filled,
                "rng": self.rng.bit_generator.state, "contexts": self.contexts.state(),
                "tokens_processed": self.tokens_processed, "started": self.buffers is not None}
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if meta.get("hooks") != self.hook_names:
            raise ValueError(f"Checkpoint source hooks {meta.get('hooks')} differ from this store's {self.hook_names}.")
        self.rng.bit_generator.state = meta["rng"]
        self.contexts.load_state(meta["contexts"])
        self.tokens_processed = int(meta["tokens_processed"])
        self.pending.clear()
        if meta["started"]:
            self.filled = int(meta["filled"])
            self.buffers = {}
            for i, h in enumerate(self.hook_names):
                b = arrays[f"buffer{i}"]
                buf = np.empty((self.buffer_size, b.shape[1]), dtype=np.float32)
                buf[: self.filled] = b
                self.buffers[h] = buf
                self._d_in[h] = b.shape[1]
            if "pending0" in arrays:
                self.pending.append({h: arrays[f"pending{i}"] for i, h in enumerate(self.hook_names)})
        else:
            self.buffers = None
            self.filled = 0


def harvest(model, hook_names: str | list[str], corpus, out_dir: str, n_tokens: int | None = None, *,
            cfg: SAEConfig | None = None, shard_tokens: int = 262144, text_field: str = "text",
            progress: bool = True, dtype: str = "float32", world=None, overwrite: bool = False) -> dict:
    """Run the model over the corpus once and write activations of each hook to safetensors shards.

    Writes ``shard_00000.safetensors`` ... (tensor per hook name, [n, d]) and ``manifest.json``
    (hooks, d_in, token counts, model / context settings). Each shard is written to a temporary name and
    renamed, the manifest last: a folder with a manifest is complete. ``n_tokens`` None: the whole corpus
    once. Returns the manifest.

    ``out_dir`` must be new or empty (``hooked_mlx.outputs``); ``overwrite=True`` writes into an existing
    folder, replacing only same-named shards and the manifest (stale shards it does not list are ignored
    by readers, which go by the manifest). ``out_dir`` may not be the corpus file or folder, or inside it.

    Under ``mlx.launch`` (``world`` of size N > 1, default ``distributed.world()``): rank r runs the model on
    documents i with i % N == r, writes its own ``shard_r{r:03d}_{j:05d}.safetensors`` files (disjoint:
    about n_tokens / N rows each) into the shared ``out_dir``, and rank 0 writes the one manifest listing
    every rank's shards once all have finished.
    """
    from . import distributed as D

    w = world if world is not None else D.world()
    n_tokens_total = n_tokens
    n_tokens = D.rank_tokens(n_tokens, w)
    limit = n_tokens if n_tokens is not None else 2**62
    cfg = cfg or SAEConfig()
    hooks = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"harvest dtype {dtype!r} is invalid: allowed 'float32' or 'float16'.")
    corpus_path = corpus if isinstance(corpus, (str, os.PathLike)) and os.path.exists(corpus) else None
    check_output_dir(out_dir, sources=[corpus_path], overwrite=overwrite, what="harvest")
    w.barrier()  # every rank checked the folder before any rank writes into it
    store = ActivationStore(model, hooks, corpus, cfg, text_field=text_field)
    prefix = "shard_"
    if w.distributed:
        store.set_shard(w.rank, w.size)
        prefix = f"shard_r{w.rank:03d}_"
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict] = []
    written = 0
    bar = None
    if progress and w.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, file=sys.stderr, desc="harvest")
    try:
        for chunk in store.iter_activations(min(shard_tokens, limit)):
            n = next(iter(chunk.values())).shape[0]
            n = min(n, limit - written)
            name = f"{prefix}{len(shards):05d}.safetensors"
            arrays = {h: mx.array(v[:n]).astype(getattr(mx, dtype)) for h, v in chunk.items()}
            write_file_atomic(os.path.join(out_dir, name), partial(mx.save_safetensors, arrays=arrays),
                              overwrite=overwrite, what="harvest", suffix=".safetensors")
            shards.append({"file": name, "n_tokens": int(n)})
            written += n
            if bar is not None:
                bar.update(n)
            if written >= limit:
                break
    finally:
        if bar is not None:
            bar.close()
    d_in = {h: store.d_in(h) for h in hooks}
    shards, written = D.merge_shard_lists(shards, written, w)  # collective: every rank's shards, rank order
    if n_tokens_total is not None and written < n_tokens_total and w.is_main:
        warnings.warn(f"The corpus ran out after {written:,} tokens (asked for {n_tokens_total:,}).", RuntimeWarning,
                      stacklevel=2)
    manifest = {
        "format": "hooked_mlx.activations",
        "format_version": 1,
        "hook_names": hooks,
        "d_in": d_in,
        "n_tokens": int(written),
        "dtype": dtype,
        "shards": shards,
        "model_name": getattr(model.cfg, "model_name", "") or cfg.model_name,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "packing": cfg.packing,
        "exclude_special_tokens": cfg.exclude_special_tokens,
    }
    if w.distributed:
        manifest["world_size"] = w.size
    if w.is_main:
        text = json.dumps(manifest, indent=2)
        write_file_atomic(os.path.join(out_dir, MANIFEST), lambda tmp: Path(tmp).write_text(text),
                          overwrite=overwrite, what="harvest")
    w.barrier()  # the folder is complete (manifest written) when any rank returns
    return manifest

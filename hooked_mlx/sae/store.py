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
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..names import hook_spec
from ..outputs import check_output_dir, write_file_atomic
from ..readers import check_safetensors, read_json
from .config import SAEConfig

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------------


def _read_txt(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if "\n\n" in text:
        docs = [d.strip() for d in text.split("\n\n")]
    else:
        docs = [d.strip() for d in text.splitlines()]
    return [d for d in docs if d]


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if isinstance(row, str):
                yield row
                continue
            if text_field not in row:
                raise ValueError(f"{path}:{n} has no {text_field!r} field (keys: {sorted(row)}); pass text_field=.")
            yield row[text_field]


class Corpus:
    """A re-iterable corpus of documents (str): ``for doc in corpus`` starts from the first document every
    time; ``corpus()`` returns such a fresh iterator too."""

    def __init__(self, factory, source: str):
        self._factory, self.source = factory, source

    def __iter__(self):
        return iter(self._factory())

    def __call__(self):
        return iter(self._factory())

    def __repr__(self) -> str:
        return f"Corpus({self.source})"


def open_corpus(corpus, text_field: str = "text") -> Corpus:
    """A re-iterable ``Corpus``: iterating it (or calling it) gives a fresh iterator of documents (str).

    Accepts a list/tuple of strings, a path to a ``.txt`` (documents separated by blank lines, else one
    per line) or ``.jsonl`` file (field ``text_field``), a ``datasets`` Dataset / IterableDataset, or
    ``"hf:NAME[:SPLIT]"`` to load a Hugging Face dataset with ``datasets`` (installed separately).
    """
    if isinstance(corpus, str) and corpus.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"Corpus {corpus!r} needs the `datasets` package: pip install datasets") from e
        parts = corpus[3:].split(":")
        ds = datasets.load_dataset(parts[0], split=parts[1] if len(parts) > 1 else "train", streaming=True)
        return open_corpus(ds, text_field)
    if isinstance(corpus, (str, os.PathLike)):
        path = os.fspath(corpus)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Corpus file {path!r} does not exist (expected a .txt or .jsonl file).")
        if path.endswith(".jsonl"):
            return Corpus(lambda: _iter_jsonl(path, text_field), path)
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            docs = [d if isinstance(d, str) else d[text_field] for d in data]
            return Corpus(lambda: iter(docs), path)
        docs = _read_txt(path)
        return Corpus(lambda: iter(docs), path)
    if isinstance(corpus, (list, tuple)):
        if not all(isinstance(d, str) for d in corpus):
            raise TypeError("A corpus list must hold strings (documents).")
        docs = list(corpus)
        return Corpus(lambda: iter(docs), f"{len(docs)} documents")
    if isinstance(corpus, Corpus):
        return corpus
    mod = type(corpus).__module__ or ""
    if mod.startswith("datasets"):
        def it():
            for row in corpus:
                yield row[text_field] if isinstance(row, dict) else row
        return Corpus(it, type(corpus).__name__)
    raise TypeError(
        f"Unsupported corpus {type(corpus).__name__}: pass a list of strings, a .txt / .jsonl path, a `datasets` "
        f"dataset, or 'hf:NAME[:SPLIT]'."
    )


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of text without special tokens (BOS is added by the store)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
        bos = getattr(tokenizer, "bos_token_id", None)
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
    return list(ids)


# ---------------------------------------------------------------------------------------------------
# model-side helpers
# ---------------------------------------------------------------------------------------------------


def validate_hooks(model, hook_names: list[str]) -> None:
    valid = model.hook_dict
    for h in hook_names:
        if h not in valid:
            from ..names import unknown_name_error

            raise unknown_name_error(h, list(valid))


def stop_layer_for(model, hook_names: list[str]) -> int | None:
    """The smallest ``stop_at_layer`` that still computes every hook (None: run the whole model)."""
    layers = []
    for h in hook_names:
        layer = hook_spec(h).layer
        if layer is not None:
            layers.append(layer)
        elif h in ("hook_embed", "hook_pos_embed"):
            layers.append(-1)
        else:
            return None
    top = max(layers) + 1
    return max(top, 1) if top < model.cfg.n_layers else None


def hook_activations(model, tokens: mx.array, hook_names: list[str], stop_at_layer: int | None):
    """{hook: [B,P,d]} from one forward of ``tokens`` [B,P]."""
    kw = {"names_filter": list(hook_names)}
    if stop_at_layer is not None:
        kw["stop_at_layer"] = stop_at_layer
    _, cache = model.run_with_cache(tokens, **kw)
    return {h: cache[h] for h in hook_names}


# ---------------------------------------------------------------------------------------------------
# contexts
# ---------------------------------------------------------------------------------------------------


class ContextBuilder:
    """Turns a re-iterable corpus into fixed [n, context_size] token blocks with a validity mask.

    Packing: documents are tokenized as [BOS] + tokens and concatenated; each context is [BOS] + the next
    context_size - 1 stream tokens (a BOS at the cut is not doubled). Without packing: one document per
    context, truncated and right-padded. Masks drop BOS and pad positions when ``exclude_special`` is set.
    The corpus is cycled (epochs) unless ``cycle=False``. Position: (epoch, documents consumed, stream).
    """

    def __init__(self, corpus_fn, tokenizer, context_size: int, *, bos: int | None, pad: int | None,
                 prepend_bos: bool = True, packing: bool = True, exclude_special: bool = True, cycle: bool = True):
        self.corpus_fn = corpus_fn
        self.tokenizer = tokenizer
        self.P = context_size
        self.bos = bos
        self.pad = pad if pad is not None else (bos if bos is not None else 0)
        self.prepend_bos = prepend_bos and bos is not None
        self.packing = packing
        self.exclude_special = exclude_special
        self.cycle = cycle
        self.epoch = 0
        self.docs_consumed = 0
        self.stream: list[int] = []
        self._it = None
        self._warned = False
        self.exhausted = False

    def _next_doc(self) -> list[int] | None:
        if self._it is None:
            self._it = self.corpus_fn()
            for _ in range(self.docs_consumed):
                next(self._it)
        while True:
            try:
                text = next(self._it)
            except StopIteration:
                if not self.cycle:
                    self.exhausted = True
                    return None
                if self.docs_consumed == 0:
                    raise ValueError("The corpus is empty: no documents to tokenize.") from None
                self.epoch += 1
                self.docs_consumed = 0
                self._it = self.corpus_fn()
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        "The corpus was used up; starting again from its first document (epoch 2), so training "
                        "activations repeat. Give a bigger corpus or fewer training_tokens to avoid this.",
                        RuntimeWarning, stacklevel=4,
                    )
                continue
            self.docs_consumed += 1
            ids = encode_text(self.tokenizer, text)
            if not ids:
                continue
            return ([self.bos] if self.prepend_bos else []) + ids

    def next_block(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens [m,P] int32, mask [m,P] bool) with 1 <= m <= n, or None at the end of a non-cycled corpus."""
        rows = []
        lengths = []
        while len(rows) < n:
            if self.packing:
                need = self.P - (1 if self.prepend_bos else 0)
                while len(self.stream) < need + 1 and not self.exhausted:
                    doc = self._next_doc()
                    if doc is None:
                        break
                    self.stream.extend(doc)
                if self.prepend_bos and self.stream and self.stream[0] == self.bos:
                    self.stream.pop(0)
                if not self.stream:
                    break
                chunk = self.stream[:need]
                self.stream = self.stream[need:]
                row = ([self.bos] if self.prepend_bos else []) + chunk
            else:
                doc = self._next_doc()
                if doc is None:
                    break
                row = doc[: self.P]
            lengths.append(len(row))
            rows.append(row + [self.pad] * (self.P - len(row)))
        if not rows:
            return None
        toks = np.array(rows, dtype=np.int32)
        mask = np.arange(self.P)[None, :] < np.array(lengths)[:, None]
        if self.exclude_special and self.bos is not None:
            mask &= toks != self.bos
        return toks, mask

    def state(self) -> dict:
        return {"epoch": self.epoch, "docs_consumed": self.docs_consumed, "stream": list(self.stream),
                "exhausted": self.exhausted}

    def load_state(self, s: dict) -> None:
        self.epoch = int(s["epoch"])
        self.docs_consumed = int(s["docs_consumed"])
        self.stream = [int(t) for t in s["stream"]]
        self.exhausted = bool(s.get("exhausted", False))
        self._it = None


def _model_token_ids(model):
    cfg = model.cfg
    tok = model.tokenizer
    bos = cfg.bos_token_id if getattr(cfg, "bos_token_id", None) is not None else getattr(tok, "bos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "pad_token_id", None)
    return bos, pad


# ---------------------------------------------------------------------------------------------------
# the streaming store
# ---------------------------------------------------------------------------------------------------


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
        self._d_in = {}
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
        parts = {h: [] for h in self.hook_names}
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


# ---------------------------------------------------------------------------------------------------
# array-backed sources (in memory or memory-mapped shards)
# ---------------------------------------------------------------------------------------------------


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
    out = {}
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
        arrays = {h: [] for h in hooks}
        for shard in self.manifest["shards"]:
            mm = _safetensors_memmap(os.path.join(path, shard["file"]))
            for h in hooks:
                arrays[h].append(mm[h])
        super().__init__(arrays, batch_size, seed, description=f"harvested shards in {path}, memory-mapped")


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
    shards, written = [], 0
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
            write_file_atomic(os.path.join(out_dir, name), lambda tmp, a=arrays: mx.save_safetensors(tmp, a),
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


def is_harvest_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST))

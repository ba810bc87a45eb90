"""Documents in, token contexts out: ``open_corpus`` (a list of strings, a .txt / .jsonl / .json file, a
``datasets`` dataset or ``"hf:NAME"``, as a re-iterable ``Corpus``), ``encode_text`` and ``ContextBuilder``
(fixed-length contexts, packed or one document each, with BOS and padding)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator

import numpy as np


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
        self.pad: int = pad if pad is not None else (bos if bos is not None else 0)
        self.prepend_bos = prepend_bos and bos is not None
        self.packing = packing
        self.exclude_special = exclude_special
        self.cycle = cycle
        self.epoch = 0
        self.docs_consumed = 0
        self.stream: list[int] = []
        self._it: Iterator[str] | None = None
        self._warned = False
        self.exhausted = False

    def _bos_prefix(self) -> list[int]:
        return [self.bos] if self.prepend_bos and self.bos is not None else []

    def _next_doc(self) -> list[int] | None:
        if self._it is None:
            self._it = iter(self.corpus_fn())
            for _ in range(self.docs_consumed):
                next(self._it)
        while True:
            assert self._it is not None
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
                self._it = iter(self.corpus_fn())
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
            return self._bos_prefix() + ids

    def next_block(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens [m,P] int32, mask [m,P] bool) with 1 <= m <= n, or None at the end of a non-cycled corpus."""
        rows: list[list[int]] = []
        lengths: list[int] = []
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
                row = self._bos_prefix() + chunk
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

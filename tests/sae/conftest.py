"""Fixtures of the SAE tests: the self-generated stories corpus, synthetic sparse activations, and one
harvest of stories260K activations shared by the tests that need real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sae_fixtures import CORPUS, HERE, HOOK, make_sparse_data  # noqa: F401


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    assert CORPUS.exists(), f"missing {CORPUS}; regenerate it with python tests/sae/make_corpus.py"
    return CORPUS


@pytest.fixture(scope="session")
def corpus_docs(corpus_path) -> list[str]:
    from hooked_mlx.sae.corpus import _read_txt

    return _read_txt(str(corpus_path))


@pytest.fixture(scope="session")
def sparse_data() -> np.ndarray:
    return make_sparse_data()


@pytest.fixture(scope="session")
def harvested(stories, corpus_docs, tmp_path_factory):
    """stories260K blocks.2.hook_resid_post activations: (train folder, held-out [N,64] array).

    Train: documents 0..199 (~40K tokens); held-out: documents 340..399, never trained on."""
    from hooked_mlx.sae import SAEConfig, ShardSource, harvest

    root = tmp_path_factory.mktemp("harvest")
    cfg = SAEConfig(context_size=128, store_batch_size_prompts=32)
    harvest(stories, HOOK, corpus_docs[:200], str(root / "train"), cfg=cfg, progress=False,
            shard_tokens=16384)
    harvest(stories, HOOK, corpus_docs[340:], str(root / "eval"), cfg=cfg, progress=False)
    ev = ShardSource(str(root / "eval"), batch_size=1)
    held_out = np.concatenate([np.asarray(s) for s in ev.segments[HOOK]])
    return root / "train", held_out

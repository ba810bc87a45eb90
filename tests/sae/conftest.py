"""Fixtures of the SAE tests: the self-generated stories corpus, synthetic sparse activations, and one
harvest of stories260K activations shared by the tests that need real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "stories_samples.txt"  # 400 stories sampled from stories260K (make_corpus.py)
HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    assert CORPUS.exists(), f"missing {CORPUS}; regenerate it with python tests/sae/make_corpus.py"
    return CORPUS


@pytest.fixture(scope="session")
def corpus_docs(corpus_path) -> list[str]:
    from hooked_mlx.sae.store import _read_txt

    return _read_txt(str(corpus_path))


def make_sparse_data(n: int = 20000, d: int = 32, n_true: int = 256, per_token: float = 4.0, seed: int = 0,
                     offset: float = 0.5) -> np.ndarray:
    """Activations that are sparse combinations of random unit directions, plus an offset."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((n, n_true)) < per_token / n_true) * rng.exponential(1.0, (n, n_true))
    return (codes @ dirs + offset).astype(np.float32)


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

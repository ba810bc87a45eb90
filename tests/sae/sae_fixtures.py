"""Helpers of the SAE tests (importable by name; conftest.py holds the fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "stories_samples.txt"  # 400 stories sampled from stories260K (make_corpus.py)
HOOK = "blocks.2.hook_resid_post"


def make_sparse_data(n: int = 20000, d: int = 32, n_true: int = 256, per_token: float = 4.0, seed: int = 0,
                     offset: float = 0.5) -> np.ndarray:
    """Activations that are sparse combinations of random unit directions, plus an offset."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((n, n_true)) < per_token / n_true) * rng.exponential(1.0, (n, n_true))
    return (codes @ dirs + offset).astype(np.float32)

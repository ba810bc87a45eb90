"""Shared fixtures. Importing hooked_mlx first loads the optimised BLAS before mlx.core."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # parity tests compare in float32 without TF32

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
import pytest
from mlx_fixtures import STORIES, TINY_LLAMA, build_mlx_lm_checkpoint


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("HOOKED_MLX_RUNSLOW", "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow (or HOOKED_MLX_RUNSLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not STORIES.exists():
        pytest.skip(f"stories260K fixture missing at {STORIES}")
    return STORIES


@pytest.fixture(scope="session")
def stories(stories_path):
    from hooked_mlx import HookedTransformer

    return HookedTransformer.from_pretrained(stories_path)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    _, path = build_mlx_lm_checkpoint(tmp_path_factory.mktemp("tiny_llama"), TINY_LLAMA)
    return path

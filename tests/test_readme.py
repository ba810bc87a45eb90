"""The README's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docs_fixtures import docs_workdir

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run(monkeypatch, tmp_path, stories_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has no python example"
    monkeypatch.chdir(docs_workdir(tmp_path))  # the README's paths are relative to the project root
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ns: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md block {i}", "exec"), ns)
        except ModuleNotFoundError as e:  # optional extras (matplotlib) must be installed by `make test`
            pytest.fail(f"README block {i} needs {e.name}: {e}")
        if i == 0:  # the quickstart's documented values
            assert tuple(ns["cache"]["blocks.0.attn.hook_pattern"].shape) == (1, 8, 5, 5)
            assert tuple(ns["logits"].shape[-1:]) == (512,)

"""docs/patching.md's code runs as written and shows what its prose says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tolerance import assert_close

ROOT = Path(__file__).resolve().parent.parent


def test_patching_docs_run(monkeypatch, tmp_path, stories_path):
    pytest.importorskip("matplotlib")
    text = (ROOT / "docs" / "patching.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the heatmap is written to the working directory
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ns: dict = {}
    for i, code in enumerate(blocks):
        code = code.replace("../shared/models/stories260K", str(stories_path))
        exec(compile(code, f"docs/patching.md block {i}", "exec"), ns)
    resid, heads, every = (np.array(ns[k]) for k in ("resid", "heads", "every"))
    assert resid.shape == (5, 20) and heads.shape == (5, 8) and every.shape == (3, 5, 20)
    assert (tmp_path / "patching_ioi.png").read_bytes()[:4] == b"\x89PNG"
    # the prose: the differing name (position 12) carries the signal in every layer; head 4.2 moves it
    assert ns["model"].to_str_tokens(ns["corrupted"][0])[12] == " Lily"
    assert np.all(resid[:, 12] > 0.8)
    assert np.unravel_index(np.abs(heads).argmax(), heads.shape) == (4, 2)
    assert heads[4, 2] == pytest.approx(1.17, abs=0.01)
    assert_close(resid[0, :12], 0.0, tol=1e-5)  # identical prefix: identity patches
    grid = np.array(ns["grid"])
    assert grid.shape == (5, 6) and np.isnan(grid[:, :2]).all() and np.isfinite(grid[:, 2:]).all()
    assert np.array(ns["direct"]).shape == (5, 8) and np.array(ns["via_v"]).shape == (5, 8)

"""docs/from-transformerlens.md's IOI walkthrough runs as written, and its findings hold: the exact DLA
identities, and the same head found by direct logit attribution, activation patching and ablation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from docs_fixtures import docs_workdir

ROOT = Path(__file__).resolve().parent.parent


def test_from_transformerlens_walkthrough_runs_as_written(monkeypatch, stories_path, capsys, tmp_path):
    text = (ROOT / "docs" / "from-transformerlens.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(docs_workdir(tmp_path))
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/from-transformerlens.md block {i}", "exec"), ns)
    out = capsys.readouterr().out
    assert "logit difference:" in out and "top heads by direct logit attribution:" in out
    ld = float(ns["logit_diff"](ns["logits"]).item())
    # exact identities of the decomposition (float32 rounding)
    tol = 1e-4 * max(1.0, abs(ld))
    assert abs(float(ns["residual_stack_to_logit_diff"](ns["final"][None])[0].item()) - ld) < tol
    assert abs(float(ns["dla_layers"].sum().item()) - ld) < tol
    assert abs(float(ns["logit_lens"][-1].item()) - ld) < tol
    assert ns["labels"][0] == "embed" and ns["head_labels"][0] == "L0H0"
    # the same head three ways
    layer, head = ns["layer"], ns["head"]
    assert ns["head_labels"][ns["top"][0]] == f"L{layer}H{head}"
    assert float(ns["patched"][layer, head].item()) > 0.5 * ld
    assert float(ns["ablated"].item()) < ld
    # the backward hook saw d logit_diff / d z; only the last position reaches the metric
    g = np.array(ns["grads"][f"blocks.{layer}.attn.hook_z"])
    assert np.abs(g[:, -1]).max() > 0 and np.abs(g[:, :-1]).max() == 0
    assert ns["ranks"][0][0] == " Lily" and isinstance(ns["ranks"][0][1], int)

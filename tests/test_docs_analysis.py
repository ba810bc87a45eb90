"""docs/analysis.md's code runs as written (the README's analysis examples)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_analysis_doc_blocks_run(monkeypatch, stories_path, capsys):
    text = (ROOT / "docs" / "analysis.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/analysis.md block {i}", "exec"), ns)
    out = capsys.readouterr().out
    assert "final_post" in out and "(6, 1, 3)" in out
    assert ns["steered"] != ns["model"].generate("Once upon a time", max_new_tokens=20, do_sample=False)

"""docs/analysis.md's code runs as written (the README's analysis examples)."""

from __future__ import annotations

import re
from pathlib import Path

from docs_fixtures import docs_workdir

ROOT = Path(__file__).resolve().parent.parent


def test_analysis_doc_blocks_run(monkeypatch, stories_path, capsys, tmp_path):
    text = (ROOT / "docs" / "analysis.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(docs_workdir(tmp_path))  # writes land in tmp_path, never in the source tree
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/analysis.md block {i}", "exec"), ns)
    out = capsys.readouterr().out
    assert "final_post" in out and "(6, 1, 3)" in out
    assert ns["steered"] != ns["model"].generate("Once upon a time", max_new_tokens=20, do_sample=False)

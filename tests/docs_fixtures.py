"""Run documentation code as written without touching the source tree: a scratch folder that looks like the
project root (``docs/``, ``tests/`` and ``../shared`` as the examples expect), as the working directory."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def docs_workdir(tmp_path: Path) -> Path:
    """A fresh project-root look-alike under ``tmp_path``: writes land there, reads reach the real files."""
    proj = tmp_path / "proj"
    (proj / "docs").mkdir(parents=True)
    (proj / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "shared").symlink_to((ROOT / ".." / "shared").resolve())
    return proj

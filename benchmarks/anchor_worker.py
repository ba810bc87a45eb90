"""The client side of an anchor worker: a benchmark script run under an anchor's venv (TransformerLens,
circuit-tracer) that prepares its side, prints ``ready``, then answers each ``run`` line on stdin with one JSON line,
so that the caller can interleave the anchor's timed runs with its own (``patching.py``, ``circuits.py``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


class AnchorWorker:
    """``python script --worker ... `` in ``folder`` (its stderr goes to ``folder``/worker.log, quoted on failure);
    use as a context manager: the worker is told to stop (stdin closed) on exit."""

    def __init__(self, python: str, argv: list[str], folder: Path, what: str):
        self.folder, self.what, self.python = folder, what, python
        self.log = open(folder / "worker.log", "w")  # the anchor's progress bars and any traceback
        self.proc = subprocess.Popen([python, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            self.proc.wait(timeout=60)
            self.close()
            raise SystemExit(f"{what} worker failed ({python}):\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return (self.folder / "worker.log").read_text()[-4000:]

    def run(self) -> dict:
        """One timed run of the anchor: its JSON reply."""
        self.stdin.write("run\n")
        self.stdin.flush()
        line = self.stdout.readline()
        if not line:
            raise SystemExit(f"{self.what} worker died:\n{self._log_tail()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()

    def __enter__(self) -> AnchorWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

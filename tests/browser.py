"""Pages in a real browser for the tests: headless Debian chromium (no sandbox, no network), its rendered DOM and
screenshots. With HOOKED_MLX_REQUIRE_BROWSER=1 (CI) a missing chromium fails the tests instead of skipping them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("HOOKED_MLX_REQUIRE_BROWSER") == "1":
        pytest.fail("HOOKED_MLX_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
    pytest.skip("no chromium on PATH")


def _browser(url: str, *extra: str) -> subprocess.CompletedProcess:
    # (a hang is the only thing this timeout stops)
    return subprocess.run([_chromium(), *CHROME_FLAGS, "--enable-logging=stderr", "--v=0", *extra, url],
                          capture_output=True, text=True, timeout=120, check=True)


def _dom(path, fragment: str = "") -> str:
    return _browser(f"file://{path}{fragment}", "--dump-dom").stdout


class _Spans(HTMLParser):
    """Elements' attributes and texts, by tag."""

    def __init__(self):
        super().__init__()
        self.items: list[tuple[str, dict, str]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, dict(attrs), ""))
        self._open.append(len(self.items) - 1)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._open:
            i = self._open[-1]
            t, a, s = self.items[i]
            self.items[i] = (t, a, s + data)


def _parse(dom: str) -> _Spans:
    p = _Spans()
    p.feed(dom)
    return p


def _assert_rendered(dom: str) -> None:
    assert re.search(r'<body[^>]*data-rendered="1"', dom), "the page's script did not finish drawing"
    assert not re.search(r"<html[^>]*data-errors=", dom), "the page recorded script errors"


def _not_blank(png) -> None:
    from PIL import Image

    im = Image.open(png).convert("RGB")
    px = np.asarray(im)
    non_white = (px < 240).any(axis=-1).mean()
    assert non_white > 0.01 and len(np.unique(px.reshape(-1, 3), axis=0)) > 20, "the screenshot is (nearly) blank"



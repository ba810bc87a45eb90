"""The shell every page shares: one HTML file with its data as JSON, its style and script inline.

The page records script errors on ``<html data-errors="N">`` and marks ``<body data-rendered="1">`` once its
script has drawn everything, so a headless browser (the tests) can tell a page that rendered from one that broke.
"""

from __future__ import annotations

import html
import json

BASE_STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 22px 0 8px; }
.meta { color: #555; margin-bottom: 12px; } .muted { color: #777; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left; }
.tok { white-space: pre; border-radius: 3px; padding: 1px 0; font-family: ui-monospace, Menlo, Consolas, monospace; }
#tip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 3px 7px; border-radius: 4px;
       font-size: 12px; display: none; z-index: 10; }
"""

ERROR_HOOK = """
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message));
  document.documentElement.setAttribute('data-errors', String(window.__errors.length));
});
"""

COMMON_SCRIPT = """
const DATA = JSON.parse(document.getElementById('page-data').textContent);
const tip = document.getElementById('tip');
function showTip(ev, text) { tip.textContent = text; tip.style.display = 'block';
  tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; }
function hideTip() { tip.style.display = 'none'; }
function el(tag, attrs, text) { const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; }
function fmt(v) { return (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(3)); }
function visible(s) { return s.replace(/\\n/g, '\\u21b5').replace(/\\t/g, '\\u2192'); }
"""


def _json_for_script(data) -> str:
    """JSON that is safe inside <script>: no '</' (a closing tag) and no HTML comment openers."""
    return json.dumps(data, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_page(title: str, data, body: str, script: str, style: str = "") -> str:
    """A complete HTML document: ``body`` (static HTML), ``data`` (JSON-able) and ``script`` (drawing the page
    from DATA; it must end by setting document.body.dataset.rendered = '1')."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">"
        f"<style>{BASE_STYLE}{style}</style><script>{ERROR_HOOK}</script></head>\n<body>"
        f"{body}<div id=\"tip\"></div>"
        f"<script id=\"page-data\" type=\"application/json\">{_json_for_script(data)}</script>"
        f"<script>{COMMON_SCRIPT}\n{script}</script></body></html>\n"
    )

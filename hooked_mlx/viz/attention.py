"""The attention-pattern viewer: per layer and head, a prompt's tokens (hover a token: where it attends) and the
head's query x key heatmap.

``attention_data(model, text)`` runs the model once, caching every ``blocks.{l}.attn.hook_pattern``;
``render_attention_page(data)`` draws it. The page's URL hash picks the view: ``#layer=2&head=5&query=7``.
"""

from __future__ import annotations

import html

import numpy as np

from .page import render_page

STYLE = """
.controls { margin: 10px 0 14px; } select { margin-right: 16px; }
#tokens { line-height: 2.1; margin: 8px 0 16px; max-width: 1100px; }
#tokens .tok { cursor: pointer; padding: 2px 1px; }
#tokens .tok[data-query="1"] { outline: 2px solid #1f4fbf; }
svg text { font-size: 10px; fill: #444; }
"""

SCRIPT = """
const d = DATA, L = d.patterns.length, Hn = d.patterns[0].length, T = d.tokens.length;
const state = {layer: L - 1, head: 0, query: T - 1};
location.hash.replace('#', '').split('&').forEach(function (kv) {
  const p = kv.split('='), v = parseInt(p[1], 10);
  if (p[0] in state && !isNaN(v)) state[p[0]] = v;
});
state.layer = Math.min(Math.max(state.layer, 0), L - 1); state.head = Math.min(Math.max(state.head, 0), Hn - 1);
state.query = Math.min(Math.max(state.query, 0), T - 1);
function fill(id, n, label, key) {
  const s = document.getElementById(id);
  for (let i = 0; i < n; i++) { const o = el('option', {value: i}, label + ' ' + i); s.appendChild(o); }
  s.value = state[key];
  s.addEventListener('change', function () { state[key] = parseInt(s.value, 10); draw(); });
}
fill('layer', L, 'layer', 'layer'); fill('head', Hn, 'head', 'head');
const toks = document.getElementById('tokens');
const spans = d.tokens.map(function (t, i) {
  const s = el('span', {class: 'tok', 'data-pos': i}, visible(t));
  s.addEventListener('mouseenter', function () { state.query = i; draw(); });
  s.addEventListener('mousemove', e => showTip(e, JSON.stringify(t) + ' (' + i + ')' + (i <= state.query ?
    ': ' + fmt(d.patterns[state.layer][state.head][state.query][i]) + ' from query ' + state.query : '')));
  s.addEventListener('mouseleave', hideTip);
  toks.appendChild(s); return s;
});
const svg = document.getElementById('heat'), ns = 'http://www.w3.org/2000/svg', cell = Math.max(4, Math.min(22, 520 / T));
svg.setAttribute('width', T * cell + 2); svg.setAttribute('height', T * cell + 2);
const rects = [];
for (let q = 0; q < T; q++) { rects.push([]); for (let k = 0; k < T; k++) {
  const r = document.createElementNS(ns, 'rect');
  r.setAttribute('x', 1 + k * cell); r.setAttribute('y', 1 + q * cell); r.setAttribute('width', cell - 0.5);
  r.setAttribute('height', cell - 0.5);
  r.addEventListener('mousemove', e => showTip(e, 'query ' + q + ' ' + JSON.stringify(d.tokens[q]) + ' -> key ' + k + ' ' +
    JSON.stringify(d.tokens[k]) + ': ' + fmt(d.patterns[state.layer][state.head][q][k])));
  r.addEventListener('mouseleave', hideTip);
  svg.appendChild(r); rects[q].push(r);
} }
function draw() {
  const P = d.patterns[state.layer][state.head], row = P[state.query];
  document.getElementById('where').textContent = 'layer ' + state.layer + ', head ' + state.head + ', query ' +
    state.query + ' ' + JSON.stringify(d.tokens[state.query]);
  spans.forEach(function (s, i) {
    const w = i <= state.query ? row[i] : 0;
    s.setAttribute('data-weight', w.toFixed(6)); s.setAttribute('data-query', i === state.query ? '1' : '0');
    s.style.background = w > 0 ? 'rgba(40, 90, 220, ' + Math.min(1, w).toFixed(3) + ')' : 'transparent';
    s.style.color = w > 0.55 ? '#fff' : '#1d1d1f';
  });
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const w = P[q][k];
    rects[q][k].setAttribute('fill', 'rgba(40, 90, 220, ' + Math.min(1, w).toFixed(3) + ')');
    rects[q][k].setAttribute('stroke', q === state.query ? '#1f4fbf' : 'none');
  }
  history.replaceState(null, '', '#layer=' + state.layer + '&head=' + state.head + '&query=' + state.query);
}
draw();
document.body.dataset.rendered = '1';
"""


def attention_data(model, text, *, prepend_bos: bool | None = None, decimals: int = 5) -> dict:
    """The attention patterns of one prompt: {"title", "tokens" [T], "patterns" [n_layers][n_heads][T][T]}.

    One forward, caching only the patterns; weights are rounded to ``decimals`` (they sum to 1 per query)."""
    tokens = model.to_tokens(text, prepend_bos=prepend_bos) if isinstance(text, str) else text
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[0] != 1:
        raise ValueError(f"attention_data shows one prompt; got a batch of {tokens.shape[0]}.")
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    patterns = [np.round(np.array(cache[n][0], dtype=np.float64), decimals).tolist() for n in names]
    return {"title": getattr(model.cfg, "model_name", "") or "model", "tokens": model.to_str_tokens(tokens[0]),
            "patterns": patterns}


def render_attention_page(data: dict) -> str:
    """The viewer for ``attention_data``'s record (a complete, self-contained HTML document)."""
    body = (f"<h1>Attention patterns</h1><div class=\"meta\">{html.escape(str(data.get('title', '')))} &middot; "
            f"{len(data['tokens'])} tokens. Hover a token to see where it attends.</div>"
            "<div class=\"controls\"><select id=\"layer\"></select><select id=\"head\"></select>"
            "<span id=\"where\" class=\"muted\"></span></div><div id=\"tokens\"></div>"
            "<h2>Query (rows) x key (columns)</h2><svg id=\"heat\"></svg>")
    return render_page("Attention patterns", data, body, SCRIPT, STYLE)

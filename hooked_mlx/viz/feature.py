"""The feature dashboard page: top-activating contexts with token highlighting, the activation histogram and
density, and the tokens the feature's decoder direction promotes and suppresses.

Its data is one feature's Neuronpedia-style record (``hooked_mlx.sae.dashboard.feature_dashboard_data``):
``index``, ``layer`` (the hook), ``modelId``, ``activations`` (a list of ``{"tokens", "values", "maxValue",
"maxValueTokenIndex"}``), ``pos_str`` / ``pos_values`` and ``neg_str`` / ``neg_values`` (logit effects),
``frac_nonzero``, ``freq_hist_data_bar_values`` / ``freq_hist_data_bar_heights`` (histogram of the non-zero
activations: bin centres and counts) and ``n_tokens``.
"""

from __future__ import annotations

import html

from .page import render_page

STYLE = """
.example { margin: 3px 0; padding: 4px 6px; background: #fafafa; border-radius: 4px; line-height: 1.9; }
.example .tok[data-max="1"] { outline: 2px solid #b34700; }
.num { color: #555; font-variant-numeric: tabular-nums; margin-right: 8px; display: inline-block; min-width: 56px; }
.cols { display: flex; gap: 48px; flex-wrap: wrap; }
.pos { color: #0a6b2a; } .neg { color: #a01616; }
svg text { font-size: 11px; fill: #555; }
"""

SCRIPT = """
const d = DATA;
document.getElementById('density').textContent = (100 * d.frac_nonzero).toFixed(3) + '% of ' +
  d.n_tokens.toLocaleString() + ' tokens';
document.getElementById('maxact').textContent = fmt(d.max_activation);

// histogram of the non-zero activations
(function () {
  const H = d.freq_hist_data_bar_heights, V = d.freq_hist_data_bar_values, svg = document.getElementById('hist');
  const W = 520, Ht = 140, pad = 24, n = H.length, top = Math.max(1, ...H);
  const ns = 'http://www.w3.org/2000/svg', bw = (W - 2 * pad) / Math.max(1, n);
  H.forEach(function (h, i) {
    const r = document.createElementNS(ns, 'rect'), bh = (Ht - 2 * pad) * h / top;
    r.setAttribute('x', pad + i * bw); r.setAttribute('width', Math.max(1, bw - 1));
    r.setAttribute('y', Ht - pad - bh); r.setAttribute('height', bh); r.setAttribute('fill', '#e07b39');
    r.setAttribute('data-count', h);
    r.addEventListener('mousemove', e => showTip(e, 'activation ~' + fmt(V[i]) + ': ' + h + ' tokens'));
    r.addEventListener('mouseleave', hideTip);
    svg.appendChild(r);
  });
  if (n) {
    const t0 = document.createElementNS(ns, 'text'), t1 = document.createElementNS(ns, 'text');
    t0.setAttribute('x', pad); t0.setAttribute('y', Ht - 6); t0.textContent = fmt(V[0]);
    t1.setAttribute('x', W - pad - 40); t1.setAttribute('y', Ht - 6); t1.textContent = fmt(V[n - 1]);
    svg.appendChild(t0); svg.appendChild(t1);
  } else {
    const t = document.createElementNS(ns, 'text'); t.setAttribute('x', pad); t.setAttribute('y', Ht / 2);
    t.textContent = 'the feature never fired'; svg.appendChild(t);
  }
})();

// logit effects
function logits(id, strs, vals, cls) {
  const tb = document.getElementById(id);
  strs.forEach(function (s, i) {
    const tr = el('tr'); tr.appendChild(el('td', {class: 'tok'}, visible(s)));
    tr.appendChild(el('td', {class: cls + ' num', 'data-value': vals[i]}, (vals[i] >= 0 ? '+' : '') + fmt(vals[i])));
    tb.appendChild(tr);
  });
}
logits('pos', d.pos_str, d.pos_values, 'pos');
logits('neg', d.neg_str, d.neg_values, 'neg');

// top-activating contexts
const ex = document.getElementById('examples'), scale = Math.max(1e-12, d.max_activation);
d.activations.forEach(function (a, k) {
  const row = el('div', {class: 'example', 'data-example': k});
  row.appendChild(el('span', {class: 'num'}, fmt(a.maxValue)));
  a.tokens.forEach(function (t, i) {
    const v = a.values[i], s = el('span', {class: 'tok', 'data-value': v}, visible(t));
    if (v > 0) s.style.background = 'rgba(230, 110, 20, ' + Math.min(1, 0.12 + 0.88 * v / scale).toFixed(3) + ')';
    if (i === a.maxValueTokenIndex) s.setAttribute('data-max', '1');
    s.addEventListener('mousemove', e => showTip(e, JSON.stringify(t) + ': ' + fmt(v)));
    s.addEventListener('mouseleave', hideTip);
    row.appendChild(s);
  });
  ex.appendChild(row);
});
if (!d.activations.length) ex.appendChild(el('p', {class: 'muted'}, 'No activating contexts in the corpus.'));
document.body.dataset.rendered = '1';
"""


def render_feature_page(data: dict) -> str:
    """One feature's dashboard (a complete, self-contained HTML document)."""
    title = f"Feature {data['index']} - {data['layer']}"
    body = (
        f"<h1>Feature {int(data['index'])}</h1>"
        f"<div class=\"meta\">{html.escape(str(data['layer']))} &middot; {html.escape(str(data.get('modelId', '')))}"
        f"</div><div>Active on <b id=\"density\"></b>; largest activation <b id=\"maxact\"></b></div>"
        "<h2>Activation histogram (non-zero activations)</h2><svg id=\"hist\" width=\"520\" height=\"140\"></svg>"
        "<div class=\"cols\"><div><h2>Top positive logits</h2><table id=\"pos\"></table></div>"
        "<div><h2>Top negative logits</h2><table id=\"neg\"></table></div></div>"
        "<h2>Top-activating contexts</h2><div id=\"examples\"></div>"
    )
    return render_page(title, data, body, SCRIPT, STYLE)


INDEX_SCRIPT = """
const tb = document.getElementById('rows');
DATA.features.forEach(function (f) {
  const tr = el('tr'), a = el('a', {href: f.file}, 'feature ' + f.index);
  const td = el('td'); td.appendChild(a); tr.appendChild(td);
  tr.appendChild(el('td', {class: 'num'}, (100 * f.frac_nonzero).toFixed(3) + '%'));
  tr.appendChild(el('td', {class: 'num'}, fmt(f.max_activation)));
  tr.appendChild(el('td', {class: 'tok'}, f.pos_str.slice(0, 5).map(visible).join('  ')));
  tb.appendChild(tr);
});
document.body.dataset.rendered = '1';
"""


def render_feature_index(title: str, features: list[dict]) -> str:
    """A table of dashboards: ``features`` = [{"index", "file", "frac_nonzero", "max_activation", "pos_str"}]."""
    body = (f"<h1>{html.escape(title)}</h1><table><thead><tr><th>feature</th><th>density</th><th>max</th>"
            "<th>top positive logits</th></tr></thead><tbody id=\"rows\"></tbody></table>")
    return render_page(title, {"features": features}, body, INDEX_SCRIPT, ".num { color: #555; }")

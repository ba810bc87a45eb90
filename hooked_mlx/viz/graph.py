"""The attribution-graph viewer: nodes by layer (rows: embeddings at the bottom, logits on top) and position
(columns), edges drawn by weight (blue positive, red negative; width by |weight|). Clicking a node lists its
strongest incoming and outgoing edges and, when the page was given dashboards, the feature's top contexts.

Its data is circuit-tracer's graph JSON (``hooked_mlx.circuits.graph_to_json``), plus optional ``contexts``:
{node_id: [{"tokens": [...], "values": [...]}, ...]} (e.g. from ``hooked_mlx.sae.dashboard``). The URL hash
``#node=ID`` selects a node.
"""

from __future__ import annotations

import html

from .page import render_page

STYLE = """
#graph { border: 1px solid #ddd; background: #fcfcfc; }
#graph circle { cursor: pointer; stroke: #333; stroke-width: 0.6; }
#graph circle[data-selected="1"] { stroke: #000; stroke-width: 2.5; }
#side { margin-top: 10px; max-width: 1000px; } .ex { margin: 2px 0; line-height: 1.8; }
.lay { display: flex; gap: 28px; flex-wrap: wrap; } svg text { font-size: 10px; fill: #444; }
"""

SCRIPT = """
const g = DATA.graph, ctxs = DATA.contexts || {};
const nodes = g.nodes, byId = {};
nodes.forEach(n => byId[n.node_id] = n);
const tokens = g.metadata.prompt_tokens, P = tokens.length;
function row(n) { return n.feature_type === 'embedding' ? 0 : n.feature_type === 'logit' ? maxLayer + 2 : parseInt(n.layer, 10) + 1; }
let maxLayer = 0;
nodes.forEach(n => { if (n.feature_type !== 'embedding' && n.feature_type !== 'logit') maxLayer = Math.max(maxLayer, parseInt(n.layer, 10)); });
const R = maxLayer + 3, colW = Math.max(60, Math.min(110, 1000 / P)), rowH = 54, W = P * colW + 80, H = R * rowH + 40;
const svg = document.getElementById('graph'), ns = 'http://www.w3.org/2000/svg';
svg.setAttribute('width', W); svg.setAttribute('height', H);
// place: nodes sharing a cell spread horizontally
const cells = {};
nodes.forEach(n => { const k = row(n) + ':' + n.ctx_idx; (cells[k] = cells[k] || []).push(n); });
Object.values(cells).forEach(list => list.forEach((n, i) => {
  n._x = 60 + n.ctx_idx * colW + colW / 2 + (i - (list.length - 1) / 2) * Math.min(12, (colW - 10) / list.length);
  n._y = H - 30 - row(n) * rowH;
}));
for (let p = 0; p < P; p++) { const t = document.createElementNS(ns, 'text'); t.setAttribute('x', 60 + p * colW + 4);
  t.setAttribute('y', H - 8); t.textContent = visible(tokens[p]).slice(0, 12); svg.appendChild(t); }
for (let r = 0; r < R; r++) { const t = document.createElementNS(ns, 'text'); t.setAttribute('x', 4);
  t.setAttribute('y', H - 30 - r * rowH + 4); t.textContent = r === 0 ? 'emb' : r === R - 1 ? 'logit' : 'L' + (r - 1);
  svg.appendChild(t); }
const maxW = Math.max(1e-12, ...g.links.map(l => Math.abs(l.weight)));
const lines = g.links.map(function (l) {
  const a = byId[l.source], b = byId[l.target], e = document.createElementNS(ns, 'line');
  e.setAttribute('x1', a._x); e.setAttribute('y1', a._y); e.setAttribute('x2', b._x); e.setAttribute('y2', b._y);
  e.setAttribute('stroke', l.weight >= 0 ? 'rgba(40,90,220,0.55)' : 'rgba(210,40,40,0.55)');
  e.setAttribute('stroke-width', (0.3 + 3.5 * Math.abs(l.weight) / maxW).toFixed(2));
  e.setAttribute('data-weight', l.weight);
  svg.appendChild(e); return e;
});
const colors = {'cross layer transcoder': '#f0a030', 'mlp reconstruction error': '#9a9a9a', 'embedding': '#7fbf7f', 'logit': '#c080e0'};
const circles = {};
nodes.forEach(function (n) {
  const c = document.createElementNS(ns, 'circle');
  c.setAttribute('cx', n._x); c.setAttribute('cy', n._y); c.setAttribute('r', n.feature_type === 'logit' ? 7 : 5);
  c.setAttribute('fill', colors[n.feature_type] || '#ccc'); c.setAttribute('data-node', n.node_id);
  c.addEventListener('click', () => select(n.node_id));
  c.addEventListener('mousemove', e => showTip(e, label(n)));
  c.addEventListener('mouseleave', hideTip);
  svg.appendChild(c); circles[n.node_id] = c;
});
function label(n) {
  if (n.feature_type === 'cross layer transcoder') return 'L' + n.layer + ' feature ' + n.feature + ' @' + n.ctx_idx + ' (act ' + fmt(n.activation) + ')';
  if (n.feature_type === 'mlp reconstruction error') return 'error L' + n.layer + ' @' + n.ctx_idx;
  return n.clerp || n.node_id;
}
function select(id) {
  const n = byId[id]; if (!n) return;
  Object.values(circles).forEach(c => c.setAttribute('data-selected', '0'));
  circles[id].setAttribute('data-selected', '1');
  const side = document.getElementById('side'); side.innerHTML = '';
  side.appendChild(el('h2', {}, label(n) + ' - influence ' + fmt(n.influence || 0)));
  const lay = el('div', {class: 'lay'});
  [['incoming', l => l.target === id, l => l.source], ['outgoing', l => l.source === id, l => l.target]].forEach(function (spec) {
    const box = el('div'), tb = el('table', {'data-edges': spec[0]});
    box.appendChild(el('h2', {}, spec[0] + ' edges'));
    g.links.filter(spec[1]).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12).forEach(function (l) {
      const tr = el('tr'); tr.appendChild(el('td', {}, label(byId[spec[2](l)])));
      tr.appendChild(el('td', {class: 'num', 'data-weight': l.weight}, fmt(l.weight))); tb.appendChild(tr);
    });
    box.appendChild(tb); lay.appendChild(box);
  });
  side.appendChild(lay);
  const ex = ctxs[id] || [];
  if (ex.length) {
    side.appendChild(el('h2', {}, 'Top contexts'));
    const top = Math.max(1e-12, ...ex.map(e => Math.max(...e.values)));
    ex.forEach(function (e) {
      const d = el('div', {class: 'ex', 'data-context': '1'});
      e.tokens.forEach(function (t, i) { const s = el('span', {class: 'tok'}, visible(t));
        if (e.values[i] > 0) s.style.background = 'rgba(230,110,20,' + Math.min(1, 0.15 + 0.85 * e.values[i] / top).toFixed(3) + ')';
        d.appendChild(s); });
      side.appendChild(d);
    });
  }
  history.replaceState(null, '', '#node=' + encodeURIComponent(id));
}
const m = location.hash.match(/node=([^&]+)/);
select(m ? decodeURIComponent(m[1]) : (nodes.find(n => n.is_target_logit) || nodes[0]).node_id);
document.getElementById('summary').textContent = nodes.length + ' nodes, ' + g.links.length + ' edges; replacement score ' +
  fmt(g.metadata.info.replacement_score) + ', completeness ' + fmt(g.metadata.info.completeness_score);
document.body.dataset.rendered = '1';
"""


def render_graph_page(graph: dict, contexts: dict | None = None) -> str:
    """The viewer for one graph (``graph_to_json``'s dict); ``contexts``: top contexts by node id."""
    prompt = html.escape(str(graph["metadata"].get("prompt", "")))
    body = (f"<h1>Attribution graph</h1><div class=\"meta\">{prompt}</div><div id=\"summary\" class=\"muted\"></div>"
            "<svg id=\"graph\"></svg><div id=\"side\"></div>")
    return render_page("Attribution graph", {"graph": graph, "contexts": contexts or {}}, body, SCRIPT, STYLE)

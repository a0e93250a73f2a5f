"""The graph view's browser side: pan, zoom, hover cards and clicks on the server-drawn SVG.

Served inline with the page (no CDN, no extra file). The server sends the SVG and the colours;
this script only moves the picture and reports clicks back (NiceGUI's ``emitEvent``), so
expanding a module is one round trip and colours change without redrawing the layout.
"""

from __future__ import annotations

__all__ = ["GRAPH_HEAD"]

_CSS = """
.sg-root { position: relative; width: 100%; height: 68vh; min-height: 420px; overflow: hidden;
           background: #fcfcfd; border: 1px solid #e4e7ec; border-radius: 8px; cursor: grab;
           background-image: radial-gradient(#e4e7ec 1px, transparent 1px); background-size: 22px 22px; }
.sg-root.sg-dragging { cursor: grabbing; }
.sg-canvas, .sg-canvas svg { width: 100%; height: 100%; display: block; user-select: none; }
.sg-svg { font-family: Inter, Roboto, sans-serif; }
.sg-edges path { fill: none; stroke: #98a2b3; stroke-width: 1.3; }
.sg-edges path.sg-skip { stroke: #b3b8db; stroke-dasharray: 5 3; }
.sg-edges path.sg-wrap { stroke: #b3b8db; }
.sg-frame rect { fill: rgba(57, 73, 171, 0.035); stroke: #c5cae9; stroke-dasharray: 4 3; }
.sg-frame text { font-size: 11px; fill: #5c6bc0; cursor: pointer; font-weight: 600; }
.sg-node { cursor: pointer; }
.sg-node .sg-rect { stroke: #98a2b3; stroke-width: 1; transition: fill 0.25s; }
.sg-node[data-box] .sg-rect { stroke: #3949ab; stroke-width: 2; }
.sg-node:hover .sg-rect { stroke: #f28e2b; stroke-width: 2.5; }
.sg-name { font-size: 11.5px; font-weight: 600; }
.sg-sub { font-size: 9.5px; opacity: 0.85; }
.sg-plus { font-size: 14px; font-weight: 700; }
.sg-node.sg-alerted .sg-rect { stroke: #d62728; stroke-width: 3; }
.sg-alert circle { fill: #d62728; stroke: #fff; stroke-width: 1.5; }
.sg-alert text { fill: #fff; font-size: 12px; font-weight: 700; text-anchor: middle; }
.sg-tip { position: absolute; pointer-events: none; display: none; max-width: 420px; z-index: 5;
          background: rgba(16, 24, 40, 0.94); color: #f2f4f7; font-size: 12px; line-height: 1.45;
          padding: 8px 10px; border-radius: 6px; box-shadow: 0 4px 12px rgba(16,24,40,.25); }
.sg-tip .sg-op { color: #a4bcfd; margin-left: 4px; }
.sg-tip .sg-k { color: #98a2b3; }
.sg-tip .sg-bad { color: #fda29b; }
.sg-legend { height: 12px; width: 220px; border-radius: 3px;
             background: linear-gradient(90deg, #440154, #3b528b, #21918c, #5ec962, #fde725); }
"""

_JS = r"""
window.sondeGraph = window.sondeGraph || (() => {
  const S = {};
  const apply = (st) => st.vp && st.vp.setAttribute('transform', `translate(${st.x},${st.y}) scale(${st.k})`);
  function fit(id) {
    const st = S[id]; if (!st || !st.svg) return;
    const box = st.root.getBoundingClientRect();
    const w = +st.svg.dataset.width, h = +st.svg.dataset.height;
    // The whole picture (the wheel zooms in); only a huge expanded model starts at its input instead.
    st.k = Math.max(0.2, Math.min(box.width / w, box.height / h, 1.1));
    st.x = Math.max(10, (box.width - w * st.k) / 2); st.y = Math.max(10, (box.height - h * st.k) / 2);
    apply(st);
  }
  function bind(st, id) {
    const root = st.root;
    root.addEventListener('wheel', (e) => {
      e.preventDefault();
      const r = root.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
      const k = Math.min(4, Math.max(0.05, st.k * Math.exp(-e.deltaY * 0.0015)));
      st.x = mx - (mx - st.x) * k / st.k; st.y = my - (my - st.y) * k / st.k; st.k = k; apply(st);
    }, {passive: false});
    root.addEventListener('pointerdown', (e) => {
      st.drag = {x: e.clientX, y: e.clientY, ox: st.x, oy: st.y, moved: false};
      root.classList.add('sg-dragging');
    });
    window.addEventListener('pointermove', (e) => {
      const d = st.drag; if (!d) return;
      if (Math.abs(e.clientX - d.x) + Math.abs(e.clientY - d.y) > 4) d.moved = true;
      if (d.moved) { st.x = d.ox + e.clientX - d.x; st.y = d.oy + e.clientY - d.y; apply(st); }
    });
    window.addEventListener('pointerup', (e) => {
      const d = st.drag; st.drag = null; root.classList.remove('sg-dragging');
      if (!d || d.moved || !root.contains(e.target)) return;
      const node = e.target.closest('[data-node]'), frame = e.target.closest('[data-frame]');
      if (node) emitEvent('sonde_graph_click', {id, name: node.dataset.node});
      else if (frame) emitEvent('sonde_graph_click', {id, frame: frame.dataset.frame});
    });
    root.addEventListener('mousemove', (e) => {
      const node = e.target.closest && e.target.closest('[data-node]');
      const tip = root.querySelector('.sg-tip');
      if (!node || st.drag) { tip.style.display = 'none'; return; }
      // The server's cards are escaped HTML; a node without one shows its name as plain text.
      const card = st.tips[node.dataset.node];
      if (card) tip.innerHTML = card; else tip.textContent = node.dataset.node;
      tip.style.display = 'block';
      const r = root.getBoundingClientRect();
      let x = e.clientX - r.left + 14, y = e.clientY - r.top + 14;
      if (x + tip.offsetWidth > r.width) x = Math.max(4, e.clientX - r.left - tip.offsetWidth - 14);
      if (y + tip.offsetHeight > r.height) y = Math.max(4, e.clientY - r.top - tip.offsetHeight - 14);
      tip.style.left = x + 'px'; tip.style.top = y + 'px';
    });
    root.addEventListener('mouseleave', () => { root.querySelector('.sg-tip').style.display = 'none'; });
  }
  function update(id, p) {
    const st = S[id]; if (!st || !st.svg) return;
    st.tips = p.tips || st.tips;
    const fills = p.fills || {}, alerts = p.alerts || {};
    st.svg.querySelectorAll('.sg-node').forEach((g) => {
      const name = g.dataset.node, f = fills[name];
      g.querySelector('.sg-rect').setAttribute('fill', f ? f[0] : g.dataset.plain);
      g.querySelectorAll('text').forEach((t) => {
        if (!t.closest('.sg-alert')) t.setAttribute('fill', f ? f[1] : '#1d2939');
      });
      g.classList.toggle('sg-alerted', !!alerts[name]);
      g.querySelector('.sg-alert').setAttribute('visibility', alerts[name] ? 'visible' : 'hidden');
    });
  }
  function show(id, svg, paint, keep) {
    const root = document.getElementById(id); if (!root) return;
    let st = S[id];
    if (!st || st.root !== root) { st = S[id] = {x: 0, y: 0, k: 1, root, tips: {}}; bind(st, id); }
    root.querySelector('.sg-canvas').innerHTML = svg;
    st.svg = root.querySelector('svg.sg-svg'); st.vp = st.svg.querySelector('.sg-viewport');
    if (keep) apply(st); else fit(id);
    update(id, paint);
  }
  function zoom(id, factor) {
    const st = S[id]; if (!st) return;
    const r = st.root.getBoundingClientRect(), mx = r.width / 2, my = r.height / 2, k = st.k * factor;
    st.x = mx - (mx - st.x) * factor; st.y = my - (my - st.y) * factor; st.k = k; apply(st);
  }
  return {show, update, fit, zoom};
})();
"""

#: What the graph page adds to its ``<head>``: the stylesheet and the script, inline.
GRAPH_HEAD = f"<style>{_CSS}</style><script>{_JS}</script>"

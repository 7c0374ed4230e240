// dictlearn feature dashboard: a static site that works from file:// (no fetch/XHR).
// Data shards are scripts that call DL.receive(name, data); each is loaded on demand.
'use strict';
window.DL = window.DL || {};
(function () {
  const pending = {};
  const cache = {};
  DL.receive = function (name, data) {
    cache[name] = data;
    if (pending[name]) { pending[name].resolve(data); }
  };
  function load(name) {
    if (cache[name] !== undefined) { return Promise.resolve(cache[name]); }
    if (pending[name]) { return pending[name].promise; }
    let entry = {};
    entry.promise = new Promise(function (resolve, reject) {
      entry.resolve = resolve;
      const s = document.createElement('script');
      s.src = 'data/' + name + '.js';
      s.onerror = function () { reject(new Error('missing data file ' + s.src)); };
      document.head.appendChild(s);
    });
    pending[name] = entry;
    return entry.promise;
  }
  DL.load = load;

  const meta = () => DL.meta;
  const el = (tag, attrs, children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') { e.textContent = v; } else if (k === 'html') { e.innerHTML = v; }
      else if (k.startsWith('on')) { e.addEventListener(k.slice(2), v); } else { e.setAttribute(k, v); }
    }
    for (const c of children || []) { if (c) { e.appendChild(c); } }
    return e;
  };
  const fmt = (x, d) => (x === 0 ? '0' : (Math.abs(x) < 1e-3 ? x.toExponential(2) : x.toFixed(d === undefined ? 3 : d)));
  function tokenText(id) {
    if (id < 0) { return ''; }
    const v = DL.vocab;
    const s = v && id < v.length ? v[id] : '<' + id + '>';
    return s.replace(/\n/g, '\u23ce').replace(/\t/g, '\u21e5');
  }
  DL.tokenText = tokenText;

  // FNV-1a over UTF-16 code units: the same bucket as dashboard.py's token_bucket.
  function bucket(s) {
    let h = 0x811c9dc5;
    for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    return h % meta().token_buckets;
  }

  function parseHash() {
    const out = {};
    for (const part of location.hash.replace(/^#/, '').split('&')) {
      if (!part) { continue; }
      const [k, v] = part.split('=');
      out[k] = decodeURIComponent(v || '');
    }
    return out;
  }
  const go = (params) => { location.hash = Object.entries(params).map(([k, v]) => k + '=' + encodeURIComponent(v)).join('&'); };

  // ---- index ---------------------------------------------------------------
  const SORTS = { index: 'feature', freq: 'frequency', max: 'max activation' };
  function indexRow(r) {
    const [id, freq, max, mean, desc] = r;
    return el('tr', { onclick: () => go({ f: id }), 'data-feature': id }, [
      el('td', {}, [el('a', { href: '#f=' + id, text: '#' + id })]),
      el('td', { text: fmt(freq, 5) }), el('td', { text: fmt(max, 2) }),
      el('td', { text: fmt(mean, 2) }), el('td', { text: desc })]);
  }
  function table(rows, sort, dir) {
    const head = el('tr', {}, [['index', 'feature'], ['freq', 'frequency'], ['max', 'max act.'],
      [null, 'mean act.'], [null, 'fires on / promotes']].map(([key, label]) => {
      const arrow = key === sort ? (dir === 'asc' ? ' \u25b2' : ' \u25bc') : '';
      return el('th', key ? { onclick: () => go({ sort: key, dir: key === sort && dir === 'desc' ? 'asc' : 'desc', page: 0 }), text: label + arrow } : { text: label });
    }));
    return el('table', { class: 'index' }, [el('thead', {}, [head]), el('tbody', {}, rows.map(indexRow))]);
  }
  async function showIndex(view, params) {
    const m = meta();
    const sort = SORTS[params.sort] ? params.sort : 'freq';
    const dir = params.dir === 'asc' ? 'asc' : 'desc';
    const per = m.page_size;
    const pages = Math.ceil(m.n_latents / per);
    const page = Math.max(0, Math.min(pages - 1, parseInt(params.page || '0', 10) || 0));
    // Orders are stored by index ascending, by frequency and max activation descending.
    const reversed = sort === 'index' ? dir === 'desc' : dir === 'asc';
    const positions = [];
    for (let p = page * per; p < Math.min(m.n_latents, (page + 1) * per); p++) {
      positions.push(reversed ? m.n_latents - 1 - p : p);
    }
    const shards = [...new Set(positions.map((p) => Math.floor(p / m.order_shard)))];
    const loaded = await Promise.all(shards.map((k) => load('order_' + sort + '_' + k)));
    const byShard = Object.fromEntries(shards.map((k, i) => [k, loaded[i]]));
    const rows = positions.map((p) => byShard[Math.floor(p / m.order_shard)][p % m.order_shard]);
    view.replaceChildren(
      el('div', { class: 'density' }, [el('h2', { text: 'Feature density (log10 firing frequency of the live features)' }),
        el('img', { src: 'density.svg', alt: 'log10 feature frequency histogram' })]),
      el('div', { class: 'pager' }, [
        el('button', { text: '\u2190 previous', onclick: () => go({ sort, dir, page: page - 1 }) }),
        el('span', { text: 'page ' + (page + 1) + ' of ' + pages + ', sorted by ' + SORTS[sort] + ' (' + dir + ')' }),
        el('button', { text: 'next \u2192', onclick: () => go({ sort, dir, page: page + 1 }) })]),
      table(rows, sort, dir));
  }
  async function showSearch(view, query) {
    const q = query.trim();
    if (/^#?\d+$/.test(q)) { go({ f: q.replace('#', '') }); return; }
    const key = q.toLowerCase();
    const data = await load('tok_' + bucket(key));
    const rows = data[key] || [];
    view.replaceChildren(el('h2', { text: rows.length + ' features fire on or promote "' + q + '"' }),
      rows.length ? table(rows, null, 'desc') : el('p', { class: 'muted', text: 'No feature has this token among its top tokens.' }));
  }

  // ---- one feature ---------------------------------------------------------
  function histogram(counts, edges) {
    const w = 420, h = 120, n = counts.length, bw = w / n;
    const top = Math.max(1, ...counts);
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('width', w); svg.setAttribute('height', h + 18); svg.setAttribute('class', 'hist');
    counts.forEach((c, i) => {
      const r = document.createElementNS(ns, 'rect');
      const bh = c ? Math.max(1, h * c / top) : 0;
      r.setAttribute('x', i * bw); r.setAttribute('y', h - bh); r.setAttribute('width', bw - 1);
      r.setAttribute('height', bh); r.setAttribute('fill', '#ef6c00');
      const t = document.createElementNS(ns, 'title');
      t.textContent = '[' + fmt(edges[i]) + ', ' + (i + 1 < edges.length - 1 ? fmt(edges[i + 1]) : '\u221e') + '): ' + c;
      r.appendChild(t); svg.appendChild(r);
    });
    for (const i of [1, Math.floor(n / 2), n - 1]) {
      const t = document.createElementNS(ns, 'text');
      t.setAttribute('x', i * bw); t.setAttribute('y', h + 14); t.setAttribute('font-size', '10');
      t.textContent = fmt(edges[i], 2); svg.appendChild(t);
    }
    return svg;
  }
  function contextLine(ctx, maxAct) {
    const [kind, value, centre, toks, acts] = ctx;
    const spans = toks.map((t, i) => {
      const a = acts[i];
      const alpha = maxAct > 0 ? Math.max(0, Math.min(1, a / maxAct)) : 0;
      return el('span', { class: 'tok' + (i === centre ? ' centre' : ''), title: tokenText(t) + ': ' + fmt(a),
        'data-act': a, style: 'background: rgba(239, 108, 0, ' + alpha.toFixed(3) + ')', text: tokenText(t) });
    });
    return el('div', { class: 'context' }, [el('span', { class: 'val', text: fmt(value, 2) })].concat(spans));
  }
  function logitTable(rows, cls) {
    return el('table', { class: 'logits' }, rows.map(([id, v]) => el('tr', {}, [
      el('td', { class: cls, text: JSON.stringify(tokenText(id)) }), el('td', { text: fmt(v) })])));
  }
  async function showFeature(view, id) {
    const m = meta();
    id = parseInt(id, 10);
    if (!(id >= 0 && id < m.n_latents)) {
      view.replaceChildren(el('p', { text: 'No feature ' + id + ': this SAE has features 0 to ' + (m.n_latents - 1) + '.' }));
      return;
    }
    const shard = await load('feat_' + Math.floor(id / m.feature_shard));
    const f = shard[id % m.feature_shard];
    const groups = {};
    for (const c of f.ctx) { (groups[c[0]] = groups[c[0]] || []).push(c); }
    const sections = [];
    for (const kind of Object.keys(groups).map(Number).sort((a, b) => a - b)) {
      const title = kind === 0 ? 'Top activations' : 'Quantile ' + kind + ' of ' + m.quantiles + ' (a uniform sample of the firing rows, ' + (kind === 1 ? 'lowest' : kind === m.quantiles ? 'highest' : 'middle') + ' activations)';
      sections.push(el('h3', { text: title }));
      for (const c of groups[kind]) { sections.push(contextLine(c, f.x)); }
    }
    view.replaceChildren(
      el('h2', { text: 'Feature #' + id }),
      el('p', { class: 'stat', text: 'frequency ' + fmt(f.f, 6) + ' (' + f.c + ' of ' + m.n_tokens + ' tokens), mean activation ' + fmt(f.m) + ', max ' + fmt(f.x) + ' \u2014 ' + f.d }),
      el('div', { class: 'cards' }, [
        el('div', { class: 'card' }, [el('h3', { text: 'Activation histogram (log2 bins)' }), histogram(f.h, m.hist_edges)]),
        el('div', { class: 'card' }, [el('h3', { text: 'Promoted tokens' }), logitTable(f.p, 'pos')]),
        el('div', { class: 'card' }, [el('h3', { text: 'Suppressed tokens' }), logitTable(f.s, 'neg')])]),
      el('div', { class: 'contexts' }, sections),
      el('p', {}, [el('a', { href: '#f=' + Math.max(0, id - 1), text: '\u2190 #' + Math.max(0, id - 1) }), document.createTextNode('  '),
        el('a', { href: '#f=' + Math.min(m.n_latents - 1, id + 1), text: '#' + Math.min(m.n_latents - 1, id + 1) + ' \u2192' })]));
  }

  async function route() {
    const view = document.getElementById('view');
    const params = parseHash();
    try {
      if (params.f !== undefined) { await showFeature(view, params.f); }
      else if (params.q) { document.getElementById('search').value = params.q; await showSearch(view, params.q); }
      else { await showIndex(view, params); }
    } catch (e) {
      view.replaceChildren(el('p', { text: 'Could not show this view: ' + e.message }));
    }
    document.body.setAttribute('data-ready', location.hash || 'index');
  }
  DL.start = function () {
    const m = meta();
    document.getElementById('title').textContent = m.n_latents + ' features of a ' + m.architecture + ' SAE on ' + m.site + ' (' + m.model + ')';
    const links = document.getElementById('explains');
    for (const e of DL.explains || []) { links.appendChild(el('a', { href: e.href, text: e.title })); links.appendChild(document.createTextNode(' ')); }
    document.getElementById('searchform').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const q = document.getElementById('search').value;
      if (q.trim()) { go({ q: q.trim() }); }
    });
    window.addEventListener('hashchange', route);
    route();
  };
})();

// The timeline: the event log newest first, filtered, live, and one
// event in full beside it.

import { PAGE, api, query, follow, eventTypes } from './api.js';
import { h, $, announce, clock, full, when, eventClass, names, taskLink, nodeLink, projectLink, notice } from './dom.js';
import { liveBadge, setLive } from './dashboard.js';

// ------------------------------------------------------------ timeline

export const FILTER_KEYS = ['task', 'node', 'project', 'aggregate_type', 'event_type', 'since', 'until'];

export async function timelinePage(view, params, signal) {
  const filter = {};
  for (const key of FILTER_KEYS) if (params.get(key)) filter[key] = params.get(key);
  const head = h('div', { class: 'page-head' },
    h('div', { class: 'grow' }, h('h1', {}, 'Timeline'),
      h('p', { class: 'sub' }, 'Every event of the log, newest first. Select one to see what it changed.')));
  const offered = await eventTypes({ signal }).catch(() => []);
  if (signal.aborted) return;
  const form = filterForm(filter, offered);
  view.replaceChildren(head, form, h('div', { id: 'timeline' }));
  await timeline($('#timeline'), filter, signal, { head });
}

export function toLocalInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function filterForm(filter, offered) {
  const field = (id, label, control) => h('div', { class: 'field' }, h('label', { for: id }, label), control);
  const nodeSelect = h('select', { id: 'f-node', name: 'node' }, h('option', { value: '' }, 'any node'),
    [...names.nodes.values()].map((n) => h('option', { value: n.id, selected: n.id === filter.node }, n.name)));
  const projectSelect = h('select', { id: 'f-project', name: 'project' }, h('option', { value: '' }, 'any project'),
    [...names.projects.values()].map((p) => h('option', { value: p.id, selected: p.id === filter.project }, p.name)));
  const kindSelect = h('select', { id: 'f-kind', name: 'aggregate_type' },
    ['', 'task', 'node', 'project', 'user'].map((k) => h('option', { value: k, selected: k === (filter.aggregate_type || '') }, k || 'any kind')));
  // The server lists the types this user can receive: admin-only ones
  // are offered to admins only.
  const types = h('datalist', { id: 'event-types' }, offered.map((t) => h('option', { value: t })));
  const form = h('form', { class: 'filters panel', role: 'search', 'aria-label': 'Filter the timeline' },
    field('f-task', 'Task id', h('input', { id: 'f-task', name: 'task', class: 'wide mono', value: filter.task || '', placeholder: 'a task id', spellcheck: 'false' })),
    field('f-node', 'Node', nodeSelect),
    field('f-project', 'Project', projectSelect),
    field('f-kind', 'Kind', kindSelect),
    field('f-type', 'Event type', h('input', { id: 'f-type', name: 'event_type', list: 'event-types', value: filter.event_type || '', placeholder: 'any type' })),
    types,
    field('f-since', 'Since', h('input', { id: 'f-since', name: 'since', type: 'datetime-local', value: toLocalInput(filter.since) })),
    field('f-until', 'Until', h('input', { id: 'f-until', name: 'until', type: 'datetime-local', value: toLocalInput(filter.until) })),
    h('div', { class: 'actions' },
      h('button', { type: 'submit', class: 'primary' }, 'Apply'),
      h('button', { type: 'button', onclick: () => { location.hash = '#/timeline'; } }, 'Clear')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const next = {};
    for (const key of FILTER_KEYS) {
      let v = String(data.get(key) || '').trim();
      if (v && (key === 'since' || key === 'until')) v = new Date(v).toISOString();
      if (v) next[key] = v;
    }
    location.hash = `#/timeline${query(next)}`;
  });
  return form;
}

/**
 * The timeline of `filter` in `root`: a page newest first, older pages on
 * demand, new events live, and the selected event in full beside it.
 */
export async function timeline(root, filter, signal, { head, onEvent, compact } = {}) {
  const list = h('ol', { class: 'events', 'aria-label': 'Events, newest first' });
  const older = h('button', { type: 'button', class: 'more', hidden: true }, 'Older events');
  const detail = h('aside', { class: 'panel detail', hidden: true, 'aria-label': 'Event details' });
  const live = liveBadge();
  detail.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { const close = $('.close', detail); if (close) close.click(); }
  });
  const listPanel = h('section', { class: 'panel' },
    h('h2', {}, compact ? 'Timeline' : 'Events', live), list, older);
  const layout = h('div', { class: 'timeline-layout closed' }, listPanel, detail);
  root.replaceChildren(layout);
  if (head && !compact) head.append(live);
  const seen = new Set();
  let selected = null;

  const row = (entry) => {
    const item = h('li', { 'data-position': entry.position, 'data-type': entry.event_type, 'data-aggregate-id': entry.aggregate_id });
    const button = h('button', { type: 'button', class: 'ev', 'aria-pressed': 'false', 'aria-controls': 'event-detail' },
      h('span', { class: 'summary' }, entry.summary));
    button.addEventListener('click', () => select(entry.position, item, button));
    item.append(
      h('div', { class: 'when' }, when(entry.recorded_at), h('span', { class: 'abs' }, clock(entry.recorded_at))),
      h('div', {}, button,
        h('div', { class: 'meta' },
          h('span', { class: `etype ${eventClass(entry)}` }, entry.event_type),
          actorOf(entry.actor),
          subjectOf(entry),
          entry.project_id && entry.aggregate_type === 'task' ? projectLink(entry.project_id) : null)));
    return item;
  };

  const select = async (position, item, button) => {
    if (selected) {
      selected.item.classList.remove('selected');
      selected.button.setAttribute('aria-pressed', 'false');
    }
    selected = { position, item, button };
    item.classList.add('selected');
    button.setAttribute('aria-pressed', 'true');
    layout.classList.remove('closed');
    detail.hidden = false;
    detail.id = 'event-detail';
    detail.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    try {
      const d = await api(`/events/${position}`, { signal });
      if (selected.position !== position) return;
      renderDetail(detail, d, () => {
        detail.hidden = true;
        layout.classList.add('closed');
        item.classList.remove('selected');
        button.setAttribute('aria-pressed', 'false');
        button.focus();
        selected = null;
      });
    } catch (e) {
      if (!signal.aborted) detail.replaceChildren(notice(e.message, true));
    }
  };

  const add = (entries, where) => {
    const rows = [];
    for (const entry of entries) {
      if (seen.has(entry.position)) continue;
      seen.add(entry.position);
      rows.push(row(entry));
    }
    if (where === 'top') {
      for (const r of rows) { r.classList.add('fresh'); list.prepend(r); }
    } else list.append(...rows);
    empty.hidden = seen.size > 0;
    return rows.length;
  };

  const empty = h('p', { class: 'empty' }, 'No events here yet. New ones appear as they happen.');
  listPanel.insertBefore(empty, older);
  const base = { ...filter };
  const page = await api(`/timeline${query({ ...base, limit: PAGE })}`, { signal });
  add(page.items, 'bottom');
  performance.mark('timeline-rendered');
  let before = page.next_before;
  older.hidden = !before;
  older.addEventListener('click', async () => {
    older.disabled = true;
    try {
      const next = await api(`/timeline${query({ ...base, limit: PAGE, before })}`, { signal });
      add(next.items, 'bottom');
      before = next.next_before;
      older.hidden = !before;
    } finally { older.disabled = false; }
  });

  follow(`/timeline/stream${query({ ...base, after: page.live_after })}`, {
    signal,
    onState: (state) => setLive(live, state),
    onError: (e) => { setLive(live, 'off'); listPanel.append(notice(e.message, true)); },
    onEvent: (type, data) => {
      if (type !== 'timeline') return false;
      const entry = JSON.parse(data);
      if (add([entry], 'top')) {
        announce(entry.summary);
        if (onEvent) onEvent(entry);
      }
      return false;
    },
  });
}

/** Who caused an event; a node is named rather than numbered. */
export function actorOf(actor) {
  const node = /^node:(.+)$/.exec(actor);
  const text = node ? `node:${names.node(node[1])}` : actor;
  return h('span', { class: 'actor', title: actor }, text);
}

export function subjectOf(entry) {
  switch (entry.aggregate_type) {
    case 'task': return h('span', {}, 'task ', taskLink(entry.aggregate_id));
    case 'node': return h('span', {}, 'node ', nodeLink(entry.aggregate_id));
    case 'project': return h('span', {}, 'project ', projectLink(entry.aggregate_id));
    default: return h('span', {}, `${entry.aggregate_type} ${entry.aggregate_id}`);
  }
}

// -------------------------------------------------------------- detail

/** Every leaf of a JSON value by path: {"a": {"b": 1}} → a.b = 1. */
export function flatten(value, path, out) {
  if (Array.isArray(value)) {
    if (!value.length) out.set(path, '[]');
    value.forEach((v, i) => flatten(v, `${path}[${i}]`, out));
  } else if (value && typeof value === 'object') {
    const keys = Object.keys(value);
    if (!keys.length && path) out.set(path, '{}');
    for (const k of keys) flatten(value[k], path ? `${path}.${k}` : k, out);
  } else {
    out.set(path, JSON.stringify(value));
  }
  return out;
}

/** The leaves that differ between two states, in path order. */
export function changes(before, after) {
  const a = flatten(before || {}, '', new Map());
  const b = flatten(after || {}, '', new Map());
  // The aggregate's own fields first, then what is nested in lists and
  // objects.
  const nested = (p) => /[.[]/.test(p);
  const paths = [...new Set([...a.keys(), ...b.keys()])]
    .sort((x, y) => (nested(x) - nested(y)) || (x < y ? -1 : x > y ? 1 : 0));
  return paths.filter((p) => a.get(p) !== b.get(p)).map((p) => ({ path: p, before: a.get(p), after: b.get(p) }));
}

/** Pretty JSON with the lines of changed top-level fields marked. */
export function jsonBlock(value, changedTop) {
  const pre = h('pre', { class: 'json', tabindex: '0' });
  if (value === null || value === undefined) { pre.textContent = '—'; return pre; }
  let key = null;
  for (const line of JSON.stringify(value, null, 2).split('\n')) {
    const m = /^ {2}"([^"]+)":/.exec(line);
    if (m) key = m[1];
    else if (!line.startsWith('   ')) key = null;
    const mark = key !== null && changedTop.has(key);
    pre.append(mark ? h('span', { class: 'changed' }, line) : line, '\n');
  }
  return pre;
}

export function renderDetail(panel, d, close) {
  const e = d.event;
  const diff = changes(d.before, d.after);
  const top = new Set(diff.map((c) => c.path.split(/[.[]/)[0]));
  const cell = (v, cls) => h('td', { class: v === undefined ? 'none' : cls }, v === undefined ? 'absent' : v);
  panel.replaceChildren(
    h('button', { type: 'button', class: 'close', onclick: close, 'aria-label': 'Close the details' }, 'Close'),
    h('h2', {}, h('span', { class: `etype ${eventClass(e)}` }, e.event_type), h('span', { class: 'faint mono' }, `#${e.position}`)),
    h('p', { class: 'summary-line' }, e.summary || ''),
    h('dl', { class: 'facts' },
      h('dt', {}, 'When'), h('dd', {}, full(e.recorded_at), ' · ', when(e.recorded_at)),
      h('dt', {}, 'Actor'), h('dd', {}, actorOf(e.actor)),
      h('dt', {}, 'Subject'), h('dd', {}, subjectOf(e), ` · event ${e.sequence}`),
      h('dt', {}, 'Version'), h('dd', { class: 'mono' }, e.event_version)),
    h('h3', {}, d.before ? `What changed (${diff.length})` : 'Created with'),
    diff.length
      ? h('div', { class: 'table-wrap' }, h('table', { class: 'diff' },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Field'), d.before ? h('th', { scope: 'col' }, 'Before') : null, h('th', { scope: 'col' }, d.before ? 'After' : 'Value'))),
        h('tbody', {}, diff.map((c) => h('tr', { 'data-path': c.path },
          h('td', { class: 'path' }, c.path),
          d.before ? cell(c.before, 'before') : null,
          cell(c.after, 'after'))))))
      : h('p', { class: 'muted' }, 'Nothing in the state changed.'),
    h('h3', {}, 'State before and after'),
    h('div', { class: 'states' },
      h('div', {}, h('div', { class: 'faint' }, 'Before'), jsonBlock(d.before, top)),
      h('div', {}, h('div', { class: 'faint' }, 'After'), jsonBlock(d.after, top))),
    h('h3', {}, 'Payload'),
    jsonBlock(e.payload, new Set()),
    h('h3', {}, 'Metadata'),
    jsonBlock(d.metadata, new Set()));
  $('.close', panel).focus({ preventScroll: true });
}

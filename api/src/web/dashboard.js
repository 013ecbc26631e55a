// The dashboard: nodes, the queue and recent tasks, kept live.

import { PAGE, HOLDING, api, query, all, follow } from './api.js';
import { h, $, when, short, memory, badge, names, nodeLink, projectLink } from './dom.js';

// ----------------------------------------------------------- dashboard

export async function dashboard(view, params, signal) {
  const head = h('div', { class: 'page-head' },
    h('div', { class: 'grow' }, h('h1', {}, 'Dashboard'),
      h('p', { class: 'sub' }, 'Nodes and tasks, updated live.')),
    liveBadge());
  const cards = h('div', { class: 'cards' });
  const nodesPanel = h('section', { class: 'panel', 'aria-labelledby': 'nodes-title' });
  const tasksPanel = h('section', { class: 'panel', 'aria-labelledby': 'tasks-title' });
  view.replaceChildren(head, cards, nodesPanel, tasksPanel);
  const taskFilter = { state: params.get('state') || '', project: params.get('project') || '' };

  const refresh = async () => {
    await names.load(true);
    const [nodes, tasks, queued, ...holding] = await Promise.all([
      all('/nodes', { signal }),
      api(`/tasks${query({ limit: PAGE, state: taskFilter.state, project: taskFilter.project })}`, { signal }),
      api('/tasks?state=queued&limit=500', { signal }),
      ...HOLDING.map((s) => api(`/tasks?state=${s}&limit=500`, { signal })),
    ]);
    if (signal.aborted) return;
    const active = new Map();
    holding.forEach((page, i) => {
      for (const t of page.items) {
        if (!t.node_id) continue;
        const counts = active.get(t.node_id) || {};
        counts[HOLDING[i]] = (counts[HOLDING[i]] || 0) + 1;
        active.set(t.node_id, counts);
      }
    });
    const keep = focusKey();
    renderCards(cards, nodes.items, queued, holding);
    renderNodes(nodesPanel, nodes.items, active);
    renderTasks(tasksPanel, tasks, taskFilter, signal);
    restoreFocus(keep);
  };
  await refresh();
  liveRefresh('/timeline/stream', refresh, signal, head);
}

export function focusKey() {
  const el = document.activeElement;
  return el && el.dataset ? el.dataset.key : null;
}

export function restoreFocus(key) {
  if (!key) return;
  const el = document.querySelector(`[data-key="${CSS.escape(key)}"]`);
  if (el) el.focus();
}

/** Re-runs `refresh` shortly after events arrive on `stream`. */
export function liveRefresh(stream, refresh, signal, root) {
  let timer = null;
  const badgeEl = $('.live', root);
  follow(stream, {
    signal,
    onState: (state) => setLive(badgeEl, state),
    onEvent: (type) => {
      if (type !== 'timeline' || timer) return false;
      timer = setTimeout(() => {
        timer = null;
        if (!signal.aborted) refresh().catch(() => {});
      }, 700);
      return false;
    },
  });
}

export function liveBadge() {
  return h('span', { class: 'live', 'data-live': 'connecting', role: 'status' }, h('span', { class: 'dot' }), h('span', { class: 'live-text' }, 'Connecting…'));
}

export function setLive(el, state) {
  if (!el) return;
  el.dataset.live = state;
  $('.live-text', el).textContent = state === 'on' ? 'Live' : 'Reconnecting…';
}

export function renderCards(cards, nodes, queued, holding) {
  const count = (f) => nodes.filter(f).length;
  const running = holding[HOLDING.indexOf('running')].items.length;
  const starting = holding.slice(0, 3).reduce((n, p) => n + p.items.length, 0);
  const card = (n, what) => h('div', { class: 'card' }, h('div', { class: 'n' }, n), h('div', { class: 'what' }, what));
  cards.replaceChildren(
    card(`${count((n) => n.status === 'online')} / ${nodes.length}`, 'nodes online'),
    card(count((n) => n.status === 'offline'), 'nodes offline'),
    card(count((n) => n.drained), 'nodes draining'),
    card(running, 'tasks running'),
    card(starting, 'tasks starting'),
    card(queued.next_cursor ? `${queued.items.length}+` : queued.items.length, 'tasks queued'),
  );
}

export function renderNodes(panel, nodes, active) {
  const rows = nodes.map((n) => {
    const r = n.resources;
    const gpus = r && r.gpus.length ? `${r.gpus.length} × ${r.gpus[0].name}` : '—';
    const counts = active.get(n.id) || {};
    const work = HOLDING.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`).join(' · ');
    return h('tr', { 'data-node-id': n.id },
      h('td', {}, h('a', { href: `#/nodes/${n.id}`, 'data-key': `node-${n.id}` }, n.name)),
      h('td', {}, badge(n.status), n.drained ? [' ', badge('drained')] : ''),
      h('td', { class: 'num' }, r ? r.cpus : '—'),
      h('td', { class: 'num' }, r ? memory(r.memory_mb) : '—'),
      h('td', {}, gpus),
      h('td', {}, work || h('span', { class: 'faint' }, 'idle')),
      h('td', {}, h('div', { class: 'labels' }, Object.entries(n.labels).map(([k, v]) => h('span', { class: 'label' }, `${k}=${v}`)))),
      h('td', { class: 'mono' }, n.agent_version || '—'),
      h('td', {}, when(n.updated_at)));
  });
  panel.replaceChildren(
    h('h2', { id: 'nodes-title' }, 'Nodes', h('span', { class: 'count' }, nodes.length)),
    rows.length
      ? h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, ['Node', 'Status', 'CPUs', 'Memory', 'GPUs', 'Tasks', 'Labels', 'Agent', 'Changed'].map((t, i) => h('th', { class: i === 2 || i === 3 ? 'num' : null, scope: 'col' }, t)))),
        h('tbody', {}, rows)))
      : h('p', { class: 'empty' }, 'No nodes yet. An admin adds one with unidesk node add <name>.'));
}

export function taskRows(items) {
  return items.map((t) => h('tr', { 'data-task-id': t.id },
    h('td', {}, h('a', { href: `#/tasks/${t.id}`, class: 'mono', title: t.id, 'data-key': `task-${t.id}` }, short(t.id))),
    h('td', {}, badge(t.state)),
    h('td', {}, projectLink(t.project_id)),
    h('td', {}, nodeLink(t.node_id)),
    h('td', { class: 'mono' }, commandOf(t)),
    h('td', {}, when(t.submitted_at))));
}

export function tasksTable(items) {
  return h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, ['Task', 'State', 'Project', 'Node', 'Command', 'Age'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, taskRows(items))));
}

export function commandOf(t) {
  const c = t.spec.command.join(' ') || '(image default)';
  return c.length > 60 ? `${c.slice(0, 59)}…` : c;
}

export function renderTasks(panel, page, filter, signal) {
  const states = ['', 'queued', ...HOLDING, 'succeeded', 'failed', 'timed_out', 'cancelled'];
  const stateSelect = h('select', { id: 'task-state', 'data-key': 'task-state' },
    states.map((s) => h('option', { value: s, selected: s === filter.state }, s ? s.replace('_', ' ') : 'any state')));
  const projectSelect = h('select', { id: 'task-project', 'data-key': 'task-project' },
    h('option', { value: '' }, 'any project'),
    [...names.projects.values()].map((p) => h('option', { value: p.id, selected: p.id === filter.project }, p.name)));
  const apply = () => { location.hash = `#/${query({ state: stateSelect.value, project: projectSelect.value })}`; };
  stateSelect.addEventListener('change', apply);
  projectSelect.addEventListener('change', apply);
  const body = page.items.length ? tasksTable(page.items) : h('p', { class: 'empty' }, 'No tasks here.');
  const more = h('button', { type: 'button', class: 'more', hidden: !page.next_cursor }, 'More tasks');
  let cursor = page.next_cursor;
  more.addEventListener('click', async () => {
    const next = await api(`/tasks${query({ limit: PAGE, state: filter.state, project: filter.project, cursor })}`, { signal });
    $('tbody', body).append(...taskRows(next.items));
    cursor = next.next_cursor;
    more.hidden = !cursor;
  });
  panel.replaceChildren(
    h('h2', { id: 'tasks-title' }, 'Tasks'),
    h('div', { class: 'filters' },
      h('div', { class: 'field' }, h('label', { for: 'task-state' }, 'State'), stateSelect),
      h('div', { class: 'field' }, h('label', { for: 'task-project' }, 'Project'), projectSelect)),
    body, more);
}

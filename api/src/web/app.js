// UniDesk web view: a client of the REST API under /api/v1, in plain
// JavaScript. Pages are addressed by the URL fragment (#/tasks/<id>), so the
// server only serves this file, the page and its style.
//
// The user's token stays in the browser (session storage, or local storage
// when asked to remember it) and goes out only as an Authorization header.
// Server-Sent Events are read with fetch() for the same reason: EventSource
// cannot send headers, and a token in a URL ends up in logs.
'use strict';

(() => {
  const TOKEN_KEY = 'unidesk.token';
  const PAGE = 50;
  const TERMINAL = new Set(['succeeded', 'failed', 'timed_out', 'cancelled']);
  const HOLDING = ['assigned', 'accepted', 'preparing', 'running'];
  const EVENT_TYPES = [
    'TaskSubmitted', 'TaskAssigned', 'TaskAccepted', 'TaskPreparing', 'TaskStarted',
    'TaskSucceeded', 'TaskFailed', 'TaskTimedOut', 'TaskCancelRequested', 'TaskCancelled',
    'TaskLost', 'TaskRequeued', 'TaskArtifactRecorded',
    'NodeProvisioned', 'NodeConnected', 'NodeDisconnected', 'NodeMarkedOffline', 'NodeDrained',
    'NodeUndrained', 'NodeTokenRevoked', 'NodeLabelsSet', 'NodeDeclaredLabelsAccepted', 'NodeLimitsSet',
    'NodeHostSshRequested', 'NodeHostSshFinished',
    'ProjectCreated', 'ProjectRenamed', 'ProjectMemberAdded', 'ProjectMemberRemoved',
    'ProjectQuotaSet', 'ProjectArchived', 'UserCreated', 'UserTokenIssued', 'UserTokenRevoked',
  ];
  // Only admins ever receive these; nobody else is offered them as a filter.
  const ADMIN_ONLY_TYPES = new Set(['NodeHostSshRequested', 'NodeHostSshFinished']);

  // ------------------------------------------------------------------ DOM

  /** An element: h('a', {href: '#/', class: 'x', onclick: f}, 'text', child). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'text') el.textContent = value;
      else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else if (value === true) el.setAttribute(key, '');
      else el.setAttribute(key, String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const $ = (selector, root = document) => root.querySelector(selector);

  function announce(text) {
    const region = $('#announce');
    region.textContent = '';
    setTimeout(() => { region.textContent = text; }, 30);
  }

  // -------------------------------------------------------------- session

  const session = {
    token: null,
    user: null,
    admin: false,
    load() {
      this.token = sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
      return this.token;
    },
    save(token, remember) {
      this.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      if (remember) localStorage.setItem(TOKEN_KEY, token);
      else localStorage.removeItem(TOKEN_KEY);
    },
    clear() {
      this.token = null;
      this.user = null;
      this.admin = false;
      sessionStorage.removeItem(TOKEN_KEY);
      localStorage.removeItem(TOKEN_KEY);
    },
  };

  /** The user a token names: udu~<user>~<token id>~<secret>. */
  function userOf(token) {
    const parts = token.split('~');
    return parts.length === 4 && parts[0] === 'udu' && parts[1] ? parts[1] : null;
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function errorOf(status, body) {
    const problems = (body && Array.isArray(body.errors)) ? body.errors : [];
    const text = problems.map((p) => (p.field ? `${p.field}: ${p.detail}` : p.detail)).join('; ');
    return new ApiError(status, text || `the server answered ${status}`);
  }

  async function api(path, { method = 'GET', body, signal } = {}) {
    const headers = { Authorization: `Bearer ${session.token}`, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(`/api/v1${path}`, {
      method, headers, signal, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (response.status === 401) {
      signedOut('Your token is not valid any more; sign in again.');
    }
    if (!response.ok) throw errorOf(response.status, data);
    return data;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== null && value !== undefined && value !== '') q.set(key, value);
    }
    const s = q.toString();
    return s ? `?${s}` : '';
  }

  // Every item of a list, page after page (lists come 500 at most a page).
  async function all(path, { signal } = {}) {
    const items = [];
    let cursor = null;
    do {
      const page = await api(`${path}${query({ limit: 500, cursor })}`, { signal });
      items.push(...page.items);
      cursor = page.next_cursor || null;
    } while (cursor);
    return { items };
  }

  const sleep = (ms, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  /**
   * Follows a Server-Sent Events route with the bearer header, reconnecting
   * with Last-Event-ID after a break. onEvent(type, data, id) returns true to
   * end the stream; onState('on' | 'off') tells whether it is connected.
   */
  async function follow(path, { signal, onEvent, onState = () => {}, onError = () => {} }) {
    let lastId = null;
    let delay = 1000;
    while (!signal.aborted) {
      let ended = false;
      try {
        const headers = { Authorization: `Bearer ${session.token}`, Accept: 'text/event-stream' };
        if (lastId !== null) headers['Last-Event-ID'] = lastId;
        const response = await fetch(`/api/v1${path}`, { headers, signal, cache: 'no-store' });
        if (!response.ok) {
          let body = null;
          try { body = await response.json(); } catch (_) { body = null; }
          if (response.status === 401) signedOut('Your token is not valid any more; sign in again.');
          if (response.status < 500) { onError(errorOf(response.status, body)); onState('off'); return; }
          throw errorOf(response.status, body);
        }
        delay = 1000;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        let event = { type: 'message', data: [], id: null };
        while (!ended) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let newline;
          while (!ended && (newline = buffer.indexOf('\n')) >= 0) {
            let line = buffer.slice(0, newline);
            buffer = buffer.slice(newline + 1);
            if (line.endsWith('\r')) line = line.slice(0, -1);
            if (line === '') {
              if (event.data.length) {
                if (event.id !== null) lastId = event.id;
                if (event.type === 'ready') onState('on');
                ended = onEvent(event.type, event.data.join('\n'), event.id) === true;
              }
              event = { type: 'message', data: [], id: null };
            } else if (!line.startsWith(':')) {
              const colon = line.indexOf(':');
              const field = colon < 0 ? line : line.slice(0, colon);
              let v = colon < 0 ? '' : line.slice(colon + 1);
              if (v.startsWith(' ')) v = v.slice(1);
              if (field === 'event') event.type = v;
              else if (field === 'data') event.data.push(v);
              else if (field === 'id') event.id = v;
            }
          }
        }
        if (ended) { reader.cancel().catch(() => {}); return; }
      } catch (e) {
        if (signal.aborted) return;
      }
      onState('off');
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 30000);
    }
  }

  // ----------------------------------------------------------- formatting

  function ago(iso) {
    if (!iso) return '—';
    const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
    const future = seconds < 0;
    const s = Math.abs(seconds);
    let text;
    if (s < 10) return 'just now';
    if (s < 60) text = `${s} s`;
    else if (s < 3600) text = `${Math.floor(s / 60)} min`;
    else if (s < 86400) text = `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    else if (s < 86400 * 30) text = `${Math.floor(s / 86400)} d`;
    else return new Date(iso).toLocaleDateString();
    return future ? `in ${text}` : `${text} ago`;
  }

  function clock(iso) {
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, '0');
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function full(iso) {
    return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' }) : '';
  }

  /** A relative time that stays current. */
  function when(iso) {
    return h('time', { datetime: iso || '', title: full(iso), 'data-rel': iso || '' }, ago(iso));
  }

  setInterval(() => {
    for (const el of document.querySelectorAll('time[data-rel]')) {
      const iso = el.getAttribute('data-rel');
      if (iso) el.textContent = ago(iso);
    }
  }, 15000);

  // Ids are UUIDv7, whose first digits are a timestamp: the last ones tell
  // tasks apart.
  const short = (id) => String(id || '').slice(-8);

  function size(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    const units = ['KiB', 'MiB', 'GiB', 'TiB'];
    let v = bytes / 1024;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
  }

  const memory = (mb) => (mb >= 1024 ? `${(mb / 1024).toFixed(mb % 1024 ? 1 : 0)} GiB` : `${mb} MiB`);

  function badge(state, extra) {
    const text = String(state).replace('_', ' ');
    return h('span', { class: `badge ${state} ${extra || ''}` }, text);
  }

  function eventClass(entry) {
    const t = entry.event_type;
    if (/Succeeded$|Connected$|Undrained$/.test(t)) return 'ok';
    if (/Failed$|Revoked$/.test(t)) return 'bad';
    if (/Lost$|TimedOut$|MarkedOffline$|Disconnected$|Drained$|Cancelled$/.test(t)) return 'warn';
    return entry.aggregate_type;
  }

  // --------------------------------------------------------------- names

  /** Names of nodes and projects, for links that read well. */
  const names = {
    nodes: new Map(),
    projects: new Map(),
    loaded: 0,
    async load(force) {
      if (!force && Date.now() - this.loaded < 10000) return;
      const [nodes, projects] = await Promise.all([all('/nodes'), all('/projects')]);
      this.nodes = new Map(nodes.items.map((n) => [n.id, n]));
      this.projects = new Map(projects.items.map((p) => [p.id, p]));
      this.loaded = Date.now();
    },
    node(id) { const n = this.nodes.get(id); return n ? n.name : short(id); },
    project(id) { const p = this.projects.get(id); return p ? p.name : short(id); },
  };

  const taskLink = (id) => h('a', { href: `#/tasks/${id}`, class: 'mono', title: id }, short(id));
  const nodeLink = (id) => (id ? h('a', { href: `#/nodes/${id}` }, names.node(id)) : h('span', { class: 'faint' }, '—'));
  const projectLink = (id) => (id ? h('a', { href: `#/projects/${id}` }, names.project(id)) : h('span', { class: 'faint' }, '—'));

  // -------------------------------------------------------------- routing

  let current = null;

  function parseHash() {
    const raw = location.hash.replace(/^#/, '') || '/';
    const [path, search] = raw.split('?');
    return { parts: path.split('/').filter(Boolean), params: new URLSearchParams(search || '') };
  }

  async function route() {
    if (current) current.abort();
    current = new AbortController();
    const { signal } = current;
    if (!session.token) { showSignIn(); return; }
    const { parts, params } = parseHash();
    const view = $('#view');
    view.hidden = false;
    $('#sign-in').hidden = true;
    const section = parts[0] || 'dashboard';
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.dataset.nav === section) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const render = {
      dashboard: () => dashboard(view, params, signal),
      timeline: () => timelinePage(view, params, signal),
      tasks: () => taskPage(view, parts[1], signal),
      nodes: () => nodePage(view, parts[1], signal),
      projects: () => projectPage(view, parts[1], signal),
    }[section];
    try {
      await names.load(false).catch(() => {});
      if (signal.aborted) return;
      if (render) await render();
      else view.replaceChildren(notice('There is no such page.', true));
    } catch (e) {
      if (signal.aborted || e.name === 'AbortError') return;
      view.replaceChildren(notice(e.message || String(e), true));
    }
  }

  function notice(text, bad) {
    return h('div', { class: `notice${bad ? ' bad' : ''}`, role: bad ? 'alert' : null }, text);
  }

  function showSignIn(message) {
    $('#nav').hidden = true;
    $('#who').hidden = true;
    $('#view').hidden = true;
    $('#view').replaceChildren();
    $('#sign-in').hidden = false;
    const error = $('#sign-in-error');
    error.hidden = !message;
    error.textContent = message || '';
    $('#token').focus();
  }

  function signedOut(message) {
    if (current) current.abort();
    session.clear();
    showSignIn(message);
  }

  async function signIn(token, remember) {
    const user = userOf(token);
    if (!user) throw new Error('That is not a user token: it looks like udu~<user>~<id>~<secret>.');
    session.token = token;
    let me;
    try {
      me = await api(`/users/${encodeURIComponent(user)}`);
    } catch (e) {
      session.token = null;
      throw e.status === 401 ? new Error('That token is not valid, or it was revoked.') : e;
    }
    session.save(token, remember);
    session.user = me.name;
    session.admin = me.admin;
    $('#who-name').replaceChildren(
      h('span', {}, me.name), ' ', me.admin ? h('span', { class: 'role' }, 'admin') : '',
    );
    $('#nav').hidden = false;
    $('#who').hidden = false;
  }

  // ----------------------------------------------------------- dashboard

  async function dashboard(view, params, signal) {
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

  function focusKey() {
    const el = document.activeElement;
    return el && el.dataset ? el.dataset.key : null;
  }

  function restoreFocus(key) {
    if (!key) return;
    const el = document.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (el) el.focus();
  }

  /** Re-runs `refresh` shortly after events arrive on `stream`. */
  function liveRefresh(stream, refresh, signal, root) {
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

  function liveBadge() {
    return h('span', { class: 'live', 'data-live': 'connecting', role: 'status' }, h('span', { class: 'dot' }), h('span', { class: 'live-text' }, 'Connecting…'));
  }

  function setLive(el, state) {
    if (!el) return;
    el.dataset.live = state;
    $('.live-text', el).textContent = state === 'on' ? 'Live' : 'Reconnecting…';
  }

  function renderCards(cards, nodes, queued, holding) {
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

  function renderNodes(panel, nodes, active) {
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
        h('td', {}, when(n.updated_at)));
    });
    panel.replaceChildren(
      h('h2', { id: 'nodes-title' }, 'Nodes', h('span', { class: 'count' }, nodes.length)),
      rows.length
        ? h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, ['Node', 'Status', 'CPUs', 'Memory', 'GPUs', 'Tasks', 'Labels', 'Changed'].map((t, i) => h('th', { class: i === 2 || i === 3 ? 'num' : null, scope: 'col' }, t)))),
          h('tbody', {}, rows)))
        : h('p', { class: 'empty' }, 'No nodes yet. An admin adds one with unidesk node add <name>.'));
  }

  function taskRows(items) {
    return items.map((t) => h('tr', { 'data-task-id': t.id },
      h('td', {}, h('a', { href: `#/tasks/${t.id}`, class: 'mono', title: t.id, 'data-key': `task-${t.id}` }, short(t.id))),
      h('td', {}, badge(t.state)),
      h('td', {}, projectLink(t.project_id)),
      h('td', {}, nodeLink(t.node_id)),
      h('td', { class: 'mono' }, commandOf(t)),
      h('td', {}, when(t.submitted_at))));
  }

  function tasksTable(items) {
    return h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Task', 'State', 'Project', 'Node', 'Command', 'Age'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, taskRows(items))));
  }

  function commandOf(t) {
    const c = t.spec.command.join(' ') || '(image default)';
    return c.length > 60 ? `${c.slice(0, 59)}…` : c;
  }

  function renderTasks(panel, page, filter, signal) {
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

  // ------------------------------------------------------------ timeline

  const FILTER_KEYS = ['task', 'node', 'project', 'aggregate_type', 'event_type', 'since', 'until'];

  async function timelinePage(view, params, signal) {
    const filter = {};
    for (const key of FILTER_KEYS) if (params.get(key)) filter[key] = params.get(key);
    const head = h('div', { class: 'page-head' },
      h('div', { class: 'grow' }, h('h1', {}, 'Timeline'),
        h('p', { class: 'sub' }, 'Every event of the log, newest first. Select one to see what it changed.')));
    view.replaceChildren(head, filterForm(filter), h('div', { id: 'timeline' }));
    await timeline($('#timeline'), filter, signal, { head });
  }

  function toLocalInput(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    const pad = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function filterForm(filter) {
    const field = (id, label, control) => h('div', { class: 'field' }, h('label', { for: id }, label), control);
    const nodeSelect = h('select', { id: 'f-node', name: 'node' }, h('option', { value: '' }, 'any node'),
      [...names.nodes.values()].map((n) => h('option', { value: n.id, selected: n.id === filter.node }, n.name)));
    const projectSelect = h('select', { id: 'f-project', name: 'project' }, h('option', { value: '' }, 'any project'),
      [...names.projects.values()].map((p) => h('option', { value: p.id, selected: p.id === filter.project }, p.name)));
    const kindSelect = h('select', { id: 'f-kind', name: 'aggregate_type' },
      ['', 'task', 'node', 'project', 'user'].map((k) => h('option', { value: k, selected: k === (filter.aggregate_type || '') }, k || 'any kind')));
    const types = h('datalist', { id: 'event-types' }, EVENT_TYPES
      .filter((t) => session.admin || !ADMIN_ONLY_TYPES.has(t))
      .map((t) => h('option', { value: t })));
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
  async function timeline(root, filter, signal, { head, onEvent, compact } = {}) {
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
  function actorOf(actor) {
    const node = /^node:(.+)$/.exec(actor);
    const text = node ? `node:${names.node(node[1])}` : actor;
    return h('span', { class: 'actor', title: actor }, text);
  }

  function subjectOf(entry) {
    switch (entry.aggregate_type) {
      case 'task': return h('span', {}, 'task ', taskLink(entry.aggregate_id));
      case 'node': return h('span', {}, 'node ', nodeLink(entry.aggregate_id));
      case 'project': return h('span', {}, 'project ', projectLink(entry.aggregate_id));
      default: return h('span', {}, `${entry.aggregate_type} ${entry.aggregate_id}`);
    }
  }

  // -------------------------------------------------------------- detail

  /** Every leaf of a JSON value by path: {"a": {"b": 1}} → a.b = 1. */
  function flatten(value, path, out) {
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
  function changes(before, after) {
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
  function jsonBlock(value, changedTop) {
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

  function renderDetail(panel, d, close) {
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

  // ----------------------------------------------------------------- task

  async function taskPage(view, id, signal) {
    let task;
    try {
      task = await api(`/tasks/${encodeURIComponent(id || '')}`, { signal });
    } catch (e) {
      if (e.status === 404 || e.status === 400) {
        view.replaceChildren(notice('Task not found, or not in a project of yours.', true));
        return;
      }
      throw e;
    }
    const head = h('div', { class: 'page-head' });
    const facts = h('section', { class: 'panel', 'aria-label': 'Task' });
    const attempts = h('section', { class: 'panel', 'aria-labelledby': 'attempts-title' });
    const artifacts = h('section', { class: 'panel', 'aria-labelledby': 'artifacts-title' });
    const logPanel = h('section', { class: 'panel', 'aria-labelledby': 'log-title' });
    const timelineRoot = h('div');
    view.replaceChildren(head, h('div', { class: 'cols' }, facts, h('div', {}, attempts, artifacts)), logPanel, timelineRoot);

    const log = taskLog(logPanel, id, signal);
    const show = (t) => {
      task = t;
      renderTaskHead(head, t, signal, () => refresh());
      renderTaskFacts(facts, t);
      renderAttempts(attempts, t);
      renderArtifacts(artifacts, t);
      log.update(t);
    };
    let pending = null;
    const refresh = () => {
      if (pending) return;
      pending = setTimeout(async () => {
        pending = null;
        try { show(await api(`/tasks/${id}`, { signal })); } catch (_) { /* shown on the next event */ }
      }, 250);
    };
    show(task);
    await timeline(timelineRoot, { task: id }, signal, { compact: true, onEvent: refresh });
  }

  function renderTaskHead(head, t, signal, refresh) {
    const cancel = h('button', { type: 'button', class: 'danger' }, t.cancel_requested ? 'Cancel requested' : 'Cancel task');
    cancel.disabled = t.cancel_requested || TERMINAL.has(t.state);
    const error = h('span', { class: 'error', role: 'alert' });
    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      try {
        await api(`/tasks/${t.id}/cancel`, { method: 'POST', signal });
        refresh();
      } catch (e) {
        error.textContent = e.message;
        cancel.disabled = false;
      }
    });
    head.replaceChildren(
      h('div', { class: 'grow' },
        h('h1', {}, 'Task ', h('span', { class: 'mono' }, short(t.id)), ' ', badge(t.state, 'big')),
        h('p', { class: 'sub' }, 'in ', projectLink(t.project_id), t.node_id ? [' on ', nodeLink(t.node_id)] : '',
          ' · submitted ', when(t.submitted_at), ' by ', h('span', { class: 'mono' }, t.submitted_by || '—'))),
      h('div', {}, cancel, ' ', error));
  }

  function renderTaskFacts(panel, t) {
    const s = t.spec;
    const fact = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    panel.replaceChildren(h('h2', {}, 'Specification'), h('dl', { class: 'facts' },
      fact('Id', h('span', { class: 'mono' }, t.id)),
      fact('Command', h('code', {}, s.command.join(' ') || '(the image\'s default command)')),
      fact('Code', h('span', { class: 'mono' }, `${s.code_repo_url} @ ${s.code_commit_id.slice(0, 12)}`)),
      fact('Environment', h('span', { class: 'mono' }, `${s.env_repo_url} @ ${s.env_commit_id.slice(0, 12)} : ${s.dockerfile_path}`)),
      fact('Resources', `${s.resources.cpus} CPU · ${memory(s.resources.memory_mb)} · ${s.resources.gpus} GPU`),
      fact('Labels', Object.keys(s.labels).length ? h('div', { class: 'labels' }, Object.entries(s.labels).map(([k, v]) => h('span', { class: 'label' }, `${k}=${v}`))) : '—'),
      fact('Priority', s.priority),
      fact('Time limit', s.timeout_s ? `${s.timeout_s} s` : 'none'),
      fact('Retries', `up to ${s.max_retries}`),
      t.stage ? fact('Stage', `${t.stage}${t.stage_detail ? `: ${t.stage_detail}` : ''}`) : null,
      t.exit_code !== null && t.exit_code !== undefined ? fact('Exit code', t.exit_code) : null,
      t.reason ? fact('Reason', t.reason) : null,
      t.finished_at ? fact('Finished', when(t.finished_at)) : null));
  }

  function renderAttempts(panel, t) {
    panel.replaceChildren(
      h('h2', { id: 'attempts-title' }, 'Attempts', h('span', { class: 'count' }, t.attempts.length)),
      t.attempts.length
        ? h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, ['#', 'Node', 'Assigned', 'Started', 'Ended', 'Outcome'].map((c) => h('th', { scope: 'col' }, c)))),
          h('tbody', {}, t.attempts.map((a) => h('tr', {},
            h('td', {}, a.number),
            h('td', {}, nodeLink(a.node_id), a.gpus.length ? h('span', { class: 'faint' }, ` GPU ${a.gpus.join(', ')}`) : ''),
            h('td', {}, when(a.assigned_at)),
            h('td', {}, a.started_at ? when(a.started_at) : '—'),
            h('td', {}, a.ended_at ? when(a.ended_at) : '—'),
            h('td', {}, a.outcome ? badge(a.outcome) : (TERMINAL.has(t.state) ? '—' : badge(t.state))))))))
        : h('p', { class: 'empty' }, 'Not placed on a node yet.'));
  }

  function renderArtifacts(panel, t) {
    panel.replaceChildren(
      h('h2', { id: 'artifacts-title' }, 'Artifacts', h('span', { class: 'count' }, t.artifacts.length)),
      t.artifacts.length
        ? h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, ['Name', 'Size', 'SHA-256', 'Attempt'].map((c) => h('th', { scope: 'col' }, c)))),
          h('tbody', {}, t.artifacts.map((a) => h('tr', {},
            h('td', { class: 'mono' }, a.name),
            h('td', { class: 'num' }, size(a.size)),
            h('td', { class: 'mono', title: a.sha256 }, a.sha256.slice(0, 16)),
            h('td', {}, a.attempt))))))
        : h('p', { class: 'empty' }, 'No artifacts stored.'));
  }

  /** The task's output, followed live while its attempt runs. */
  function taskLog(panel, id, signal) {
    const pre = h('pre', { class: 'log', tabindex: '0', 'aria-label': 'Output', 'aria-live': 'off' });
    const status = h('span', { class: 'faint' });
    const picker = h('select', { id: 'log-attempt', hidden: true, 'aria-label': 'Attempt' });
    panel.replaceChildren(h('h2', { id: 'log-title' }, 'Output', status, picker), pre);
    let stream = null;
    let following = null;
    let ended = null;

    const note = (text) => pre.append(h('span', { class: 'note' }, text), '\n');
    const start = (attempt) => {
      if (stream) stream.abort();
      stream = new AbortController();
      signal.addEventListener('abort', () => stream.abort(), { once: true });
      following = attempt;
      ended = null;
      pre.replaceChildren();
      status.textContent = attempt ? ` attempt ${attempt}` : '';
      follow(`/tasks/${id}/logs${query({ follow: 'true', attempt })}`, {
        signal: stream.signal,
        onError: (e) => note(e.message),
        onEvent: (type, data) => {
          const d = JSON.parse(data);
          if (type === 'log') {
            const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
            pre.append(d.data);
            if (atBottom) pre.scrollTop = pre.scrollHeight;
            return false;
          }
          if (type === 'end') {
            ended = d.attempt;
            note(d.attempt ? `— attempt ${d.attempt} ended: ${d.state.replace('_', ' ')} —` : `— the task ended without running: ${d.state.replace('_', ' ')} —`);
            return true;
          }
          return false;
        },
      });
    };

    picker.addEventListener('change', () => start(Number(picker.value)));
    return {
      update(t) {
        const numbers = t.attempts.map((a) => a.number);
        picker.hidden = numbers.length < 2;
        picker.replaceChildren(...numbers.map((n) => h('option', { value: n, selected: n === (following || t.attempt) }, `attempt ${n}`)));
        if (!stream) {
          if (!t.attempt && !TERMINAL.has(t.state)) note('Waiting for the task to start…');
          start(t.attempt || null);
        } else if (ended && t.attempt > ended && following === ended) {
          start(t.attempt);
        }
      },
    };
  }

  // ----------------------------------------------------------------- node

  async function nodePage(view, id, signal) {
    let node;
    try {
      node = await api(`/nodes/${encodeURIComponent(id || '')}`, { signal });
    } catch (e) {
      if (e.status === 404 || e.status === 400) { view.replaceChildren(notice('There is no such node.', true)); return; }
      throw e;
    }
    const head = h('div', { class: 'page-head' });
    const facts = h('section', { class: 'panel' });
    const tasks = h('section', { class: 'panel', 'aria-labelledby': 'node-tasks' });
    const timelineRoot = h('div');
    view.replaceChildren(head, h('div', { class: 'cols' }, facts, tasks), timelineRoot);
    const show = async (n) => {
      const page = await api(`/tasks?node=${n.id}&limit=20`, { signal });
      head.replaceChildren(h('div', { class: 'grow' },
        h('h1', {}, `Node ${n.name} `, badge(n.status, 'big'), n.drained ? [' ', badge('drained', 'big')] : ''),
        h('p', { class: 'sub' }, 'agent ', n.agent_version || '—', ' · connected ', when(n.connected_at))));
      // `resources` is what placement counts (at most the admin's maximum);
      // what the agent claims beyond it is shown beside, never used.
      const r = n.resources;
      const d = n.declared_resources;
      const max = n.max_resources || {};
      const fact = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
      const claimed = (counted, declared, show) => (declared !== counted
        ? [show(counted), ' ', h('span', { class: 'faint' }, `(declares ${show(declared)})`)]
        : show(counted));
      const labelList = (labels) => h('div', { class: 'labels' }, Object.entries(labels).map(([k, v]) => h('span', { class: 'label' }, `${k}=${v}`)));
      const unaccepted = Object.fromEntries(Object.entries(n.declared_labels || {}).filter(([k, v]) => n.labels[k] !== v));
      const limits = [
        max.cpus != null ? `${max.cpus} CPU` : null,
        max.memory_mb != null ? memory(max.memory_mb) : null,
        max.gpus != null ? `${max.gpus} GPU` : null,
      ].filter(Boolean);
      facts.replaceChildren(h('h2', {}, 'Node'), h('dl', { class: 'facts' },
        fact('Id', h('span', { class: 'mono' }, n.id)),
        fact('CPUs', r ? claimed(r.cpus, d.cpus, (c) => c) : '—'),
        fact('Memory', r ? claimed(r.memory_mb, d.memory_mb, memory) : '—'),
        fact('GPUs', [
          r && r.gpus.length ? r.gpus.map((g) => `#${g.index} ${g.name} (${memory(g.memory_mb)})`).join(', ') : 'none',
          d && d.gpus.length > (r ? r.gpus.length : 0) ? [' ', h('span', { class: 'faint' }, `(declares ${d.gpus.length})`)] : null,
        ]),
        fact('Maximum', limits.length ? `at most ${limits.join(', ')}` : 'none'),
        fact('Labels', labelList(n.labels)),
        Object.keys(unaccepted).length
          ? fact('Declared labels', [labelList(unaccepted), ' ', h('span', { class: 'faint' }, 'not matched until an admin accepts them')])
          : [],
        fact('Provisioned', when(n.provisioned_at)),
        fact('Changed', when(n.updated_at))));
      tasks.replaceChildren(h('h2', { id: 'node-tasks' }, 'Recent tasks here'),
        page.items.length ? tasksTable(page.items) : h('p', { class: 'empty' }, 'No task has run here.'));
    };
    await show(node);
    let pending = null;
    await timeline(timelineRoot, { node: node.id }, signal, {
      compact: true,
      onEvent: () => {
        if (pending) return;
        pending = setTimeout(async () => {
          pending = null;
          try { await show(await api(`/nodes/${node.id}`, { signal })); } catch (_) { /* next event */ }
        }, 400);
      },
    });
  }

  // -------------------------------------------------------------- project

  async function projectPage(view, id, signal) {
    let project;
    try {
      project = await api(`/projects/${encodeURIComponent(id || '')}`, { signal });
    } catch (e) {
      if (e.status === 404 || e.status === 400) { view.replaceChildren(notice('Project not found, or not yours to see.', true)); return; }
      throw e;
    }
    const page = await api(`/tasks?project=${project.id}&limit=20`, { signal });
    const fact = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    const timelineRoot = h('div');
    view.replaceChildren(
      h('div', { class: 'page-head' }, h('div', { class: 'grow' },
        h('h1', {}, `Project ${project.name} `, project.archived ? badge('archived', 'big') : ''),
        h('p', { class: 'sub' }, project.description || ''))),
      h('div', { class: 'cols' },
        h('section', { class: 'panel' }, h('h2', {}, 'Project'), h('dl', { class: 'facts' },
          fact('Id', h('span', { class: 'mono' }, project.id)),
          fact('Owner', project.owner),
          fact('Running limit', project.max_running === null || project.max_running === undefined ? 'none' : project.max_running),
          fact('Created', when(project.created_at)),
          fact('Members', h('div', { class: 'labels' }, project.members.map((m) => h('span', { class: 'label' }, `${m.user} (${m.role})`)))))),
        h('section', { class: 'panel' }, h('h2', {}, 'Recent tasks'),
          page.items.length ? tasksTable(page.items) : h('p', { class: 'empty' }, 'No tasks yet.'))),
      timelineRoot);
    await timeline(timelineRoot, { project: project.id }, signal, { compact: true });
  }

  // ---------------------------------------------------------------- start

  function start() {
    $('#sign-in-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const token = $('#token').value.trim();
      const error = $('#sign-in-error');
      error.hidden = true;
      try {
        await signIn(token, $('#remember').checked);
        $('#token').value = '';
        await route();
        $('#main').focus({ preventScroll: true });
      } catch (err) {
        error.textContent = err.message;
        error.hidden = false;
      }
    });
    $('#sign-out').addEventListener('click', () => {
      signedOut();
      location.hash = '#/';
    });
    window.addEventListener('hashchange', () => { route(); });
    // A page kept for the back button must not keep its streams open: the
    // browser allows only a few connections to one server.
    window.addEventListener('pagehide', () => { if (current) current.abort(); });
    window.addEventListener('pageshow', (e) => { if (e.persisted) route(); });
    // A tab left in the background lets its streams go after a minute, and
    // picks up again when shown.
    let idle = null;
    let suspended = false;
    document.addEventListener('visibilitychange', () => {
      if (document.hidden) {
        idle = setTimeout(() => { if (current) current.abort(); suspended = true; }, 60000);
      } else {
        clearTimeout(idle);
        if (suspended) { suspended = false; route(); }
      }
    });
    const token = session.load();
    if (!token) { showSignIn(); return; }
    signIn(token, Boolean(localStorage.getItem(TOKEN_KEY)))
      .then(route)
      .catch((e) => signedOut(e.message));
  }

  start();
})();

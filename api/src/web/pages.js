// The pages of one task, one node and one project.

import { TERMINAL, api, query, follow } from './api.js';
import { h, $, when, short, size, memory, badge, nodeLink, projectLink, notice } from './dom.js';
import { tasksTable } from './dashboard.js';
import { timeline } from './timeline.js';

// ----------------------------------------------------------------- task

export async function taskPage(view, id, signal) {
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
  const waiting = h('section', { class: 'panel queue', 'aria-labelledby': 'queue-title', hidden: true });
  const facts = h('section', { class: 'panel', 'aria-label': 'Task' });
  const attempts = h('section', { class: 'panel', 'aria-labelledby': 'attempts-title' });
  const artifacts = h('section', { class: 'panel', 'aria-labelledby': 'artifacts-title' });
  const logPanel = h('section', { class: 'panel', 'aria-labelledby': 'log-title' });
  const timelineRoot = h('div');
  view.replaceChildren(head, waiting, h('div', { class: 'cols' }, facts, h('div', {}, attempts, artifacts)), logPanel, timelineRoot);

  const log = taskLog(logPanel, id, signal);
  let recheck = null;
  signal.addEventListener('abort', () => clearTimeout(recheck));
  const show = (t) => {
    task = t;
    renderTaskHead(head, t, signal, () => refresh());
    renderQueue(waiting, t);
    // Why a queued task waits changes with the cluster, without an event
    // of the task: look again now and then while it waits.
    clearTimeout(recheck);
    if (t.state === 'queued') recheck = setTimeout(() => { if (!signal.aborted) refresh(); }, QUEUE_RECHECK_MS);
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

export function renderTaskHead(head, t, signal, refresh) {
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

/** How often the page of a queued task asks again why it waits. */
const QUEUE_RECHECK_MS = 3000;

/** Why a queued task waits, as the scheduler explains it; hidden otherwise. */
export function renderQueue(panel, t) {
  const q = t.queue;
  panel.hidden = !q;
  if (!q) {
    panel.replaceChildren();
    return;
  }
  panel.replaceChildren(
    h('h2', { id: 'queue-title' }, 'Why it waits'),
    h('p', { class: 'queue-summary' }, q.summary),
    h('p', { class: 'faint queue-position' }, `Position ${q.position} in the queue`,
      q.since ? [' · explained so since ', when(q.since)] : ''),
    q.reasons.length
      ? h('ul', { class: 'queue-reasons' }, q.reasons.map((r) => h('li', { 'data-kind': r.kind }, reasonText(r))))
      : null);
}

/** One reason of `queue.reasons` in words. */
export function reasonText(r) {
  const nodes = (n) => `${n} node${n === 1 ? '' : 's'}`;
  const labelled = (r2) => (r2.with_labels ? `, ${r2.with_labels} of them with the task's labels` : '');
  switch (r.kind) {
    case 'no_nodes': return 'No node has joined.';
    case 'offline': return `${nodes(r.nodes_filtered)} offline or not connected${labelled(r)}.`;
    case 'drained': return `${nodes(r.nodes_filtered)} drained${labelled(r)}.`;
    case 'label': return `${nodes(r.nodes_filtered)} without label ${r.label}.`;
    case 'cpu': return `${nodes(r.nodes_filtered)} short of CPU: need ${r.need}, most free ${r.most_free}, largest ${r.largest}.`;
    case 'memory': return `${nodes(r.nodes_filtered)} short of memory: need ${memory(r.need_mb)}, most free ${memory(r.most_free_mb)}, largest ${memory(r.largest_mb)}.`;
    case 'gpus': return `${nodes(r.nodes_filtered)} short of GPUs: need ${r.need}, most free ${r.most_free}, largest ${r.largest}.`;
    case 'taken': return 'It fitted, but tasks placed before it took the room.';
    case 'quota': return `The project runs ${r.running} of its max_running ${r.max_running}.`;
    case 'backoff': return [`Retry backoff until `, when(r.until), '.'];
    case 'in_line': return 'It fits a node and waits for its turn.';
    default: return r.kind;
  }
}

export function renderTaskFacts(panel, t) {
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

// The first line of a text, with `…` when more follow (a failed build's
// reason holds its last lines; the task's own reason shows them whole).
function firstLine(text) {
  const lines = text.trim().split('\n');
  return lines.length > 1 ? `${lines[0].trimEnd()} …` : lines[0];
}

export function renderAttempts(panel, t) {
  panel.replaceChildren(
    h('h2', { id: 'attempts-title' }, 'Attempts', h('span', { class: 'count' }, t.attempts.length)),
    t.attempts.length
      ? h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, ['#', 'Node', 'Assigned', 'Started', 'Ended', 'Outcome', 'Why'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, t.attempts.map((a) => h('tr', {},
          h('td', {}, a.number),
          h('td', {}, nodeLink(a.node_id), a.gpus.length ? h('span', { class: 'faint' }, ` GPU ${a.gpus.join(', ')}`) : ''),
          h('td', {}, when(a.assigned_at)),
          h('td', {}, a.started_at ? when(a.started_at) : '—'),
          h('td', {}, a.ended_at ? when(a.ended_at) : '—'),
          h('td', {}, a.outcome ? badge(a.outcome) : (TERMINAL.has(t.state) ? '—' : badge(t.state))),
          h('td', { class: 'why', title: a.reason || null }, a.reason ? firstLine(a.reason) : '—'))))))
      : h('p', { class: 'empty' }, 'Not placed on a node yet.'));
}

export function renderArtifacts(panel, t) {
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

/** Why output of an attempt is missing, as the logs API says. */
function removedNote(r) {
  const why = {
    retention: 'removed: the server keeps the output of finished tasks for a limited time',
    log_budget: 'removed: stored output passed its budget and this was among the oldest',
    db_budget: 'not stored: the server\'s database was over its size budget',
  }[r.reason] || `removed (${r.reason})`;
  return r.from_offset ? `— output from byte ${r.from_offset} on ${why} —` : `— output ${why} —`;
}

/** The task's output, followed live while its attempt runs. */
export function taskLog(panel, id, signal) {
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
          if (d.removed) note(removedNote(d.removed));
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

export async function nodePage(view, id, signal) {
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

export async function projectPage(view, id, signal) {
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

// Building elements, announcing changes, and formatting times, sizes,
// states and the names of nodes and projects.

import { all } from './api.js';

// ------------------------------------------------------------------ DOM

/** An element: h('a', {href: '#/', class: 'x', onclick: f}, 'text', child). */
export function h(tag, attrs, ...children) {
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

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export function announce(text) {
  const region = $('#announce');
  region.textContent = '';
  setTimeout(() => { region.textContent = text; }, 30);
}
// ----------------------------------------------------------- formatting

export function ago(iso) {
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

export function clock(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function full(iso) {
  return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' }) : '';
}

/** A relative time that stays current. */
export function when(iso) {
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
export const short = (id) => String(id || '').slice(-8);

export function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export const memory = (mb) => (mb >= 1024 ? `${(mb / 1024).toFixed(mb % 1024 ? 1 : 0)} GiB` : `${mb} MiB`);

export function badge(state, extra) {
  const text = String(state).replace('_', ' ');
  return h('span', { class: `badge ${state} ${extra || ''}` }, text);
}

export function eventClass(entry) {
  const t = entry.event_type;
  if (/Succeeded$|Connected$|Undrained$/.test(t)) return 'ok';
  if (/Failed$|Revoked$/.test(t)) return 'bad';
  if (/Lost$|TimedOut$|MarkedOffline$|Disconnected$|Drained$|Cancelled$/.test(t)) return 'warn';
  return entry.aggregate_type;
}

/** A message in place of a page's content, as an alert when `bad`. */
export function notice(text, bad) {
  return h('div', { class: `notice${bad ? ' bad' : ''}`, role: bad ? 'alert' : null }, text);
}

// --------------------------------------------------------------- names

/** Names of nodes and projects, for links that read well. */
export const names = {
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

export const taskLink = (id) => h('a', { href: `#/tasks/${id}`, class: 'mono', title: id }, short(id));
export const nodeLink = (id) => (id ? h('a', { href: `#/nodes/${id}` }, names.node(id)) : h('span', { class: 'faint' }, '—'));
export const projectLink = (id) => (id ? h('a', { href: `#/projects/${id}` }, names.project(id)) : h('span', { class: 'faint' }, '—'));

// UniDesk web view: a client of the REST API under /api/v1, in plain
// JavaScript modules. Pages are addressed by the URL fragment
// (#/tasks/<id>), so the server only serves the page, its scripts and its
// style. This module signs in and out and routes between pages.

import { TOKEN_KEY, session, userOf, api } from './api.js';
import { h, $, names, notice } from './dom.js';
import { dashboard } from './dashboard.js';
import { timelinePage } from './timeline.js';
import { taskPage, nodePage, projectPage } from './pages.js';

// -------------------------------------------------------------- routing

export let current = null;

export function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, search] = raw.split('?');
  return { parts: path.split('/').filter(Boolean), params: new URLSearchParams(search || '') };
}

export async function route() {
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

export function showSignIn(message) {
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

export function signedOut(message) {
  if (current) current.abort();
  session.clear();
  showSignIn(message);
}

export async function signIn(token, remember) {
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
  // Which server answers, for operators upgrading it and its agents; the
  // page works the same without it.
  api('/version').then((v) => {
    $('#server-version').textContent = `server ${v.server} · agent protocol ${v.agent_protocol.oldest}–${v.agent_protocol.newest}`;
  }).catch(() => {});
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

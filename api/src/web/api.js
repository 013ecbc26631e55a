// The REST API as the web view uses it: the signed-in session, JSON calls,
// paging through lists and reading Server-Sent Events through fetch().
//
// The user's token stays in the browser (session storage, or local storage
// when asked to remember it) and goes out only as an Authorization header.
// Server-Sent Events are read with fetch() for the same reason: EventSource
// cannot send headers, and a token in a URL ends up in logs.

import { signedOut } from './main.js';

export const TOKEN_KEY = 'unidesk.token';
export const PAGE = 50;
export const TERMINAL = new Set(['succeeded', 'failed', 'timed_out', 'cancelled']);
export const HOLDING = ['assigned', 'accepted', 'preparing', 'running'];

// -------------------------------------------------------------- session

export const session = {
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
export function userOf(token) {
  const parts = token.split('~');
  return parts.length === 4 && parts[0] === 'udu' && parts[1] ? parts[1] : null;
}

// ------------------------------------------------------------------ API

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function errorOf(status, body) {
  const problems = (body && Array.isArray(body.errors)) ? body.errors : [];
  const text = problems.map((p) => (p.field ? `${p.field}: ${p.detail}` : p.detail)).join('; ');
  return new ApiError(status, text || `the server answered ${status}`);
}

export async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.token}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  // Lists wait (briefly) until they show everything committed before the
  // request, so a page opened right after a change shows it; other
  // routes read the log itself and ignore the preference.
  if (method === 'GET') headers.Prefer = 'fresh';
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

export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== '') q.set(key, value);
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

// Every item of a list, page after page (lists come 500 at most a page).
export async function all(path, { signal } = {}) {
  const items = [];
  let cursor = null;
  do {
    const page = await api(`${path}${query({ limit: 500, cursor })}`, { signal });
    items.push(...page.items);
    cursor = page.next_cursor || null;
  } while (cursor);
  return { items };
}

// The event types the signed-in user can ever receive, asked of the server
// once per token.
let eventTypesAsked = { token: null, types: null };

/** The names of the event types the signed-in user can receive. */
export function eventTypes({ signal } = {}) {
  if (eventTypesAsked.token !== session.token || !eventTypesAsked.types) {
    const types = api('/event-types', { signal }).then((r) => r.items.map((t) => t.type));
    types.catch(() => { if (eventTypesAsked.types === types) eventTypesAsked.types = null; });
    eventTypesAsked = { token: session.token, types };
  }
  return eventTypesAsked.types;
}

export const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

/**
 * Follows a Server-Sent Events route with the bearer header, reconnecting
 * with Last-Event-ID after a break. onEvent(type, data, id) returns true to
 * end the stream; onState('on' | 'off') tells whether it is connected.
 */
export async function follow(path, { signal, onEvent, onState = () => {}, onError = () => {} }) {
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

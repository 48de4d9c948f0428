/*
 * keybroker — the browser page.
 *
 * Flow: load /ui/config.json, then the identity provider's discovery document. "Sign in" runs
 * the OpenID Connect authorization code flow with PKCE (S256) as a public client: the IdP
 * redirects back here with ?code&state, we check state (and the id_token's nonce), exchange the
 * code at the token endpoint, drop the code from the address bar with history.replaceState, ask
 * keybroker who we are (GET /v1/me) and show the views. /tickets/{id} is a pickup link a chat bot
 * posted; it serves this same page and opens the ticket view.
 *
 * Rules this file keeps:
 * - The bearer token lives ONLY in the module variable `token` (memory). It is never put in
 *   localStorage, sessionStorage or a cookie; reloading the page signs you out. sessionStorage
 *   holds only the transient login state ('keybroker.oidc': state, nonce, PKCE verifier, return
 *   path) across the redirect, and the callback removes it before doing anything else.
 * - A new key's secret is shown once, in #secret-box. It is never logged, never stored, and not
 *   kept in any JS variable: it goes straight from the response into the input, the response's
 *   copy is dropped, and leaving the box (navigation, "I have stored it", sign-out, another
 *   request, closing the tab) empties the input and replaces the node.
 * - A strict CSP is sent: no inline scripts, styles or handlers, no eval. The DOM is built with
 *   createElement/textContent only (never innerHTML), visibility uses the `hidden` attribute.
 * - Requests go only to this origin and to the identity provider's endpoints.
 * - Nothing here calls console.*.
 */

const OIDC_KEY = 'keybroker.oidc';
const TICKET_PATH = /^\/tickets\/([^/]+)\/?$/;
const PRIVILEGED_VIEWS = new Set(['all-keys', 'audit', 'identify']);
const KNOWN_STATES = new Set([
  'pending', 'active', 'revoked', 'expired', 'failed',
  'waiting', 'claimed', 'cancelled',
]);

let config = null; // /ui/config.json
let oidc = null; // the IdP's discovery document
let token = null; // the bearer token: memory only
let me = null; // MeView
let sessionGen = 0; // bumped on sign-in/out so late answers of an old session are ignored
let currentView = null;
let requestScopes = []; // ScopeView[] behind the request form's <select>
let requestIdem = null; // Idempotency-Key of the current request-form attempt
let claimIdem = null; // { ticket, key } for the current claim attempt
let shownTicket = null; // the TicketView on screen
let copiedTimer = null;

const $ = (id) => document.getElementById(id);

/* ---------- small DOM helpers (no innerHTML anywhere) ---------- */

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** A <time> in the browser's locale, with the raw RFC 3339 value in its title. */
function timeEl(raw) {
  if (!raw) return document.createTextNode('—');
  const date = new Date(raw);
  const text = Number.isNaN(date.getTime()) ? raw : date.toLocaleString();
  return el('time', { datetime: raw, title: raw }, text);
}

/** 604800 -> "7d", 90000 -> "1d 1h". */
function duration(seconds) {
  if (!Number.isFinite(seconds)) return '—';
  let rest = Math.max(0, Math.round(seconds));
  if (rest === 0) return '0s';
  const parts = [];
  for (const [unit, size] of [['d', 86400], ['h', 3600], ['m', 60], ['s', 1]]) {
    const count = Math.floor(rest / size);
    if (count) {
      parts.push(`${count}${unit}`);
      rest -= count * size;
    }
  }
  return parts.join(' ');
}

function durationCell(seconds) {
  return el('td', { title: Number.isFinite(seconds) ? `${seconds} seconds` : null }, duration(seconds));
}

function stateBadge(state, title) {
  const cls = KNOWN_STATES.has(state) ? `state state-${state}` : 'state';
  return el('span', { class: cls, title: title || null }, String(state ?? '—'));
}

function str(value) {
  return typeof value === 'string' && value !== '' ? value : '';
}

function setStatus(message) {
  $('status').textContent = message || '';
}

function focusHeading(section) {
  const heading = section && section.querySelector('h2');
  if (heading) heading.focus();
}

/* ---------- problems (RFC 9457) ---------- */

function normalizeProblem(body, status) {
  if (typeof body === 'string') body = { detail: body };
  if (!body || typeof body !== 'object') body = {};
  const code = Number.isInteger(body.status) ? body.status : status;
  return {
    title: str(body.title) || str(body.error) || (code ? 'Request failed' : 'Something went wrong'),
    status: code || 0,
    detail: str(body.detail) || str(body.error_description) || str(body.message),
    requestId: str(body.request_id),
    reasons: Array.isArray(body.reasons) ? body.reasons : [],
  };
}

/** One <li> per reason: keybroker sends {rule, detail}; {code, message} is accepted too. */
function reasonItem(reason) {
  if (typeof reason === 'string') return el('li', {}, reason);
  const message = str(reason?.detail) || str(reason?.message) || JSON.stringify(reason);
  const code = str(reason?.rule) || str(reason?.code);
  return el('li', {},
    el('span', { class: 'reason-message' }, message),
    code ? ' ' : null,
    code ? el('code', { class: 'reason-code' }, code) : null);
}

function showProblem(body, status) {
  const problem = normalizeProblem(body, status);
  const box = $('problem');
  box.querySelector('.problem-title').textContent =
    problem.status ? `${problem.title} (${problem.status})` : problem.title;
  const detail = box.querySelector('.problem-detail');
  detail.textContent = problem.detail;
  detail.hidden = !problem.detail;
  const list = box.querySelector('.problem-reasons');
  list.replaceChildren(...problem.reasons.map(reasonItem));
  list.hidden = problem.reasons.length === 0;
  const rid = box.querySelector('.problem-request-id');
  rid.textContent = problem.requestId ? `Request id: ${problem.requestId}` : '';
  rid.hidden = !problem.requestId;
  box.hidden = false;
}

function clearProblem() {
  const box = $('problem');
  box.hidden = true;
  box.querySelector('.problem-title').textContent = '';
  box.querySelector('.problem-detail').textContent = '';
  box.querySelector('.problem-reasons').replaceChildren();
  box.querySelector('.problem-request-id').textContent = '';
}

/* ---------- HTTP ---------- */

async function readBody(response) {
  let text = '';
  try {
    text = await response.text();
  } catch {
    return null;
  }
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    if (response.ok) return text;
    return { title: response.statusText || 'Error', status: response.status, detail: text.slice(0, 500) };
  }
}

/**
 * One keybroker API call. Resolves to {ok, status, body, headers}; never throws for HTTP
 * errors or network failures (status 0).
 */
async function api(method, path, body, extraHeaders = {}) {
  const headers = { Accept: 'application/json', ...extraHeaders };
  if (token) headers.Authorization = 'Bearer ' + token;
  const init = { method, headers, cache: 'no-store', credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    return {
      ok: false,
      status: 0,
      body: { title: 'Network error', detail: 'keybroker could not be reached. Check your connection and try again.' },
      headers: new Headers(),
    };
  }
  return { ok: response.ok, status: response.status, body: await readBody(response), headers: response.headers };
}

/**
 * api() plus the page's common handling: a success clears #problem, a failure shows it, a 401
 * ends the session. Answers that arrive after a sign-out are marked stale and not shown.
 */
async function call(method, path, body, extraHeaders) {
  const gen = sessionGen;
  const res = await api(method, path, body, extraHeaders);
  if (gen !== sessionGen) return { ...res, ok: false, stale: true };
  if (res.ok) clearProblem();
  else if (res.status === 401 && token) sessionExpired(res.body);
  else showProblem(res.body, res.status);
  return res;
}

function query(path, params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) if (value) q.set(name, value);
  const qs = q.toString();
  return qs ? `${path}?${qs}` : path;
}

function newIdempotencyKey() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/* ---------- OpenID Connect (authorization code + PKCE) ---------- */

function base64url(bytes) {
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function randomBase64url(size) {
  return base64url(crypto.getRandomValues(new Uint8Array(size)));
}

async function pkceChallenge(verifier) {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

function decodeJwtPayload(jwt) {
  const part = String(jwt).split('.')[1];
  if (!part) throw new Error('not a JWT');
  const b64 = part.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((part.length + 3) % 4);
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** A same-origin path to come back to, never another origin. */
function safePath(path) {
  return typeof path === 'string' && path.startsWith('/') && !path.startsWith('//') && !path.includes('\\')
    ? path
    : location.pathname;
}

async function loadConfig() {
  const res = await api('GET', '/ui/config.json');
  if (!res.ok || !res.body || typeof res.body !== 'object') {
    showProblem(res.ok ? { title: 'The page configuration is unreadable' } : res.body, res.status);
    return false;
  }
  config = res.body;
  const title = str(config.title) || 'keybroker';
  document.title = title;
  $('brand').textContent = title;
  return true;
}

async function discover() {
  // keybroker reads the discovery document itself (its CSP names the token endpoint's origin);
  // the browser fetches it only when keybroker could not.
  if (config.authorization_endpoint && config.token_endpoint) {
    oidc = { authorization_endpoint: config.authorization_endpoint, token_endpoint: config.token_endpoint };
    return;
  }
  const url = String(config.issuer || '').replace(/\/+$/, '') + '/.well-known/openid-configuration';
  let response;
  try {
    response = await fetch(url, { headers: { Accept: 'application/json' }, credentials: 'omit' });
  } catch {
    throw new Error(`The identity provider at ${config.issuer} could not be reached.`);
  }
  const doc = await readBody(response);
  if (!response.ok || !doc || !doc.authorization_endpoint || !doc.token_endpoint) {
    throw new Error(`The identity provider at ${config.issuer} answered ${response.status} without a usable discovery document.`);
  }
  oidc = doc;
}

async function signIn() {
  clearProblem();
  try {
    if (!config) throw new Error('The page configuration (/ui/config.json) did not load; reload the page.');
    if (!oidc) await discover();
    if (!crypto.subtle) throw new Error('Signing in needs a secure context (https, or http on localhost).');
    const login = {
      state: randomBase64url(16),
      nonce: randomBase64url(16),
      verifier: randomBase64url(32),
      return_to: location.pathname,
    };
    const challenge = await pkceChallenge(login.verifier);
    sessionStorage.setItem(OIDC_KEY, JSON.stringify(login));
    const params = new URLSearchParams({
      response_type: 'code',
      client_id: config.client_id,
      redirect_uri: config.redirect_uri,
      scope: config.scopes || 'openid',
      state: login.state,
      nonce: login.nonce,
      code_challenge: challenge,
      code_challenge_method: 'S256',
    });
    const endpoint = oidc.authorization_endpoint;
    location.assign(endpoint + (endpoint.includes('?') ? '&' : '?') + params.toString());
  } catch (error) {
    showProblem({ title: 'Cannot sign in', detail: error.message });
  }
}

/**
 * If this load is the IdP's redirect back, take (and delete) the stored login state and clean
 * the address bar at once. Returns null when it is not a callback.
 */
function takeCallback() {
  const params = new URLSearchParams(location.search);
  const isCallback = params.has('error') || (params.has('code') && params.has('state'));
  if (!isCallback) return null;
  let login = null;
  try {
    login = JSON.parse(sessionStorage.getItem(OIDC_KEY) || 'null');
  } catch {
    login = null;
  }
  try {
    sessionStorage.removeItem(OIDC_KEY);
  } catch {
    // storage unavailable: nothing was kept there either
  }
  history.replaceState(null, '', safePath(login && login.return_to));
  return { params, login };
}

function loginFailed(detail, title = 'Sign-in failed', status) {
  showProblem({ title, detail, status });
  return false;
}

/** Exchange the code for tokens; sets `token` and returns true on success. */
async function finishLogin({ params, login }) {
  if (!login || typeof login !== 'object') {
    return loginFailed('No sign-in was in progress in this tab, so the answer cannot be checked. Press "Sign in" to try again.');
  }
  // Checked before anything in the answer is believed, an error included: a crafted link must
  // not put its own text on this page.
  if (params.get('state') !== login.state) {
    return loginFailed('The answer does not belong to the sign-in this page started (state mismatch). Nothing was exchanged; sign in again.');
  }
  if (params.has('error')) {
    return loginFailed(
      params.get('error_description') || 'The identity provider did not sign you in.',
      `Sign-in refused: ${params.get('error')}`);
  }
  if (!oidc) return loginFailed('The identity provider\'s configuration could not be loaded, so the sign-in cannot be completed.');

  let response;
  try {
    response = await fetch(oidc.token_endpoint, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' },
      body: new URLSearchParams({
        grant_type: 'authorization_code',
        code: params.get('code'),
        redirect_uri: config.redirect_uri,
        client_id: config.client_id,
        code_verifier: login.verifier,
      }).toString(),
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch {
    return loginFailed('The identity provider\'s token endpoint could not be reached.');
  }
  const answer = await readBody(response);
  if (!response.ok || !answer || typeof answer !== 'object') {
    const err = answer && typeof answer === 'object' ? answer : {};
    return loginFailed(
      str(err.error_description) || str(err.detail) || 'The identity provider refused to exchange the code.',
      str(err.error) ? `Sign-in failed: ${err.error}` : 'Sign-in failed',
      response.status);
  }
  // The scopes always hold `openid`, so an OpenID provider answers with an id_token; its nonce
  // proves the answer belongs to this sign-in.
  const wanted = config.token === 'id_token' ? 'id_token' : 'access_token';
  const bearer = answer[wanted];
  if (!bearer) return loginFailed(`The identity provider answered without an ${wanted}.`);
  if (!answer.id_token) return loginFailed('The identity provider answered without an id_token.');
  {
    let claims = null;
    try {
      claims = decodeJwtPayload(answer.id_token);
    } catch {
      return loginFailed('The identity provider sent an id_token that cannot be read.');
    }
    if (!claims || claims.nonce !== login.nonce) {
      return loginFailed('The id_token was not issued for this sign-in (nonce mismatch). Sign in again.');
    }
  }
  token = bearer;
  return true;
}

/* ---------- session ---------- */

function ticketIdFromPath() {
  const match = TICKET_PATH.exec(location.pathname);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function isPrivileged() {
  const roles = (me && Array.isArray(me.roles)) ? me.roles : [];
  return roles.includes('auditor') || roles.includes('admin');
}

async function startSession() {
  sessionGen += 1;
  const res = await call('GET', '/v1/me');
  if (res.stale) return;
  if (!res.ok) {
    if (token) { // not a 401 (that one already signed us out): cannot go on without MeView
      token = null;
      renderSignedOut();
    }
    return;
  }
  me = res.body;
  renderWhoami();
  for (const button of document.querySelectorAll('#nav [data-privileged]')) button.hidden = !isPrivileged();
  $('nav').hidden = false;
  $('whoami').hidden = false;
  $('signout').hidden = false;
  showView(ticketIdFromPath() ? 'ticket' : 'scopes', { fromHistory: true });
}

function renderWhoami() {
  $('whoami-name').textContent = str(me.name) || me.subject;
  $('whoami-subject').textContent = me.subject;
  const teams = Array.isArray(me.teams) && me.teams.length ? `Teams: ${me.teams.join(', ')}` : 'No teams';
  const roles = (me.roles || []).filter((r) => r !== 'requester');
  $('whoami-teams').textContent = roles.length ? `${teams} · Roles: ${roles.join(', ')}` : teams;
}

function hideAllViews() {
  for (const section of document.querySelectorAll('main > section.view')) {
    section.hidden = true;
    section.removeAttribute('aria-busy');
  }
}

function renderSignedOut() {
  $('nav').hidden = true;
  $('whoami').hidden = true;
  $('signout').hidden = true;
  hideAllViews();
  currentView = null;
  const onTicket = Boolean(ticketIdFromPath());
  $('ticket-details').hidden = true;
  $('ticket-signed-out').hidden = !onTicket;
  $(onTicket ? 'signin-slot-ticket' : 'signin-slot-main').append($('signin'));
  $(onTicket ? 'view-ticket' : 'view-signin').hidden = false;
}

/** Forget everything the previous user saw. */
function resetData() {
  requestIdem = null;
  claimIdem = null;
  requestScopes = [];
  for (const pager of [myKeys, allKeys, auditPager]) pager.clear();
  $('scopes-body').replaceChildren();
  $('scopes-table-wrap').hidden = true;
  $('scopes-empty').hidden = true;
  $('request-scope').replaceChildren();
  for (const form of document.querySelectorAll('main form')) form.reset();
  for (const id of ['identify-result', 'verify-result']) {
    $(id).replaceChildren();
    $(id).hidden = true;
  }
  $('ticket-details').hidden = true;
  for (const id of ['whoami-name', 'whoami-subject', 'whoami-teams']) $(id).textContent = '';
  for (const button of document.querySelectorAll('#nav [data-privileged]')) button.hidden = true;
  const dialog = $('confirm-dialog');
  if (dialog.open) dialog.close('no');
}

function endSession() {
  token = null;
  me = null;
  sessionGen += 1;
  clearSecret();
  resetData();
  renderSignedOut();
}

function signOut() {
  endSession();
  clearProblem();
  setStatus('You are signed out.');
  focusHeading(document.querySelector('main > section.view:not([hidden])'));
}

/** The API answered 401: the token expired or was refused. */
function sessionExpired(problem) {
  endSession();
  setStatus('Your session has ended. Sign in again.');
  showProblem(problem, 401);
}

/* ---------- views ---------- */

const LOADERS = {
  scopes: loadScopes,
  request: loadRequest,
  keys: () => myKeys.load({ requester: me.subject }),
  'all-keys': () => allKeys.load(keyFilterParams()),
  audit: loadAudit,
  identify: resetIdentify,
  ticket: loadTicket,
};

function showView(name, opts = {}) {
  if (!me) return;
  if (!LOADERS[name] || (PRIVILEGED_VIEWS.has(name) && !isPrivileged())) name = 'scopes';
  clearSecret();
  clearProblem();
  setStatus('');
  if (name !== 'ticket' && ticketIdFromPath() && !opts.fromHistory) history.pushState(null, '', '/');
  hideAllViews();
  const section = $(`view-${name}`);
  section.hidden = false;
  currentView = name;
  for (const button of document.querySelectorAll('#nav button')) {
    if (button.dataset.view === name) button.setAttribute('aria-current', 'page');
    else button.removeAttribute('aria-current');
  }
  focusHeading(section);
  section.setAttribute('aria-busy', 'true');
  Promise.resolve()
    .then(() => LOADERS[name](opts))
    .catch((error) => showProblem({ title: 'Something went wrong on this page', detail: String(error && error.message) }))
    .finally(() => section.removeAttribute('aria-busy'));
}

/* ---------- the one-time secret ---------- */

function showSecret(key) {
  $('secret-value').value = key.api_key;
  key.api_key = null; // the input is now the only holder of the secret
  $('secret-key-id').textContent = key.id || '';
  $('secret-scope').textContent = key.scope || '';
  $('secret-expires').replaceChildren(timeEl(key.expires_at));
  $('secret-hint').textContent = key.key_hint || '—';
  const clamped = $('secret-clamped');
  const why = {
    octopus_server_maximum: 'Octopus\'s maximum key lifetime',
    broker_credential_expiry: 'the expiry of keybroker\'s own Octopus credential',
  }[key.expiry_clamped_by];
  clamped.textContent = why ? `The scope's default lifetime was shortened to fit ${why}.` : '';
  clamped.hidden = !why;
  $('secret-copied').textContent = '';
  $('secret-box').hidden = false;
  $('secret-heading').focus();
  setStatus('Your new key is ready. Copy the secret now: it is shown only once.');
}

/** Remove the secret from the DOM: empty the input and replace the node (no undo history). */
function clearSecret() {
  const old = $('secret-value');
  old.value = '';
  const fresh = old.cloneNode(false);
  fresh.value = '';
  old.replaceWith(fresh);
  for (const id of ['secret-key-id', 'secret-scope', 'secret-hint', 'secret-copied', 'secret-clamped']) {
    $(id).textContent = '';
  }
  $('secret-expires').replaceChildren();
  $('secret-box').hidden = true;
  clearTimeout(copiedTimer);
}

async function copySecret() {
  const input = $('secret-value');
  if (!input.value) return;
  let copied = false;
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(input.value);
      copied = true;
    } catch {
      copied = false;
    }
  }
  if (!copied) {
    input.focus();
    input.select();
    try {
      copied = document.execCommand('copy');
    } catch {
      copied = false;
    }
    if (copied) $('secret-copy').focus();
  }
  const feedback = $('secret-copied');
  feedback.textContent = copied
    ? 'Copied'
    : 'Could not copy automatically. The secret is selected: press Ctrl+C (⌘C on a Mac).';
  clearTimeout(copiedTimer);
  if (copied) copiedTimer = setTimeout(() => { feedback.textContent = ''; }, 4000);
}

function secretDone() {
  const fromTicket = currentView === 'ticket';
  clearSecret();
  if (fromTicket) {
    focusHeading($('view-ticket'));
    loadTicket();
  } else {
    showView('keys');
  }
  setStatus('The secret was removed from this page.');
}

/** A 200 to an issuing call: an earlier attempt already made the key; no secret this time. */
function showReplay(key) {
  const id = key && key.id ? ` ${key.id}` : '';
  setStatus(`Key${id} was already issued by an earlier attempt of this request. Its secret was only `
    + 'in that first answer; if you did not store it, revoke the key under "My keys" and request a new one.');
}

/* ---------- scopes ---------- */

function scopeRow(scope) {
  return el('tr', {},
    el('td', {}, el('strong', {}, scope.name)),
    el('td', {}, scope.description || ''),
    durationCell(scope.default_ttl_seconds),
    durationCell(scope.max_ttl_seconds),
    el('td', {}, String(scope.max_active_keys_per_requester ?? '—')),
    el('td', {}, el('button', {
      type: 'button',
      class: 'request-key secondary',
      'data-scope': scope.name,
      'aria-label': `Request a key for ${scope.name}`,
    }, 'Request a key')));
}

async function loadScopes() {
  const res = await call('GET', '/v1/scopes');
  if (!res.ok) return;
  const items = (res.body && res.body.items) || [];
  $('scopes-body').replaceChildren(...items.map(scopeRow));
  $('scopes-empty').hidden = items.length > 0;
  $('scopes-table-wrap').hidden = items.length === 0;
}

/* ---------- request a key ---------- */

async function loadRequest(opts = {}) {
  requestIdem = null;
  const select = $('request-scope');
  const wanted = opts.scope || select.value;
  const res = await call('GET', '/v1/scopes');
  if (!res.ok) return;
  requestScopes = (res.body && res.body.items) || [];
  select.replaceChildren(...requestScopes.map((s) => el('option', { value: s.name }, s.name)));
  if (requestScopes.some((s) => s.name === wanted)) select.value = wanted;
  $('request-none').hidden = requestScopes.length > 0;
  $('request-submit').disabled = requestScopes.length === 0;
  updateTtlHint();
}

function updateTtlHint() {
  const scope = requestScopes.find((s) => s.name === $('request-scope').value);
  $('request-ttl-hint').textContent = scope
    ? `Such as 12h or 7d. Empty means the scope's default (${duration(scope.default_ttl_seconds)}); `
      + `at most ${duration(scope.max_ttl_seconds)}.`
    : 'Such as 12h or 7d. Empty means the scope\'s default.';
}

/** Whether a failed issuing call may be retried with the same Idempotency-Key. */
function keepIdempotencyKey(status, inProgressConflict) {
  return status === 0 || status === 429 || status >= 500 || (inProgressConflict && status === 409);
}

async function submitRequest(event) {
  event.preventDefault();
  clearSecret();
  const form = $('request-form');
  if (!form.reportValidity()) return;
  const body = { scope: $('request-scope').value, purpose: $('request-purpose').value.trim() };
  const ttl = $('request-ttl').value.trim();
  if (ttl) body.ttl = ttl;
  if (!requestIdem) requestIdem = newIdempotencyKey();

  const submit = $('request-submit');
  submit.disabled = true;
  setStatus('Requesting a key…');
  const res = await call('POST', '/v1/keys', body, { 'Idempotency-Key': requestIdem });
  submit.disabled = false;
  if (res.stale) return;
  if (!res.ok && keepIdempotencyKey(res.status, true)) {
    setStatus('The request did not complete. Pressing "Request key" again retries it safely: the same attempt is never issued twice.');
    return;
  }
  requestIdem = null;
  if (!res.ok) {
    setStatus('');
    return;
  }
  if (res.status === 201 && res.body && res.body.api_key) {
    $('request-purpose').value = '';
    $('request-ttl').value = '';
    showSecret(res.body);
  } else {
    showReplay(res.body);
  }
}

/* ---------- key tables ---------- */

function keyLabel(key) {
  const hint = key.key_hint ? `${key.key_hint} ` : '';
  return `key ${hint}(${key.scope}: ${key.purpose})`;
}

function keyRow(key, withRequester) {
  const cells = [];
  if (withRequester) cells.push(el('td', {}, key.requester));
  cells.push(
    el('td', {}, key.scope),
    el('td', { class: 'purpose' }, key.purpose),
    el('td', {}, stateBadge(key.state, key.revoked_at ? `revoked at ${key.revoked_at}` : null)),
    el('td', {}, timeEl(key.created_at)),
    el('td', {}, timeEl(key.expires_at)),
    el('td', {}, key.key_hint ? el('code', {}, key.key_hint) : '—'),
    el('td', {}, key.state === 'active'
      ? el('button', {
        type: 'button',
        class: 'revoke danger',
        'data-label': keyLabel(key),
        'aria-label': `Revoke ${keyLabel(key)}`,
      }, 'Revoke')
      : null),
  );
  return el('tr', { 'data-key-id': key.id, title: `Key id ${key.id}` }, ...cells);
}

/** A table fed by a cursor-paged list endpoint, with a "More" button. */
class Pager {
  constructor({ path, body, more, empty, wrap, row }) {
    this.path = path;
    this.tbody = $(body);
    this.moreButton = $(more);
    this.empty = $(empty);
    this.wrap = $(wrap);
    this.row = row;
    this.params = {};
    this.cursor = null;
    this.pages = 0;
    this.gen = 0;
    this.moreButton.addEventListener('click', () => this.loadMore());
  }

  fetchPage(cursor) {
    return call('GET', query(this.path, { ...this.params, cursor }));
  }

  /** Load the first `pages` pages afresh (the table changes only when all arrived). */
  async load(params = this.params, pages = 1) {
    const gen = ++this.gen;
    this.params = params;
    const rows = [];
    let cursor = null;
    let loaded = 0;
    do {
      const res = await this.fetchPage(cursor);
      if (gen !== this.gen || !res.ok) return false;
      rows.push(...((res.body && res.body.items) || []).map(this.row));
      cursor = (res.body && res.body.next_cursor) || null;
      loaded += 1;
    } while (cursor && loaded < pages);
    this.tbody.replaceChildren(...rows);
    this.cursor = cursor;
    this.pages = loaded;
    this.update();
    return true;
  }

  refresh() {
    return this.load(this.params, Math.max(1, this.pages));
  }

  async loadMore() {
    if (!this.cursor) return;
    const gen = this.gen;
    this.moreButton.disabled = true;
    const res = await this.fetchPage(this.cursor);
    this.moreButton.disabled = false;
    if (gen !== this.gen || !res.ok) return;
    const rows = ((res.body && res.body.items) || []).map(this.row);
    this.tbody.append(...rows);
    this.cursor = (res.body && res.body.next_cursor) || null;
    this.pages += 1;
    this.update();
    setStatus(`${rows.length} more loaded.`);
    if (this.moreButton.hidden && rows[0]) {
      rows[0].tabIndex = -1;
      rows[0].focus();
    }
  }

  update() {
    const count = this.tbody.rows.length;
    this.empty.hidden = count > 0;
    this.wrap.hidden = count === 0;
    this.moreButton.hidden = !this.cursor;
  }

  clear() {
    this.gen += 1;
    this.tbody.replaceChildren();
    this.params = {};
    this.cursor = null;
    this.pages = 0;
    this.empty.hidden = true;
    this.wrap.hidden = true;
    this.moreButton.hidden = true;
  }
}

function confirmDialog(message) {
  const dialog = $('confirm-dialog');
  $('confirm-text').textContent = message;
  if (typeof dialog.showModal !== 'function') return Promise.resolve(window.confirm(message));
  dialog.returnValue = ''; // Escape closes without a value: that is a "no"
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'yes'), { once: true });
    dialog.showModal();
    $('confirm-no').focus();
  });
}

async function revokeClicked(button, pager) {
  const row = button.closest('tr');
  const id = row && row.dataset.keyId;
  if (!id) return;
  const label = button.dataset.label || `key ${id}`;
  const yes = await confirmDialog(`Revoke ${label}? Anything using it stops working at once. This cannot be undone.`);
  if (!yes) return;
  button.disabled = true;
  const res = await call('DELETE', `/v1/keys/${encodeURIComponent(id)}`);
  if (!res.ok) {
    button.disabled = false;
    return;
  }
  await pager.refresh();
  setStatus(`The ${label} is now ${(res.body && res.body.state) || 'revoked'}.`);
  const fresh = pager.tbody.querySelector(`tr[data-key-id="${CSS.escape(id)}"]`);
  if (fresh) {
    fresh.tabIndex = -1;
    fresh.focus();
  } else {
    focusHeading(pager.tbody.closest('section'));
  }
}

const myKeys = new Pager({
  path: '/v1/keys', body: 'keys-body', more: 'keys-more', empty: 'keys-empty', wrap: 'keys-table-wrap',
  row: (key) => keyRow(key, false),
});

const allKeys = new Pager({
  path: '/v1/keys', body: 'all-keys-body', more: 'all-keys-more', empty: 'all-keys-empty', wrap: 'all-keys-table-wrap',
  row: (key) => keyRow(key, true),
});

function keyFilterParams() {
  return {
    scope: $('filter-scope').value.trim(),
    state: $('filter-state').value,
    requester: $('filter-requester').value.trim(),
    team: $('filter-team').value.trim(),
  };
}

/* ---------- audit ---------- */

function auditRow(event) {
  return el('tr', { 'data-event-id': event.id, title: `Event #${event.seq}` },
    el('td', {}, timeEl(event.occurred_at)),
    el('td', {}, event.actor),
    el('td', {}, el('code', {}, event.action)),
    el('td', {}, el('span', { class: `outcome outcome-${String(event.outcome).replace(/[^a-z_-]/gi, '')}` }, event.outcome)),
    el('td', {}, event.scope || '—'),
    el('td', {}, event.key_id ? el('code', { class: 'id' }, event.key_id) : '—'),
    el('td', { class: 'detail' }, el('code', { class: 'json' },
      event.detail === undefined || event.detail === null ? '' : JSON.stringify(event.detail))));
}

const auditPager = new Pager({
  path: '/v1/audit', body: 'audit-body', more: 'audit-more', empty: 'audit-empty', wrap: 'audit-table-wrap',
  row: auditRow,
});

/** A datetime-local value (the browser's time zone) as RFC 3339 UTC, or ''. */
function toRfc3339(local) {
  if (!local) return '';
  const date = new Date(local);
  return Number.isNaN(date.getTime()) ? '' : date.toISOString();
}

function auditParams() {
  return {
    actor: $('audit-actor').value.trim(),
    action: $('audit-action').value.trim(),
    scope: $('audit-scope').value.trim(),
    key_id: $('audit-key').value.trim(),
    from: toRfc3339($('audit-from').value),
    to: toRfc3339($('audit-to').value),
  };
}

function loadAudit() {
  $('verify-result').replaceChildren();
  $('verify-result').hidden = true;
  return auditPager.load(auditParams());
}

async function verifyAudit() {
  const button = $('audit-verify');
  const out = $('verify-result');
  button.disabled = true;
  out.className = 'verify';
  out.hidden = false;
  out.replaceChildren(el('p', {}, 'Verifying the audit chain…'));
  const res = await call('GET', '/v1/audit/verify');
  button.disabled = false;
  if (!res.ok) {
    out.replaceChildren();
    out.hidden = true;
    return;
  }
  const report = res.body || {};
  const broken = report.first_break;
  out.className = report.ok ? 'verify verify-ok' : 'verify verify-bad';
  out.replaceChildren(
    el('p', { class: 'verify-verdict' }, report.ok ? 'The audit chain is intact.' : 'The audit chain is broken.'),
    el('p', {}, `${report.events_checked} events checked. Head hash: `, el('code', { class: 'id' }, report.head_hash || '—')),
    broken
      ? el('p', {}, `First break at event #${broken.seq} (`, el('code', { class: 'id' }, broken.event_id), `): ${broken.reason}`)
      : null);
}

/* ---------- identify a leaked secret ---------- */

function keyFacts(key) {
  const facts = [
    ['Key id', el('code', { class: 'id' }, key.id)],
    ['Scope', key.scope],
    ['Requester', key.requester],
    ['Purpose', key.purpose],
    ['State', stateBadge(key.state)],
    ['Created', timeEl(key.created_at)],
    ['Expires', timeEl(key.expires_at)],
    key.revoked_at ? ['Revoked', timeEl(key.revoked_at)] : null,
    ['Hint', key.key_hint ? el('code', {}, key.key_hint) : '—'],
    ['Octopus user', key.octopus_user_id],
    ['Octopus key id', key.octopus_key_id ? el('code', { class: 'id' }, key.octopus_key_id) : '—'],
  ].filter(Boolean);
  return el('dl', { class: 'facts' }, ...facts.flatMap(([term, value]) => [el('dt', {}, term), el('dd', {}, value ?? '—')]));
}

function resetIdentify() {
  $('identify-secret').value = '';
  $('identify-result').replaceChildren();
  $('identify-result').hidden = true;
}

async function submitIdentify(event) {
  event.preventDefault();
  const input = $('identify-secret');
  if (!input.reportValidity()) return;
  const body = { api_key: input.value.trim() };
  input.value = '';
  const out = $('identify-result');
  out.replaceChildren();
  out.hidden = true;
  const submit = $('identify-submit');
  submit.disabled = true;
  const res = await call('POST', '/v1/keys/identify', body);
  body.api_key = '';
  submit.disabled = false;
  if (res.stale) return;
  if (res.ok && res.body) {
    out.replaceChildren(el('h3', {}, 'This secret belongs to'), keyFacts(res.body));
    out.hidden = false;
  } else if (res.status === 404) {
    out.replaceChildren(el('p', { class: 'not-found' }, 'Not found: no key issued by keybroker has this secret.'));
    out.hidden = false;
  }
}

/* ---------- tickets (pickup links) ---------- */

const TICKET_NOTES = {
  claimed: 'This request has been claimed; the key is listed under "My keys" of the person it was for.',
  expired: 'This request expired before anyone claimed it. Ask for a new one.',
  cancelled: 'This request was cancelled.',
};

function renderTicket(ticket) {
  shownTicket = ticket;
  const asker = ticket.requested_by_name
    ? `${ticket.requested_by_name} (${ticket.requested_by})`
    : ticket.requested_by;
  $('ticket-summary').textContent = `${asker} asked keybroker for a ${ticket.scope} key for ${ticket.for}.`;
  $('ticket-requested-by').textContent = asker;
  $('ticket-for').textContent = ticket.for;
  $('ticket-scope').textContent = ticket.scope;
  $('ticket-purpose').textContent = ticket.purpose;
  $('ticket-ttl').textContent = ticket.ttl || 'the scope\'s default';
  $('ticket-created').replaceChildren(timeEl(ticket.created_at));
  $('ticket-expires').replaceChildren(timeEl(ticket.expires_at));
  const state = $('ticket-state');
  state.textContent = ticket.state;
  state.className = KNOWN_STATES.has(ticket.state) ? `state state-${ticket.state}` : 'state';

  const hasKey = Boolean(ticket.key_id);
  $('ticket-key-label').hidden = !hasKey;
  $('ticket-key').hidden = !hasKey;
  $('ticket-key').replaceChildren(hasKey ? el('code', { class: 'id' }, ticket.key_id) : '');

  const note = TICKET_NOTES[ticket.state] || '';
  $('ticket-note').textContent = note;
  $('ticket-note').hidden = !note;

  const mine = ticket.for === me.subject;
  const mismatch = $('ticket-mismatch');
  mismatch.textContent = mine ? '' : `This ticket is for ${ticket.for}; you are signed in as ${me.subject}.`;
  mismatch.hidden = mine;

  const waiting = ticket.state === 'waiting';
  const admin = Array.isArray(me.roles) && me.roles.includes('admin');
  $('ticket-claim').hidden = !(waiting && mine);
  // As the API decides: the bot that asked, the person, or an admin.
  $('ticket-cancel').hidden = !(waiting && (mine || ticket.requested_by === me.subject || admin));
  $('ticket-details').hidden = false;
}

async function loadTicket() {
  $('ticket-signed-out').hidden = true;
  const id = ticketIdFromPath();
  if (!id) {
    $('ticket-details').hidden = true;
    return;
  }
  const res = await call('GET', `/v1/tickets/${encodeURIComponent(id)}`);
  if (res.stale) return;
  if (!res.ok || !res.body) {
    $('ticket-details').hidden = true;
    return;
  }
  renderTicket(res.body);
}

async function claimTicket() {
  const id = ticketIdFromPath();
  if (!id) return;
  clearSecret();
  if (!claimIdem || claimIdem.ticket !== id) claimIdem = { ticket: id, key: newIdempotencyKey() };
  const button = $('ticket-claim');
  button.disabled = true;
  setStatus('Claiming the key…');
  const res = await call('POST', `/v1/tickets/${encodeURIComponent(id)}/claim`, undefined,
    { 'Idempotency-Key': claimIdem.key });
  button.disabled = false;
  if (res.stale) return;
  if (!res.ok && keepIdempotencyKey(res.status, false)) {
    setStatus('The claim did not complete. Pressing "Claim the key" again retries it safely.');
    return;
  }
  claimIdem = null;
  if (!res.ok) {
    setStatus('');
    return;
  }
  // The ticket is shown claimed from the answer itself: a refresh now could meet an expired
  // token, and signing out would take the secret off the page before it was copied.
  if (shownTicket && res.body) renderTicket({ ...shownTicket, state: 'claimed', key_id: res.body.id });
  if (res.status === 201 && res.body && res.body.api_key) showSecret(res.body);
  else showReplay(res.body);
}

async function cancelTicket() {
  const id = ticketIdFromPath();
  if (!id) return;
  clearSecret();
  const button = $('ticket-cancel');
  button.disabled = true;
  const res = await call('DELETE', `/v1/tickets/${encodeURIComponent(id)}`);
  button.disabled = false;
  if (!res.ok) return;
  await loadTicket();
  setStatus('The request was cancelled.');
  focusHeading($('view-ticket'));
}

/* ---------- wiring ---------- */

function onSubmit(formId, handler) {
  $(formId).addEventListener('submit', handler);
}

function wireEvents() {
  $('signin').addEventListener('click', signIn);
  $('signout').addEventListener('click', signOut);

  $('nav').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-view]');
    if (button) showView(button.dataset.view);
  });

  $('scopes-body').addEventListener('click', (event) => {
    const button = event.target.closest('button.request-key');
    if (button) showView('request', { scope: button.dataset.scope });
  });

  const requestForm = $('request-form');
  onSubmit('request-form', submitRequest);
  requestForm.addEventListener('input', () => { requestIdem = null; });
  requestForm.addEventListener('change', () => { requestIdem = null; });
  $('request-scope').addEventListener('change', updateTtlHint);

  $('secret-copy').addEventListener('click', copySecret);
  $('secret-done').addEventListener('click', secretDone);
  $('secret-box').addEventListener('focusin', (event) => {
    if (event.target.id === 'secret-value') event.target.select();
  });

  $('keys-body').addEventListener('click', (event) => {
    const button = event.target.closest('button.revoke');
    if (button) revokeClicked(button, myKeys);
  });
  $('all-keys-body').addEventListener('click', (event) => {
    const button = event.target.closest('button.revoke');
    if (button) revokeClicked(button, allKeys);
  });

  onSubmit('filter-form', (event) => {
    event.preventDefault();
    allKeys.load(keyFilterParams());
  });
  onSubmit('audit-form', (event) => {
    event.preventDefault();
    auditPager.load(auditParams());
  });
  $('audit-verify').addEventListener('click', verifyAudit);
  onSubmit('identify-form', submitIdentify);

  $('ticket-claim').addEventListener('click', claimTicket);
  $('ticket-cancel').addEventListener('click', cancelTicket);

  const dialog = $('confirm-dialog');
  $('confirm-yes').addEventListener('click', () => dialog.close('yes'));
  $('confirm-no').addEventListener('click', () => dialog.close('no'));

  window.addEventListener('popstate', () => {
    if (!me) {
      clearProblem();
      renderSignedOut();
    } else if (ticketIdFromPath()) {
      showView('ticket', { fromHistory: true });
    } else if (currentView === 'ticket') {
      showView('scopes', { fromHistory: true });
    }
  });
  // Never leave a secret in a page the back/forward cache keeps.
  window.addEventListener('pagehide', clearSecret);
}

async function boot() {
  wireEvents();
  const callback = takeCallback(); // first: the code leaves the address bar at once
  setStatus('Loading…');
  if (!(await loadConfig())) {
    setStatus('');
    renderSignedOut();
    return;
  }
  try {
    await discover();
  } catch (error) {
    showProblem({ title: 'Cannot reach the identity provider', detail: error.message });
  }
  if (callback) await finishLogin(callback);
  setStatus('');
  if (token) await startSession();
  else renderSignedOut();
}

boot();

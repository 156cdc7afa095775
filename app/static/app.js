/*
 * MyFlix demo page, and the reference client for the React frontend. No framework, no build.
 *
 * How a job is followed (the contract is in README.md, "Events"):
 *
 *   POST /api/generate/ {prompt, num_images}  ->  202 {job_id}
 *   new EventSource(`/api/generate/${job_id}/stream?access_token=${token}`)
 *     (EventSource cannot send an Authorization header, hence the query token.)
 *
 *   event `progress`  {index, status, url?, error?, queue_position?, elapsed_ms, completed, total}
 *       One per state change of one image: queued (with its queue_position) -> running ->
 *       succeeded (with url) | failed (with error) | canceled. Updates that image's tile.
 *   event `done`      {status, images[], ttfi_ms, total_ms}
 *       The last event. Tiles are reconciled with `images`, TTFI and batch time are shown,
 *       the EventSource is CLOSED (or the browser would reconnect forever) and History reloads.
 *   event `error`     {message}
 *       A job-level failure; the stream ends. Shown in words, EventSource closed.
 *   event `keepalive` {}
 *       Sent on a quiet stream; nothing to do.
 *
 *   DELETE /api/generate/${job_id}  ->  204, no body
 *       Cancels the job if it is still running, then removes it, its images and its events:
 *       afterwards its snapshot, its stream and its image links are 404. Each History entry has
 *       a Delete button; a deleted job leaves History (and "Current job", if it is shown there).
 *
 * Ids and reconnects: every event but `keepalive` has an SSE id 1, 2, 3... within its job.
 * After a dropped connection the browser reconnects by itself and sends Last-Event-ID, and
 * the server resumes after it. We also keep the id of the last event applied to the job
 * (job.lastEventId) and ignore any event with an id <= it, so nothing is ever applied twice,
 * even when we have to open a fresh EventSource (which replays the job from the start).
 *
 * EventSource fires its own `error` event (without `data`) for connection problems. While
 * readyState is CONNECTING the browser is retrying; once it is CLOSED it gave up (the server
 * answered with an error status, e.g. 401), so we ask for the job's snapshot to find out why:
 * a finished job is shown from the snapshot, a running one gets a fresh EventSource.
 *
 * The session (the API contract is in README.md and at /docs):
 *
 *   POST /api/auth/login {email, password}, or POST /api/auth/register {email, password,
 *   full_name} where GET /api/auth/settings says signup_enabled
 *       ->  {access_token, expires_in, refresh_token, refresh_expires_in}
 *   Both tokens are kept in sessionStorage (this tab only). The access token lives minutes:
 *   when a call answers 401, POST /api/auth/refresh {refresh_token} once gives a new pair and
 *   the call is sent again. The refresh token rotates: each is good for one refresh, and one
 *   sent twice ends the whole session, so only one refresh runs at a time (state.refreshing)
 *   and every call that met a 401 meanwhile waits for it. A refused refresh signs out here.
 *   A stream whose token expired fails with 401 (CLOSED): recover() asks for the snapshot,
 *   through the same renewal, and opens the fresh EventSource with the new token.
 *   POST /api/auth/logout ends the session at the service ("Sign out"); the tokens are
 *   forgotten here even when that call fails.
 *   GET /api/usage  ->  {images_today, quota, remaining, resets_at}, shown under the form
 *   after sign-in and after each job is created or finished. A job over the day's quota is
 *   refused with 429 and the service's words, which are shown.
 */
"use strict";

const TOKEN_KEY = "myflix.token";
const REFRESH_KEY = "myflix.refresh";
const HISTORY_PAGE_SIZE = 12;
const RECONNECT_DELAY_MS = 2000;
const MAX_RECONNECTS = 5;
const SIGN_OUT_TIMEOUT_MS = 5000; // a service that does not answer does not keep anyone signed in
const SESSION_EXPIRED = "Your session expired, sign in again";
const FIELD_LABELS = {
  email: "Email",
  password: "Password",
  full_name: "Full name",
  prompt: "Prompt",
  num_images: "Number of images",
};
const STATUS_WORDS = { queued: "Queued", running: "Running…", succeeded: "Succeeded", failed: "Failed", canceled: "Canceled" };

const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  refreshToken: sessionStorage.getItem(REFRESH_KEY),
  refreshing: null, // the refresh in flight: a Promise of true once state.token is a new one
  signingUp: false, // the sign-in form creates an account instead
  usageRequest: 0,
  job: null, // the job shown under "Current job", see watchJob()
  historyCursor: null,
  historyRequest: 0,
  deleted: new Set(), // ids of jobs deleted here: a History load begun before is not to show them
};

// --- Formatting -----------------------------------------------------------------------

const formatMs = (ms) => `${Math.round(ms)} ms`;
const formatSeconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
const altText = (index, total, prompt) => `Image ${index + 1} of ${total}: ${prompt}`;

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// --- Messages -------------------------------------------------------------------------

function showError(message) {
  $("alert").textContent = message;
}

function clearError() {
  $("alert").textContent = "";
}

function announce(message) {
  $("job-status").textContent = message;
}

// --- API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The `detail` of an error answer, in words. */
function errorMessage(status, detail, hadToken) {
  if (status === 401 && hadToken) return SESSION_EXPIRED;
  if (status === 422 && Array.isArray(detail)) {
    return detail
      .map((item) => {
        const field = FIELD_LABELS[(item.loc || []).at(-1)];
        return field ? `${field}: ${item.msg}` : item.msg;
      })
      .join(". ");
  }
  if (typeof detail === "string" && detail) return detail;
  return `The service answered ${status}`;
}

/** One request; `token`: the access token to send, if any. */
async function send(method, path, body, token, signal) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    return await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "Cannot reach the service; is it running?");
  }
}

async function failure(response, hadToken) {
  const payload = await response.json().catch(() => null);
  return new ApiError(response.status, errorMessage(response.status, payload && payload.detail, hadToken));
}

/**
 * Call the API with the session's access token (`auth: false`: without one, for sign-in and
 * sign-up). A 401 renews the session once and sends the call again; a 401 after that, or a
 * refused renewal, signs out here and is thrown with status 401 (callers need not show it).
 * @param {string} method
 * @param {string} path
 * @param {unknown} [body]  sent as JSON
 * @param {{ auth?: boolean, signal?: AbortSignal }} [options]
 */
async function api(method, path, body, { auth = true, signal } = {}) {
  let token = auth ? state.token : null;
  let response = await send(method, path, body, token, signal);
  if (response.status === 401 && token && (await renewSession(token))) {
    token = state.token;
    response = await send(method, path, body, token, signal);
  }
  if (response.status === 204) return null; // DELETE, logout: no body
  if (response.ok) return response.json();
  const error = await failure(response, Boolean(token));
  // Only if the session it was sent for is still this page's (not signed out meanwhile).
  if (response.status === 401 && token && state.token === token) signOut(error.message);
  throw error;
}

/**
 * A new token pair after `staleToken` was refused: true once state.token is a newer one,
 * false if the session is over (no refresh token, or the service refused it). An unreachable
 * service or a 5xx is thrown, the session kept: a later call tries again.
 */
async function renewSession(staleToken) {
  if (state.token !== staleToken) return Boolean(state.token); // renewed (or signed out) meanwhile
  if (!state.refreshToken) return false;
  if (!state.refreshing) {
    state.refreshing = refreshTokens().finally(() => {
      state.refreshing = null;
    });
  }
  return state.refreshing;
}

async function refreshTokens() {
  const refreshToken = state.refreshToken;
  const response = await send("POST", "/api/auth/refresh", { refresh_token: refreshToken }, null);
  const answer = response.ok ? await response.json().catch(() => null) : null;
  if (state.refreshToken !== refreshToken) return Boolean(state.token); // signed out (or in anew) meanwhile
  if (answer && answer.access_token) {
    keepSession(answer);
    return true;
  }
  if (response.status >= 500 || response.status === 429) throw await failure(response, false);
  return false; // 401: signed out elsewhere, expired, or sent twice; the caller signs out
}

// --- Sign in / out --------------------------------------------------------------------

/** The sign-in form's submit: sign in, or create an account (state.signingUp). */
async function signIn(event) {
  event.preventDefault();
  clearError();
  const button = $("sign-in-submit");
  button.disabled = true;
  const credentials = { email: $("email").value.trim(), password: $("password").value };
  try {
    const answer = state.signingUp
      ? await api("POST", "/api/auth/register", { ...credentials, full_name: $("full-name").value.trim() }, { auth: false })
      : await api("POST", "/api/auth/login", credentials, { auth: false });
    keepSession(answer);
    $("password").value = "";
    $("full-name").value = "";
    setSigningUp(false);
    await enterApp();
  } catch (error) {
    showError(error.message);
    if (error.status === 403 && state.signingUp) offerSignUp(false); // sign-up was turned off meanwhile
  } finally {
    button.disabled = false;
  }
}

function keepSession(answer) {
  state.token = answer.access_token;
  state.refreshToken = answer.refresh_token || null;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  if (state.refreshToken) sessionStorage.setItem(REFRESH_KEY, state.refreshToken);
  else sessionStorage.removeItem(REFRESH_KEY);
}

/** "Sign out": end the session at the service, then here, whether or not that call went through. */
async function signOutEverywhere() {
  const button = $("sign-out");
  button.disabled = true;
  stopWatching();
  try {
    await api("POST", "/api/auth/logout", undefined, { signal: AbortSignal.timeout(SIGN_OUT_TIMEOUT_MS) });
  } catch {
    // Unreachable, or over already: the tokens are forgotten all the same.
  } finally {
    button.disabled = false;
  }
  signOut();
}

/** Forget the session here and show the sign-in form (with `message`, if one is given). */
function signOut(message) {
  stopWatching();
  state.token = null;
  state.refreshToken = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(REFRESH_KEY);
  $("app").hidden = true;
  $("account").hidden = true;
  $("job-section").hidden = true;
  $("usage").hidden = true;
  $("history").replaceChildren();
  state.deleted.clear();
  $("sign-in-section").hidden = false;
  if (typeof message === "string") showError(message);
  else clearError();
  $("email").focus();
}

/** Show "Create an account" where the service allows sign-up. */
async function loadAuthSettings() {
  try {
    const settings = await api("GET", "/api/auth/settings", undefined, { auth: false });
    offerSignUp(settings.signup_enabled === true);
  } catch {
    offerSignUp(false); // sign-in still works
  }
}

function offerSignUp(enabled) {
  $("sign-up-offer").hidden = !enabled;
  if (!enabled) setSigningUp(false);
}

function setSigningUp(signingUp) {
  state.signingUp = signingUp;
  $("sign-in-heading").textContent = signingUp ? "Create an account" : "Sign in";
  $("sign-in-submit").textContent = signingUp ? "Create account" : "Sign in";
  $("full-name-field").hidden = !signingUp;
  $("full-name").disabled = !signingUp;
  $("full-name").required = signingUp;
  $("password").autocomplete = signingUp ? "new-password" : "current-password";
  $("password-rules").hidden = !signingUp;
  $("demo-users").hidden = signingUp;
  $("sign-up-question").textContent = signingUp ? "Have an account?" : "New here?";
  $("sign-up-switch").textContent = signingUp ? "Sign in instead" : "Create an account";
}

async function enterApp() {
  const me = await api("GET", "/api/auth/me");
  $("account-email").textContent = me.email;
  $("account").hidden = false;
  $("sign-in-section").hidden = true;
  $("app").hidden = false;
  $("prompt").focus();
  loadUsage();
  const page = await loadHistory();
  // A job still in progress (e.g. after a reload) is followed again, from its first event.
  const newest = page.jobs[0];
  if (!state.job && newest && (newest.status === "queued" || newest.status === "running")) {
    watchJob(newest.job_id, newest.prompt, newest.num_images, Date.now() - Date.parse(newest.created_at));
  }
}

// --- Generating -----------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  clearError();
  const prompt = $("prompt").value.trim();
  const numImages = Number($("num-images").value);
  $("generate").disabled = true;
  const sentAt = performance.now();
  try {
    const { job_id: jobId } = await api("POST", "/api/generate/", { prompt, num_images: numImages });
    watchJob(jobId, prompt, numImages, performance.now() - sentAt);
    loadHistory().catch((error) => showError(error.message));
    loadUsage();
  } catch (error) {
    if (error.status === 401) return; // signOut() already said so
    showError(error.message); // a 429 says why: the day's quota, or too many jobs at once
    $("generate").disabled = false;
    if (error.status === 429) loadUsage();
  }
}

async function cancelJob() {
  const job = state.job;
  if (!job || job.finished) return;
  $("cancel").disabled = true;
  announce("Canceling…");
  try {
    await api("POST", `/api/generate/${job.id}/cancel`);
    // The tiles turn "canceled" through the stream's progress events, then `done` arrives.
  } catch (error) {
    showError(error.message);
  }
}

/** Delete a job (canceled first if it runs); on 204 it leaves the page. */
async function deleteJob(jobId, button) {
  clearError();
  const hadFocus = document.activeElement === button;
  button.disabled = true;
  try {
    await api("DELETE", `/api/generate/${encodeURIComponent(jobId)}`);
  } catch (error) {
    if (error.status === 401) return; // signOut() already said so
    showError(error.message);
    // 404: deleted meanwhile (elsewhere), or never there: there is nothing to keep showing.
    if (error.status !== 404) {
      button.disabled = false;
      return;
    }
  }
  removeJob(jobId, hadFocus);
}

function removeJob(jobId, hadFocus) {
  state.deleted.add(jobId);
  if (state.job && state.job.id === jobId) {
    stopWatching();
    $("job-section").hidden = true;
    $("tiles").replaceChildren();
  }
  // Found by id: a History load may have replaced the entry the button was in.
  const item = [...$("history").children].find((child) => child.dataset.jobId === jobId);
  if (!item) return;
  const neighbour = item.nextElementSibling || item.previousElementSibling;
  item.remove();
  $("history-empty").hidden = $("history").children.length > 0;
  if (hadFocus) (neighbour ? neighbour.querySelector("button") : $("prompt")).focus();
}

// --- Following a job ------------------------------------------------------------------

/** Show a job under "Current job" and follow its events. `elapsedMs`: its age now. */
function watchJob(id, prompt, total, elapsedMs) {
  stopWatching();
  const job = {
    id,
    prompt,
    total,
    lastEventId: 0, // id of the last event applied; events with id <= it are ignored
    tiles: [],
    source: null,
    finished: false,
    reconnects: 0,
    clock: { ms: elapsedMs, at: performance.now() }, // server elapsed_ms at a local instant
    timer: null,
  };
  state.job = job;

  $("job-section").hidden = false;
  $("job-prompt").textContent = prompt;
  $("job-id").textContent = id;
  $("job-ttfi").textContent = "";
  $("job-total").textContent = "";
  setJobState("queued");
  job.tiles = Array.from({ length: total }, (_, index) => createTile(index, total));
  $("tiles").replaceChildren(...job.tiles.map((tile) => tile.item));
  announce(`Job started: ${total} image${total === 1 ? "" : "s"} queued`);

  $("generate").disabled = true;
  $("cancel").disabled = false;
  job.timer = setInterval(() => showElapsed(job), 100);
  showElapsed(job);
  openStream(job);
}

function stopWatching() {
  const job = state.job;
  if (!job) return;
  closeStream(job);
  clearInterval(job.timer);
  clearTimeout(job.retry);
  state.job = null;
  $("generate").disabled = false;
  $("cancel").disabled = true;
}

function openStream(job) {
  const url = `/api/generate/${encodeURIComponent(job.id)}/stream?access_token=${encodeURIComponent(state.token)}`;
  const source = new EventSource(url);
  job.source = source;
  source.addEventListener("progress", handler(job, onProgress));
  source.addEventListener("done", handler(job, onDone));
  source.addEventListener("error", (event) => {
    if (event.data !== undefined) handler(job, onJobError)(event); // the server's `error` event
    else onConnectionError(job, source);
  });
  // `keepalive` needs no listener: it only keeps proxies from closing a quiet stream.
}

function closeStream(job) {
  if (job.source) job.source.close();
  job.source = null;
}

/** Wrap an event handler: parse the data, and apply each event id at most once. */
function handler(job, apply) {
  return (event) => {
    if (state.job !== job || job.finished) return;
    const id = Number(event.lastEventId);
    if (id && id <= job.lastEventId) return; // already applied before a reconnect
    apply(job, JSON.parse(event.data));
    if (id) job.lastEventId = id;
    job.reconnects = 0;
  };
}

function onProgress(job, event) {
  const tile = job.tiles[event.index];
  if (!tile) return;
  setTile(job, tile, event);
  advanceClock(job, event.elapsed_ms);
  if (event.status === "running") setJobState("running");
  if (event.status === "succeeded" && !$("job-ttfi").textContent) {
    // Provisional: the first success's elapsed_ms; `done` brings the job's ttfi_ms.
    $("job-ttfi").textContent = `TTFI ${formatMs(event.elapsed_ms)}`;
  }
  if (event.status !== "queued" && event.status !== "running") {
    announce(`Image ${event.index + 1} of ${job.total} ${event.status}; ${event.completed} of ${event.total} finished`);
  }
}

function onDone(job, event) {
  for (const image of event.images) {
    const tile = job.tiles[image.index];
    if (tile && tile.status !== image.status) setTile(job, tile, image);
  }
  finishJob(job, event);
}

function onJobError(job, event) {
  showError(`The job failed: ${event.message}`);
  finishJob(job, { status: "failed", ttfi_ms: null, total_ms: null, images: [] });
}

/** Show the outcome: `done`, or a finished job's snapshot (same fields). */
function finishJob(job, result) {
  job.finished = true;
  closeStream(job);
  clearInterval(job.timer);
  clearTimeout(job.retry);
  setJobState(result.status);
  $("job-elapsed").textContent = "";
  $("job-ttfi").textContent = result.ttfi_ms == null ? "TTFI –" : `TTFI ${formatMs(result.ttfi_ms)}`;
  $("job-total").textContent = result.total_ms == null ? "" : `Batch ${formatSeconds(result.total_ms)}`;
  const succeeded = job.tiles.filter((tile) => tile.status === "succeeded").length;
  const batch = result.total_ms == null ? "" : ` in ${formatSeconds(result.total_ms)}`;
  announce(`Job ${result.status}: ${succeeded} of ${job.total} images${batch}`);
  const cancelHadFocus = document.activeElement === $("cancel");
  $("cancel").disabled = true;
  $("generate").disabled = false;
  if (cancelHadFocus) $("generate").focus();
  loadHistory().catch((error) => showError(error.message));
  loadUsage();
}

function onConnectionError(job, source) {
  if (state.job !== job || job.finished || job.source !== source) return;
  if (source.readyState === EventSource.CONNECTING) {
    announce("Connection lost; reconnecting…"); // the browser retries with Last-Event-ID
    return;
  }
  // CLOSED: the browser gave up on this EventSource. Ask the API what happened.
  closeStream(job);
  job.retry = setTimeout(() => recover(job), job.reconnects === 0 ? 0 : RECONNECT_DELAY_MS);
}

async function recover(job) {
  if (state.job !== job || job.finished) return;
  job.reconnects += 1;
  try {
    // An expired token is why a stream is refused most often: this call meets the same 401
    // and renews the session (api()), so the stream below opens with the new token.
    const snapshot = await api("GET", `/api/generate/${encodeURIComponent(job.id)}`);
    if (state.job !== job || job.finished) return;
    if (["queued", "running"].includes(snapshot.status)) {
      if (job.reconnects > MAX_RECONNECTS) throw new ApiError(0, "Lost the job's live updates; reload the page to follow it.");
      openStream(job); // a fresh EventSource replays from the start; applied ids are skipped
    } else {
      onDone(job, snapshot);
    }
  } catch (error) {
    if (error.status === 401 || state.job !== job) return; // signOut() already said so
    if (job.reconnects > MAX_RECONNECTS) showError(error.message);
    else job.retry = setTimeout(() => recover(job), RECONNECT_DELAY_MS);
  }
}

// --- Rendering the current job ----------------------------------------------------------

function setJobState(status) {
  const badge = $("job-state");
  badge.textContent = status;
  badge.dataset.status = status;
}

function advanceClock(job, elapsedMs) {
  // Only forward: replayed events carry old elapsed_ms values.
  if (elapsedMs > currentElapsed(job)) job.clock = { ms: elapsedMs, at: performance.now() };
}

function currentElapsed(job) {
  return job.clock.ms + (performance.now() - job.clock.at);
}

function showElapsed(job) {
  $("job-elapsed").textContent = `Elapsed ${formatSeconds(currentElapsed(job))}`;
}

function createTile(index, total) {
  const frame = el("div", { className: "frame" });
  const status = el("span", { className: "tile-status" }, STATUS_WORDS.queued);
  const item = el(
    "li",
    { className: "tile" },
    frame,
    el("p", { className: "caption" }, el("span", { className: "tile-name" }, `Image ${index + 1} of ${total}`), status),
  );
  item.dataset.status = "queued";
  return { index, item, frame, statusText: status, status: "queued" };
}

/** Apply an image's new state (a progress event, or an entry of done.images). */
function setTile(job, tile, image) {
  tile.status = image.status;
  tile.item.dataset.status = image.status;
  let words = STATUS_WORDS[image.status] || image.status;
  if (image.status === "queued" && image.queue_position) words += ` · #${image.queue_position} in line`;
  if (image.status === "failed" && image.error) words += `: ${image.error}`;
  tile.statusText.textContent = words;
  if (image.status === "succeeded" && image.url && !tile.frame.querySelector("img")) {
    const img = el("img", { src: image.url, alt: altText(tile.index, job.total, job.prompt), decoding: "async" });
    img.addEventListener("load", () => img.classList.add("loaded"));
    img.addEventListener("error", () => { tile.statusText.textContent = "Succeeded, but the image did not load"; });
    tile.frame.replaceChildren(img);
  }
}

// --- Usage ----------------------------------------------------------------------------

/** "N images left today", from GET /api/usage; hidden if the service cannot say. */
async function loadUsage() {
  const request = ++state.usageRequest;
  let usage = null;
  try {
    usage = await api("GET", "/api/usage");
  } catch {
    // A nicety: its failure is not worth an alert (a 401 has signed out already).
  }
  if (request !== state.usageRequest || !state.token) return; // a newer load, or signed out
  $("usage").textContent = usage ? usageText(usage) : "";
  $("usage").hidden = !usage;
}

function usageText(usage) {
  if (usage.quota == null) return `Unlimited images today (${usage.images_today} made so far)`;
  const left = usage.remaining == null ? Math.max(0, usage.quota - usage.images_today) : usage.remaining;
  const resets = new Date(usage.resets_at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return `${left} image${left === 1 ? "" : "s"} left today (${usage.images_today} of ${usage.quota} used; resets at ${resets})`;
}

// --- History --------------------------------------------------------------------------

async function loadHistory(more = false) {
  const request = ++state.historyRequest;
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE_SIZE) });
  if (more && state.historyCursor) params.set("cursor", state.historyCursor);
  const page = await api("GET", `/api/generate/?${params}`);
  if (request !== state.historyRequest) return page; // a newer load has started
  const items = page.jobs.filter((job) => !state.deleted.has(job.job_id)).map(historyItem);
  // A reload replaces the entries: the Delete button that had focus hands it to its successor.
  const focused = document.activeElement && document.activeElement.closest("#history > li");
  if (more) $("history").append(...items);
  else $("history").replaceChildren(...items);
  if (focused && !focused.isConnected) {
    const successor = items.find((item) => item.dataset.jobId === focused.dataset.jobId);
    if (successor) successor.querySelector("button").focus();
  }
  state.historyCursor = page.next_cursor;
  $("load-more").hidden = !page.next_cursor;
  $("history-empty").hidden = $("history").children.length > 0;
  return page;
}

function historyItem(job) {
  const metrics = [`${job.num_images} image${job.num_images === 1 ? "" : "s"}`];
  if (job.ttfi_ms != null) metrics.push(`TTFI ${formatMs(job.ttfi_ms)}`);
  if (job.total_ms != null) metrics.push(`Batch ${formatSeconds(job.total_ms)}`);
  metrics.push(new Date(job.created_at).toLocaleString());

  const thumbs = el("div", { className: "thumbs" });
  for (const image of job.images) {
    if (image.status === "succeeded" && image.url) {
      thumbs.append(el("img", { src: image.url, alt: altText(image.index, job.num_images, job.prompt), loading: "lazy" }));
    } else {
      const empty = el("span", { className: "thumb-empty", title: image.status });
      empty.setAttribute("aria-hidden", "true");
      empty.dataset.status = image.status;
      thumbs.append(empty);
    }
  }
  const badge = el("span", { className: "badge" }, job.status);
  badge.dataset.status = job.status;
  const remove = el("button", { type: "button", className: "danger small" }, "Delete");
  remove.setAttribute("aria-label", `Delete job: ${job.prompt}`);
  remove.addEventListener("click", () => deleteJob(job.job_id, remove));
  const item = el(
    "li",
    { className: "history-item" },
    el("p", { className: "history-head" }, badge, el("span", { className: "history-prompt" }, job.prompt), remove),
    el("p", { className: "history-metrics" }, metrics.join(" · ")),
    thumbs,
  );
  item.dataset.jobId = job.job_id;
  return item;
}

// --- Start ----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-up-switch").addEventListener("click", () => {
    clearError();
    setSigningUp(!state.signingUp);
    $("email").focus();
  });
  $("sign-out").addEventListener("click", signOutEverywhere);
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancelJob);
  $("load-more").addEventListener("click", () => loadHistory(true).catch((error) => showError(error.message)));
  window.addEventListener("pagehide", () => state.job && closeStream(state.job));
  loadAuthSettings();
  if (state.token) {
    enterApp().catch((error) => { if (error.status !== 401) showError(error.message); });
  } else {
    $("email").focus();
  }
});

// The operator's dashboard: channels and their counts, a live tail, a publish form
// and a messages-per-second chart. Talks to this server only: the HTTP API with the
// admin key (kept in sessionStorage, sent only in the Authorization header) and the
// WebSocket through herald.js.

import { Herald } from "/static/herald.js";

const KEY_STORAGE = "herald.adminKey";
const POLL_MS = 2000;
const TAIL_LIMIT = 200;
const HISTORY_ON_TAIL = 20;
const CHART_SECONDS = 60;

const $ = (id) => document.getElementById(id);

let adminKey = null;
let herald = null;
let pollTimer = null;
let channels = []; // the last listing
let previousCounts = null; // {time, messages: Map(name -> count)} of the last listing
let totalRate = []; // [{time, rate}] over all channels, from the listings
let tailCounts = new Map(); // second -> messages the tail received in it
let tail = null; // {channel, room, subscription}

// HTTP API

class ApiError extends Error {
  constructor(status, body) {
    super(body?.detail ?? `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${adminKey}`, ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const answer = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, answer);
  return answer;
}

async function listChannels() {
  const all = [];
  let cursor = null;
  for (let page = 0; page < 25; page++) { // at most 5000 channels
    const query = new URLSearchParams({ limit: "200", ...(cursor ? { cursor } : {}) });
    const answer = await api(`/v1/channels?${query}`);
    all.push(...answer.data);
    cursor = answer.meta.next;
    if (!cursor) break;
  }
  return all;
}

function channelPath(name, suffix = "") {
  return `/v1/channels/${encodeURIComponent(name)}${suffix}`;
}

// Signing in and out

async function signIn(key) {
  adminKey = key;
  await api("/v1/channels?limit=1"); // throws on a wrong key
  sessionStorage.setItem(KEY_STORAGE, key);
  $("login").hidden = true;
  $("board").hidden = false;
  $("sign-out").hidden = false;
  herald = new Herald({ key, client: "herald-dashboard" });
  herald.addEventListener("statechange", showLinkState);
  herald.addEventListener("error", (event) => setText("tail-state", `WebSocket: ${event.detail.error.message}`, true));
  showLinkState();
  poll();
}

function signOut(reason = "") {
  sessionStorage.removeItem(KEY_STORAGE);
  adminKey = null;
  clearTimeout(pollTimer);
  herald?.close();
  herald = null;
  tail = null;
  $("board").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("admin-key").value = "";
  setText("login-error", reason);
  showLinkState();
}

function showLinkState() {
  const state = herald ? herald.state : "signed out";
  const badge = $("link-state");
  badge.textContent = state;
  badge.className = `badge ${state}`;
  $("server-name").textContent = herald?.state === "connected" ? `worker ${herald.connectedFrame.server}` : "";
}

// Channels and totals

async function poll() {
  clearTimeout(pollTimer);
  try {
    channels = await listChannels();
    setText("channels-error", "");
    $("channels-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    renderChannels();
    recordRate();
  } catch (error) {
    if (error.status === 401) return signOut("The server no longer accepts this key.");
    setText("channels-error", `Cannot list channels: ${error.message}`);
    previousCounts = null; // no rate across a gap in the samples
  }
  if (adminKey) pollTimer = setTimeout(poll, POLL_MS);
}

function recordRate() {
  const now = Date.now();
  const messages = new Map(channels.map((c) => [c.name, c.counts.messages]));
  if (previousCounts) {
    let published = 0;
    for (const [name, count] of messages) {
      if (previousCounts.messages.has(name)) published += Math.max(0, count - previousCounts.messages.get(name));
    }
    const rate = published / ((now - previousCounts.time) / 1000);
    totalRate.push({ time: now, rate });
    totalRate = totalRate.filter((sample) => sample.time > now - (CHART_SECONDS + 5) * 1000);
    $("stat-rate").textContent = rate.toFixed(rate < 10 ? 1 : 0);
  }
  previousCounts = { time: now, messages };
}

function renderChannels() {
  const sum = (field) => channels.reduce((total, c) => total + (c.counts?.[field] ?? 0), 0);
  $("stat-channels").textContent = channels.length;
  $("stat-connections").textContent = sum("connections");
  $("stat-messages").textContent = sum("messages");

  const rows = channels.map((channel) => {
    const row = document.createElement("tr");
    row.dataset.channel = channel.name;
    if (tail?.channel === channel.name) row.className = "selected";
    const cells = [
      channel.name, channel.type, channel.counts.messages, channel.counts.connections,
      channel.counts.subscribers, new Date(channel.created_at).toLocaleString(),
    ];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (i >= 2 && i <= 4) cell.className = "num";
      row.append(cell);
    });
    const action = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Tail";
    button.addEventListener("click", () => {
      $("tail-channel").value = channel.name;
      startTail(channel.name, $("tail-room").value.trim());
    });
    action.append(button);
    row.append(action);
    return row;
  });
  $("channels").tBodies[0].replaceChildren(...rows);
  fillSelect($("tail-channel"));
  fillSelect($("publish-channel"));
}

function fillSelect(select) {
  const chosen = select.value;
  const names = channels.map((c) => c.name);
  if (chosen && !names.includes(chosen)) names.push(chosen);
  const current = [...select.options].slice(1).map((o) => o.value);
  if (current.join("\n") === names.join("\n")) return; // unchanged: keep focus and selection alone
  select.replaceChildren(select.options[0], ...names.map((name) => new Option(name, name)));
  select.value = chosen;
}

// Live tail

async function startTail(channel, room) {
  tail?.subscription?.unsubscribe();
  $("tail").replaceChildren();
  tailCounts = new Map();
  if (!channel) {
    tail = null;
    setText("tail-state", "Not tailing any channel.");
    return;
  }
  const current = (tail = { channel, room, subscription: null });
  $("publish-channel").value = channel;
  $("publish-room").value = room;
  renderChannels();
  setText("tail-state", `Loading ${channel}…`);
  try {
    // The last few messages from history, then everything after the newest of them
    // live: `since` makes the two meet with no gap and no duplicate.
    const query = new URLSearchParams({ limit: String(HISTORY_ON_TAIL), reverse: "1", ...(room ? { room } : {}) });
    const history = (await api(`${channelPath(channel, "/history")}?${query}`)).data.reverse();
    if (tail !== current) return;
    history.forEach((message) => addTailEntry(message, false));
    const since = history.length ? history[history.length - 1].id : "0-0";
    current.subscription = herald.subscribe(channel, (message) => addTailEntry(message, true), {
      room,
      since,
      onGap: () => setText("tail-state", `Tailing ${label(channel, room)}; some messages were lost while disconnected.`, true),
      onError: (error) => setText("tail-state", `Tail of ${label(channel, room)} stopped: ${error.message}`, true),
    });
    await current.subscription.ready;
    if (tail === current) setText("tail-state", `Tailing ${label(channel, room)} (live).`);
  } catch (error) {
    if (tail === current) setText("tail-state", `Cannot tail ${label(channel, room)}: ${error.message}`, true);
  }
}

function addTailEntry(message, live) {
  const item = document.createElement("li");
  item.dataset.id = message.id;
  if (live) {
    item.className = "fresh";
    const second = Math.floor(Date.now() / 1000);
    tailCounts.set(second, (tailCounts.get(second) ?? 0) + 1);
  }
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(message.created_at).toLocaleTimeString([], { hour12: false });
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = `${message.id} ${message.author ? `${message.author.type}:${message.author.id}` : ""}`;
  author.title = message.created_at;
  const payload = document.createElement("span");
  payload.className = "payload";
  const text = JSON.stringify(message.payload);
  payload.textContent = text.length > 2000 ? `${text.slice(0, 2000)}…` : text;
  item.append(time, author, payload);
  const list = $("tail");
  list.prepend(item);
  while (list.children.length > TAIL_LIMIT) list.lastElementChild.remove();
}

function label(channel, room) {
  return room ? `${channel} / ${room}` : channel;
}

// Publish

async function publish(event) {
  event.preventDefault();
  const channel = $("publish-channel").value;
  const room = $("publish-room").value.trim();
  const text = $("publish-payload").value;
  let payload;
  try {
    payload = JSON.parse(text);
  } catch {
    payload = text;
  }
  try {
    const answer = await api(channelPath(channel, "/publish"), { method: "POST", body: { payload, ...(room ? { room } : {}) } });
    setText("publish-result", `Published ${answer.data.id} to ${label(channel, room)}.`);
  } catch (error) {
    setText("publish-result", `Not published: ${error.message}`, true);
  }
}

// Chart: messages per second over the last minute, all channels (line, from the
// listings) and the tailed channel (bars, as the tail receives them).

function drawChart() {
  const canvas = $("rate-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const now = Date.now();
  const nowSecond = Math.floor(now / 1000);
  const left = 40, right = 10, top = 22, bottom = 20;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const bars = [];
  for (let s = nowSecond - CHART_SECONDS + 1; s <= nowSecond; s++) bars.push(tailCounts.get(s) ?? 0);
  const points = totalRate.filter((p) => p.time >= now - CHART_SECONDS * 1000);
  const peak = Math.max(1, ...bars, ...points.map((p) => p.rate));
  const scale = niceCeiling(peak);
  const x = (time) => left + plotWidth * (1 - (now - time) / (CHART_SECONDS * 1000));
  const y = (value) => top + plotHeight * (1 - value / scale);

  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  ctx.strokeStyle = "#dde1e6";
  ctx.fillStyle = "#6b7480";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const value = (scale * i) / 4;
    const py = Math.round(y(value)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, py);
    ctx.lineTo(width - right, py);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(formatNumber(value), left - 6, py);
  }
  ctx.textAlign = "center";
  for (const ago of [60, 45, 30, 15, 0]) {
    ctx.fillText(ago ? `-${ago}s` : "now", Math.min(x(now - ago * 1000), width - right - 12), height - bottom / 2);
  }

  const slot = plotWidth / CHART_SECONDS;
  ctx.fillStyle = "rgba(37, 99, 235, 0.25)";
  bars.forEach((count, i) => {
    if (count) ctx.fillRect(left + i * slot + 1, y(count), Math.max(1, slot - 2), y(0) - y(count));
  });

  ctx.strokeStyle = ctx.fillStyle = "#2563eb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, Math.max(left, x(p.time)), y(p.rate)));
  ctx.stroke();
  for (const p of points) ctx.fillRect(Math.max(left, x(p.time)) - 2, y(p.rate) - 2, 4, 4);

  ctx.textAlign = "left";
  ctx.fillStyle = "#2563eb";
  ctx.fillRect(left, 6, 14, 3);
  ctx.fillStyle = "#1d232b";
  ctx.fillText("all channels", left + 20, 8);
  ctx.fillStyle = "rgba(37, 99, 235, 0.25)";
  ctx.fillRect(left + 110, 3, 14, 10);
  ctx.fillStyle = "#1d232b";
  ctx.fillText(tail ? `tail: ${label(tail.channel, tail.room)}` : "tail (none)", left + 130, 8);
}

function niceCeiling(value) {
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

function formatNumber(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

// Wiring

function setText(id, text, isError = false) {
  const element = $(id);
  element.textContent = text;
  if (id === "tail-state" || id === "publish-result") element.className = isError ? "error" : "muted";
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("admin-key").value.trim();
  setText("login-error", "");
  try {
    await signIn(key);
  } catch (error) {
    adminKey = null;
    setText("login-error", error.status === 401 ? "The server does not accept this key." : `Cannot reach the server: ${error.message}`);
  }
});
$("sign-out").addEventListener("click", () => signOut());
$("tail-form").addEventListener("submit", (event) => {
  event.preventDefault();
  startTail($("tail-channel").value, $("tail-room").value.trim());
});
$("tail-clear").addEventListener("click", () => $("tail").replaceChildren());
$("publish-form").addEventListener("submit", publish);
setInterval(() => adminKey && drawChart(), 1000);

const stored = sessionStorage.getItem(KEY_STORAGE);
if (stored) {
  signIn(stored).catch((error) => {
    if (error.status === 401) signOut("The server no longer accepts this key.");
    else setText("login-error", `Cannot reach the server: ${error.message}`);
  });
}

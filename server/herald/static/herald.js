// herald.js: a small browser client for Herald. A plain ES module, no dependencies.
//
//   import { Herald } from "/static/herald.js";
//
//   const herald = new Herald({ key: "..." });      // or { token: "..." }, or { token: async () => "..." }
//   for await (const message of herald.subscribe("news")) console.log(message.payload);
//
//   herald.subscribe("alerts", (message) => show(message), { room: "kitchen" });
//   const id = await herald.publish("news", { hello: "world" });
//   herald.close();
//
// When the connection drops, the client reconnects with jittered exponential
// backoff and subscribes to every topic again with `since` = the last id it
// delivered (and the topic's epoch), so the server replays what was missed.
// Ids at or below the last one delivered are dropped: the app sees each message
// once, in order. When the server cannot vouch for the replay (`recovered:
// false`: history trimmed or lost) the subscription's `onGap` is told.
//
// `publish` is at most once: if the connection drops before the answer, the
// promise rejects (code "disconnected") and the caller decides whether to retry.

const FATAL_CLOSE_CODES = new Set([4001, 4003]); // wrong credentials, forbidden: retrying cannot help

/** An `error` frame from the server, or a request cut short by a disconnect. */
export class HeraldError extends Error {
  constructor(code, detail) {
    super(`${code}: ${detail}`);
    this.name = "HeraldError";
    this.code = code;
    this.detail = detail;
  }
}

/** Compare two message ids ("<milliseconds>-<sequence>"): negative, 0 or positive. */
export function compareIds(a, b) {
  const [aMs, aSeq] = a.split("-").map(BigInt);
  const [bMs, bSeq] = b.split("-").map(BigInt);
  if (aMs !== bMs) return aMs < bMs ? -1 : 1;
  return aSeq === bSeq ? 0 : aSeq < bSeq ? -1 : 1;
}

function topicKey(channel, room) {
  return `${channel}\u0000${room || ""}`;
}

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/connect`;
}

/**
 * A connection to Herald that stays up. Events (EventTarget): "statechange"
 * (`event.detail.state`: "connecting", "connected", "disconnected" or "closed")
 * and "error" (`event.detail.error`, for failures not tied to one request).
 */
export class Herald extends EventTarget {
  #credential;
  #ws = null;
  #subscriptions = new Map(); // topic key -> Subscription
  #pending = new Map(); // request id -> callback(answer frame)
  #waiters = []; // [resolve, reject] of connected()
  #nextId = 1;
  #attempt = 0;
  #retryTimer = null;
  #heartbeat = null;
  #lastHeard = 0;

  /**
   * @param {object} options
   * @param {string} [options.key]         an app key (or channel key)
   * @param {string|function} [options.token]  a user token, or a function giving one (may be async), asked on every connect
   * @param {string} [options.url]         default: /v1/connect on this page's host
   * @param {number} [options.minDelay]    first reconnect delay in ms (default 250)
   * @param {number} [options.maxDelay]    longest reconnect delay in ms (default 10000)
   */
  constructor({ key, token, url, minDelay = 250, maxDelay = 10000, client = "herald.js" } = {}) {
    super();
    if ((key === undefined) === (token === undefined)) throw new TypeError("give a key or a token");
    this.#credential = key !== undefined ? async () => ({ key })
      : async () => ({ token: typeof token === "function" ? await token() : token });
    this.url = url ?? defaultUrl();
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.client = client;
    this.state = "connecting";
    this.connectedFrame = null; // the last `connected` answer (client_id, server, ...)
    this.#open();
  }

  /** Resolves once connected (at once if connected now); rejects if the client is closed. */
  connected() {
    if (this.state === "connected") return Promise.resolve(this);
    if (this.state === "closed") return Promise.reject(new HeraldError("closed", "client closed"));
    return new Promise((resolve, reject) => this.#waiters.push([resolve, reject]));
  }

  /**
   * Subscribe to a channel (and room). With `onMessage` (second argument or option)
   * each message is handed to it; without, iterate the subscription with `for await`.
   * Options: room, since (id to replay after), epoch, onGap(answer), onError(error).
   */
  subscribe(channel, onMessage, options = {}) {
    if (typeof onMessage === "object" && onMessage !== null) [onMessage, options] = [undefined, onMessage];
    const key = topicKey(channel, options.room);
    if (this.#subscriptions.has(key)) throw new Error(`already subscribed to ${channel}`);
    const subscription = new Subscription(this, channel, { onMessage, ...options });
    this.#subscriptions.set(key, subscription);
    if (this.state === "connected") this._subscribe(subscription);
    return subscription;
  }

  /** Publish a payload; resolves to the new message's id. Options: room, metadata. */
  async publish(channel, payload, { room, metadata } = {}) {
    await this.connected();
    const answer = await this._request({ op: "publish", channel, room: room || undefined, payload, metadata });
    return answer.message_id;
  }

  /** Close for good: no reconnect; subscriptions end. */
  close() {
    if (this.state === "closed") return;
    this.#close(new HeraldError("closed", "client closed"));
  }

  // Internals (used by Subscription too).

  _request(frame, onAnswer) {
    const id = this.#nextId++;
    const promise = onAnswer ? null : new Promise((resolve, reject) => {
      onAnswer = (answer) => answer.op === "error" ? reject(new HeraldError(answer.code, answer.detail)) : resolve(answer);
    });
    this.#pending.set(id, onAnswer);
    this.#ws.send(JSON.stringify({ ...frame, id }));
    return promise;
  }

  _subscribe(subscription) {
    const { channel, room, lastId, epoch } = subscription;
    this._request(
      { op: "subscribe", channel, room: room || undefined, since: lastId ?? undefined, epoch: epoch ?? undefined },
      (answer) => subscription._answered(answer),
    );
  }

  _unsubscribe(subscription) {
    const key = topicKey(subscription.channel, subscription.room);
    if (this.#subscriptions.get(key) !== subscription) return;
    this.#subscriptions.delete(key);
    if (this.state === "connected") this._request({ op: "unsubscribe", channel: subscription.channel, room: subscription.room || undefined }, () => {});
  }

  #close(error) {
    this.#setState("closed");
    clearTimeout(this.#retryTimer);
    const ws = this.#ws;
    this.#drop(ws);
    ws?.close(1000);
    for (const [, reject] of this.#waiters.splice(0)) reject(error);
    for (const subscription of this.#subscriptions.values()) subscription._end(error.code === "closed" ? null : error);
    this.#subscriptions.clear();
  }

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("statechange", { detail: { state } }));
  }

  #open() {
    this.#setState("connecting");
    const ws = new WebSocket(this.url, "herald.json");
    this.#ws = ws;
    ws.onopen = async () => {
      let credential;
      try {
        credential = await this.#credential();
      } catch (error) {
        this.#emitError(error);
        ws.close();
        return;
      }
      if (this.#ws === ws) ws.send(JSON.stringify({ op: "connect", id: 0, client: this.client, ...credential }));
    };
    ws.onmessage = (event) => {
      if (this.#ws === ws) this.#receive(JSON.parse(event.data));
    };
    ws.onclose = (event) => {
      if (this.#ws === ws) this.#disconnected(ws, event.code, event.reason);
    };
  }

  #receive(frame) {
    this.#lastHeard = Date.now();
    if (frame.op === "message") {
      this.#subscriptions.get(topicKey(frame.channel, frame.room))?._deliver(frame);
    } else if (frame.op === "connected") {
      this.connectedFrame = frame;
      this.#attempt = 0;
      this.#startHeartbeat(frame.ping_interval);
      this.#setState("connected");
      for (const subscription of this.#subscriptions.values()) this._subscribe(subscription);
      for (const [resolve] of this.#waiters.splice(0)) resolve(this);
    } else if (frame.op === "closed") { // the channel was closed for good
      const key = topicKey(frame.channel, frame.room);
      this.#subscriptions.get(key)?._end(new HeraldError("channel_closed", `channel ${frame.channel} was closed`));
      this.#subscriptions.delete(key);
    } else if (frame.id !== undefined && this.#pending.has(frame.id)) {
      const onAnswer = this.#pending.get(frame.id);
      this.#pending.delete(frame.id);
      onAnswer(frame);
    } else if (frame.op === "error" && frame.id !== 0) { // a refused connect is reported with its close
      this.#emitError(new HeraldError(frame.code, frame.detail));
    }
  }

  // The server pings at the transport level (the browser answers by itself), which
  // the page cannot see; so ask for a pong now and then, and treat a silent link as dead.
  #startHeartbeat(seconds) {
    clearInterval(this.#heartbeat);
    const interval = Math.max(1, seconds || 25) * 1000;
    const ws = this.#ws;
    this.#heartbeat = setInterval(() => {
      if (Date.now() - this.#lastHeard > 2 * interval) {
        this.#disconnected(ws, 1006, "no answer to pings");
        ws.close();
      } else {
        ws.send(JSON.stringify({ op: "ping" }));
      }
    }, interval);
  }

  #drop(ws) {
    if (!ws || this.#ws !== ws) return false;
    this.#ws = null;
    clearInterval(this.#heartbeat);
    for (const onAnswer of this.#pending.values()) onAnswer({ op: "error", code: "disconnected", detail: "the connection closed before the answer" });
    this.#pending.clear();
    return true;
  }

  #disconnected(ws, code, reason) {
    if (!this.#drop(ws) || this.state === "closed") return;
    if (FATAL_CLOSE_CODES.has(code)) {
      const error = new HeraldError(code === 4001 ? "unauthorized" : "forbidden", reason || `closed with ${code}`);
      this.#emitError(error);
      this.#close(error);
      return;
    }
    this.#setState("disconnected");
    // Full backoff doubles per failed attempt up to maxDelay; wait between half of it and all of it.
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this.#attempt++);
    this.#retryTimer = setTimeout(() => this.#open(), ceiling / 2 + Math.random() * ceiling / 2);
  }

  #emitError(error) {
    this.dispatchEvent(new CustomEvent("error", { detail: { error } }));
  }
}

/** One topic's subscription: an async iterable of messages (unless it has onMessage). */
class Subscription {
  #herald;
  #queue = [];
  #wake = null;
  #ready;

  constructor(herald, channel, { room, since, epoch, onMessage, onGap, onError }) {
    this.#herald = herald;
    this.channel = channel;
    this.room = room || "";
    this.lastId = since ?? null; // the last id delivered: `since` of the next subscribe
    this.epoch = epoch ?? null;
    this.position = null; // {offset, epoch} of the last `subscribed` answer
    this.done = false;
    this.error = null;
    this.onMessage = onMessage;
    this.onGap = onGap;
    this.onError = onError;
    let resolve, reject;
    this.#ready = new Promise((res, rej) => { resolve = res; reject = rej; });
    this.#ready.resolve = resolve;
    this.#ready.reject = reject;
    this.#ready.catch(() => {}); // also reported through onError / the iterator
  }

  /** Resolves with the first `subscribed` answer; rejects if the server refuses. */
  get ready() {
    return this.#ready;
  }

  unsubscribe() {
    this.#herald._unsubscribe(this);
    this._end(null);
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  async next() {
    if (this.#queue.length) return { value: this.#queue.shift(), done: false };
    if (this.error) throw this.error;
    if (this.done) return { value: undefined, done: true };
    await new Promise((resolve) => { this.#wake = resolve; });
    return this.next();
  }

  async return() {
    this.unsubscribe();
    return { value: undefined, done: true };
  }

  _answered(answer) {
    if (this.done) return;
    if (answer.op === "error") {
      if (answer.code === "disconnected") return; // subscribed again on the next connect
      this.#herald._unsubscribe(this);
      this._end(new HeraldError(answer.code, answer.detail));
      return;
    }
    if (answer.recovered === false) {
      // The replay that follows is what the server still has. A new epoch means the
      // old ids say nothing about the new history: take the replay as it comes.
      if (this.epoch !== answer.position.epoch) this.lastId = null;
      this.onGap?.(answer);
    }
    if (this.lastId === null && answer.recovered === undefined) this.lastId = answer.position.offset;
    this.epoch = answer.position.epoch;
    this.position = answer.position;
    this.#ready.resolve(answer);
  }

  _deliver(frame) {
    if (this.done) return;
    if (this.lastId !== null && compareIds(frame.id, this.lastId) <= 0) return; // seen already
    this.lastId = frame.id;
    if (this.onMessage) {
      try {
        this.onMessage(frame);
      } catch (error) {
        reportError(error);
      }
      return;
    }
    this.#queue.push(frame);
    this.#wake?.();
    this.#wake = null;
  }

  _end(error) {
    if (this.done) return;
    this.done = true;
    this.error = error;
    if (error) {
      this.#ready.reject(error);
      this.onError?.(error);
    }
    this.#wake?.();
    this.#wake = null;
  }
}

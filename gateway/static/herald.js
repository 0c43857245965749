// Herald browser client: one plain ES module, no dependencies, no build step.
//
//   import { Herald } from "/static/herald.js";
//   const client = Herald.connect({ token, rooms: ["lobby"] });
//   client.on("message", (m) => console.log(m.channel, m.id, m.data));
//   await client.publish("lobby", { text: "hi" });
//
// It resumes from the last id it saw after every reconnect (WebSocket: `since`;
// SSE: EventSource's own Last-Event-ID), backs off with full jitter, asks
// `getToken()` for a new token when the node says 4001, and falls back from
// WebSocket to SSE when WebSockets cannot open ("auto").

/**
 * @typedef {"ws" | "sse" | "auto"} Transport
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} State
 * @typedef {{
 *   url?: string,                       base URL of a node (default: location.origin)
 *   token?: string,
 *   getToken?: () => string | Promise<string>,  called for the first token and after a 4001
 *   rooms?: string[],
 *   transport?: Transport,              default "auto"
 *   events?: string[],                  SSE event names delivered as "message" (default ["message"])
 *   timeout?: number,                   command timeout, ms (default 10000)
 *   minDelay?: number, maxDelay?: number  reconnect backoff bounds, ms (default 500 / 30000)
 * }} Options
 * @typedef {{channel: string | null, id: string | null, event: string, data: any}} Message
 * @typedef {{code: string, message: string, ref?: string}} CommandError
 */

const CONTROL = ["welcome", "reset", "join", "leave", "error"];
const SSE_COMMANDS = "needs the WebSocket transport (SSE is one-way)";

class Client {
  /** @param {Options} opts */
  constructor(opts) {
    this.opts = opts;
    this.base = (opts.url || location.origin).replace(/\/+$/, "");
    this.rooms = new Set(opts.rooms || []);
    /** @type {string | null} the last stream id received: the resume position */
    this.lastId = null;
    /** @type {State} */
    this.state = "connecting";
    /** @type {"ws" | "sse"} */
    this.transport = opts.transport === "sse" ? "sse" : "ws";
    this.token = opts.token || null;
    this.handlers = new Map();
    this.pending = new Map(); // ref -> {resolve, reject, timer}
    this.queue = []; // commands waiting for an open WebSocket
    this.refs = 0;
    this.attempt = 0;
    this.worked = false; // some transport has opened: "auto" stops switching
    this.refreshed = false; // getToken() was called since the last successful open
    this.sock = null; // WebSocket or EventSource
    this.timer = null;
    this.stopped = false;
    this.open();
  }

  /** @param {string} name @param {(value: any) => void} handler */
  on(name, handler) {
    if (!this.handlers.has(name)) this.handlers.set(name, new Set());
    this.handlers.get(name).add(handler);
    return this;
  }

  /** @param {string} name @param {(value: any) => void} handler */
  off(name, handler) {
    this.handlers.get(name)?.delete(handler);
    return this;
  }

  emit(name, value) {
    for (const h of this.handlers.get(name) || []) {
      try { h(value); } catch (err) { setTimeout(() => { throw err; }); }
    }
  }

  setState(state) {
    if (state !== this.state) { this.state = state; this.emit("state", state); }
  }

  /** Join a room; resolves with the ack. */
  subscribe(room) {
    this.rooms.add(room);
    return this.transport === "sse" ? this.reopen() : this.command({ type: "subscribe", room });
  }

  unsubscribe(room) {
    this.rooms.delete(room);
    return this.transport === "sse" ? this.reopen() : this.command({ type: "unsubscribe", room });
  }

  /** Publish into a room; resolves with the ack (its `id`, unless ephemeral). */
  publish(room, data, { event, ephemeral } = {}) {
    return this.command({ type: "publish", room, data, ...(event ? { event } : {}), ...(ephemeral ? { ephemeral } : {}) });
  }

  /** The users present in a room, cluster-wide: resolves with `{room, users}`. */
  presence(room) { return this.command({ type: "presence", room }); }

  /** Mark the user's messages up to `id` read (cluster-wide). */
  read(id) { return this.command({ type: "read", id: String(id) }); }

  ping() { return this.command({ type: "ping" }); }

  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.drop();
    this.failPending("closed", "client closed");
    this.setState("closed");
  }

  // ---- commands -----------------------------------------------------------

  /** @returns {Promise<any>} */
  command(cmd) {
    if (this.transport === "sse") return Promise.reject({ code: "unsupported", message: `${cmd.type} ${SSE_COMMANDS}` });
    if (this.stopped) return Promise.reject({ code: "closed", message: "client closed" });
    return new Promise((resolve, reject) => {
      const ref = String(++this.refs);
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        this.queue = this.queue.filter((c) => c.ref !== ref);
        reject({ code: "timeout", message: `no answer to ${cmd.type} within ${this.opts.timeout || 10000} ms`, ref });
      }, this.opts.timeout || 10000);
      this.pending.set(ref, { resolve, reject, timer });
      const frame = { ...cmd, ref };
      if (this.sock instanceof WebSocket && this.state === "open") this.sock.send(JSON.stringify(frame));
      else this.queue.push(frame);
    });
  }

  answer(frame) {
    const waiting = this.pending.get(frame.ref);
    if (!waiting) return false;
    this.pending.delete(frame.ref);
    clearTimeout(waiting.timer);
    if (frame.type === "error") waiting.reject(frame);
    else waiting.resolve(frame);
    return true;
  }

  failPending(code, message) {
    for (const [ref, w] of this.pending) {
      clearTimeout(w.timer);
      w.reject({ code, message, ref });
    }
    this.pending.clear();
    this.queue = [];
  }

  // ---- connection ---------------------------------------------------------

  async open() {
    if (this.stopped) return;
    if (!this.token && this.opts.getToken) {
      try {
        this.token = await this.opts.getToken();
      } catch (err) {
        this.emit("error", { code: "token", message: `getToken failed: ${err}` });
        this.setState("reconnecting");
        this.timer = setTimeout(() => this.open(), this.backoff());
        return;
      }
    }
    if (this.stopped) return;
    const q = new URLSearchParams({ token: this.token || "" });
    for (const room of this.rooms) q.append("room", room);
    if (this.lastId) q.set("since", this.lastId);
    if (this.transport === "ws") this.openWs(q);
    else this.openSse(q);
  }

  openWs(q) {
    const ws = new WebSocket(`${this.base.replace(/^http/, "ws")}/ws?${q}`);
    this.sock = ws;
    let welcomed = false; // a proxy may accept the upgrade yet pass nothing: only a welcome counts
    ws.onmessage = (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      if (f.type === "welcome") {
        welcomed = true;
        this.opened();
        for (const frame of this.queue.splice(0)) ws.send(JSON.stringify(frame));
      }
      if (f.ref !== undefined && this.answer(f)) {
        if (f.type === "presence") this.emit("presence", f);
        return;
      }
      if (f.type === "message") this.deliver({ channel: f.channel, id: f.id || null, event: f.event, data: f.data });
      else this.emit(f.type, f);
    };
    ws.onclose = (ev) => {
      if (this.sock !== ws) return;
      this.sock = null;
      this.failPending("disconnected", `connection closed (${ev.code})`);
      this.closed(ev.code, ev.reason, welcomed);
    };
  }

  openSse(q) {
    const es = new EventSource(`${this.base}/sse?${q}`);
    this.sock = es;
    const parse = (data) => { try { return JSON.parse(data); } catch { return data; } };
    es.onopen = () => this.opened();
    for (const name of this.opts.events || ["message"]) {
      es.addEventListener(name, (ev) => this.deliver({ channel: null, id: ev.lastEventId || null, event: name, data: parse(ev.data) }));
    }
    for (const name of CONTROL) {
      es.addEventListener(name, (ev) => { if (ev.data !== undefined) this.emit(name, parse(ev.data)); });
    }
    es.onerror = () => {
      // CONNECTING: EventSource retries by itself, sending Last-Event-ID.
      if (es.readyState === EventSource.CONNECTING) { this.setState("reconnecting"); return; }
      // CLOSED: an HTTP error (401, 403, 503…); ask for its status, then decide.
      if (this.sock !== es) return;
      this.sock = null;
      const wasOpen = this.state === "open";
      const probe = new AbortController();
      fetch(es.url, { signal: probe.signal })
        .then(async (r) => {
          if (r.ok) { probe.abort(); return [200, null]; } // a stream again: EventSource will be made anew
          return [r.status, await r.json().catch(() => null)];
        })
        .catch(() => [0, null])
        .then(([status, body]) => {
          const code = { 401: 4001, 403: 4003, 429: 4029 }[status] || (status === 200 ? 1000 : 1006);
          this.closed(code, body?.message || "", wasOpen);
        });
    };
  }

  opened() {
    this.attempt = 0;
    this.worked = true;
    this.refreshed = false;
    this.setState("open");
  }

  /** Full-jitter exponential backoff: a random wait in [0, min(maxDelay, minDelay * 2^attempt)). */
  backoff() {
    const { minDelay = 500, maxDelay = 30000 } = this.opts;
    return Math.random() * Math.min(maxDelay, minDelay * 2 ** this.attempt++);
  }

  deliver(message) {
    if (message.id) this.lastId = message.id;
    this.emit("message", message);
  }

  /** The connection ended with `code`: reconnect, refresh the token, or stop. */
  closed(code, reason, wasOpen) {
    this.emit("close", { code, reason });
    if (this.stopped) return;
    const stop = (why) => { this.stopped = true; this.emit("error", { code: String(code), message: why }); this.setState("closed"); };
    if (code === 4003 || code === 4000) return stop(reason || "forbidden");
    if (code === 4029 && /oldest/.test(reason)) return stop(reason); // replaced: reconnecting would evict another tab
    if (code === 4001) {
      if (!this.opts.getToken || this.refreshed) return stop(reason || "invalid token");
      this.refreshed = true;
      this.token = null; // open() asks getToken() for a new one
      this.setState("reconnecting");
      this.open();
      return;
    }
    if (this.opts.transport === "auto" && !this.worked && !wasOpen) {
      this.transport = this.transport === "ws" ? "sse" : "ws"; // proxies that block upgrades
    }
    let wait;
    if (code === 4008) wait = 0; // slow consumer: resume at once
    else if (code === 1012) wait = Number(/(\d+)\s*ms/.exec(reason)?.[1]) || Math.random() * 1000; // drain hint
    else wait = this.backoff();
    this.setState("reconnecting");
    this.timer = setTimeout(() => this.open(), wait);
  }

  /** Reopen the SSE stream (new room set), resuming from the last id. */
  reopen() {
    this.drop();
    this.setState("reconnecting");
    return new Promise((resolve, reject) => {
      const done = (state) => {
        if (state === "open") resolve({ type: "ack", channels: [...this.rooms].map((r) => `room:${r}`) });
        else if (state === "closed") reject({ code: "closed", message: "connection closed" });
        else return;
        this.off("state", done);
      };
      this.on("state", done);
      this.open();
    });
  }

  drop() {
    const sock = this.sock;
    this.sock = null;
    if (sock) sock.close(...(sock instanceof WebSocket ? [1000] : []));
  }
}

export const Herald = {
  /** @param {Options} opts @returns {Client} */
  connect: (opts = {}) => new Client(opts),
};

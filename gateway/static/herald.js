// Herald browser client: one plain ES module, no dependencies, no build step.
//
//   import { Herald } from "/static/herald.js";
//   const client = Herald.connect({ token, rooms: ["lobby"] });
//   client.on("message", (m) => console.log(m.channel, m.id, m.data));
//   await client.publish("lobby", { text: "hi" });
//   const { messages } = await client.history("lobby", { limit: 50 });  // the newest page, oldest first
//
// It resumes from the last id it saw after every reconnect (`since` in the URL
// of the new WebSocket or EventSource) and names the stream it gave up
// (`replaces`: the node ends that one, so a half-open stream holds none of the
// user's connection places and leaves presence), hands out each channel's
// messages once, backs off with full jitter, asks `getToken()` for a new token when the
// node says 4001, and falls back from WebSocket to SSE when WebSockets cannot
// open ("auto", the default). Over SSE the stream is opened with `envelope=1`
// (each event's data is the frame a WebSocket gets) and commands are posted to
// /api/command: both transports behave the same.
// An open stream that falls silent is asked for a sign of life and, with none,
// reopened: a network switch leaves its socket half-open, which no browser
// reports; coming back online reconnects at once; a page in the back-forward
// cache holds no stream.

/**
 * @typedef {"ws" | "sse" | "auto"} Transport
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} State
 * @typedef {{
 *   url?: string,                       base URL of a node (default: location.origin)
 *   token?: string,
 *   getToken?: () => string | Promise<string>,  called for the first token and after a 4001
 *   rooms?: string[],
 *   transport?: Transport,              default "auto"
 *   events?: string[],                  ignored, kept for old callers: SSE used to need the event
 *                                       names; its events now carry every frame, as on WebSocket
 *   timeout?: number,                   command timeout, and how long a stream may take to send its
 *                                       welcome before it is given up and reopened, ms (default 10000)
 *   maxFrame?: number,                  the nodes' ws.max_frame, bytes (default 65536): a larger command is
 *                                       refused here (`too_large`), not sent: the node would close 1009
 *   minDelay?: number, maxDelay?: number  reconnect backoff bounds, ms (default 500 / 30000)
 *   heartbeat?: number,                 ms of silence on an open stream before it is checked (default 30000;
 *                                       0: never): a WebSocket is sent a `ping`, an SSE stream waits for
 *                                       the node's `keepalive`; nothing within `timeout` ms more: reopened
 * }} Options
 * @typedef {{channel: string | null, id: string | null, event: string, from: string | null, data: any}} Message
 *   from: the user who published it from a client connection, as the node verified it
 *   (null: a backend's message). Over SSE it needs envelope mode, which this client uses.
 * @typedef {{limit?: number, before?: string | number}} PageOptions
 *   limit: messages per page (1 to the node's history.page_max, 200; default 50);
 *   before: an id: the page ends just before it (default: the newest messages)
 * @typedef {{channel: string, messages: Message[]}} HistoryPage
 *   messages oldest first; fewer than `limit` means there is none older
 * @typedef {{code: string, message: string, ref?: string}} CommandError
 */

// The event names of an envelope SSE stream: its frames' types. ("error" is
// also EventSource's own failure event, which carries no data.)
const SSE_FRAMES = ["welcome", "message", "reset", "join", "leave", "presence", "error", "close", "subscribed", "unsubscribed", "keepalive"];
// Commands that act on one stream: over SSE they name it (`conn`, from its welcome).
const ON_STREAM = new Set(["subscribe", "unsubscribe", "refresh"]);
// Refusals of a re-join that pass: the room is asked for again, from the same position.
const PASSING = new Set(["disconnected", "timeout", "unavailable", "rate_limited"]);
// An SSE stream refused with an HTTP status: the close code a WebSocket gets (docs/protocol.md §8).
const REFUSED = { 400: 4000, 401: 4001, 403: 4003, 429: 4029, 500: 1011, 503: 1013 };
/** The close code an SSE open refused with HTTP `status` is read as (protocol §8). Beyond the node's own
 * refusals: a 4xx the same request would get again (a proxy's 414 or 431, a wrong URL's 404) stops, as 4000
 * does; 408 and every 5xx (a proxy's 502 or 504: no node behind it) back off and retry, as 1013. */
const refusedAs = (status) => {
  if (REFUSED[status]) return REFUSED[status];
  if (status === 200) return 1000; // a stream again: it is made anew
  if (status < 400 || status === 408 || status === 421) return 1006; // no answer (0); timed out, or misdirected
  return status < 500 ? 4000 : 1013;
};
// The node read a frame of ours it cannot take (RFC 6455 broken, not UTF-8, over ws.max_frame):
// the same frames would be refused again, so these stop the client, as 4000 does (protocol §8).
const FIX_THE_CLIENT = new Set([1002, 1007, 1009]);
// The largest frame a node takes by default (its ws.max_frame; the welcome does not say).
const MAX_FRAME = 65536;
const REF_ROOM = 20; // bytes a ref of ours may take: the digits of a counter
const MAX_LATE = 1000; // commands timed out on a WebSocket, kept for the effect of their answer
// A stream's query (token, since, rooms) is kept within this many bytes: nginx refuses a request line over
// 8 KB (414, large_client_header_buffers) and the node one over 8190 bytes (414), and every reconnect would
// be refused. Rooms past it are re-joined after the welcome, as the backend's are (`subscribe {room, since}`).
const MAX_QUERY = 6144;

/** Ids are digit strings that may pass 2^53: is `a` after `b`? */
const after = (a, b) => (a.length !== b.length ? a.length > b.length : a > b);
/** A position as an id string, or null (none, or not an id). */
const asId = (v) => (v != null && /^\d+$/.test(String(v)) ? String(v) : null);

/** @returns {Message} a `message` frame as the client hands it out */
const toMessage = (f) => ({
  channel: f.channel ?? null,
  id: f.id || null,
  event: f.event,
  from: typeof f.from === "string" ? f.from : null,
  data: f.data,
});

class Client {
  /** @param {Options} opts */
  constructor(opts) {
    this.opts = opts;
    this.base = (opts.url || location.origin).replace(/\/+$/, "");
    /** Rooms asked for (`rooms`, an acknowledged subscribe): in every stream's URL (while it has room). */
    this.rooms = new Set(opts.rooms || []);
    /** Rooms the backend joined this client to (`subscribed`), and those past MAX_QUERY, re-joined after
     * each welcome: room -> the position its unanswered re-join asked from (undefined: none). */
    this.serverRooms = new Map();
    /** room -> unsubscribes of it sent, not answered: out of the URL and the re-joins until then */
    this.leaving = new Map();
    /** @type {string | null} the last stream id received: the resume position */
    this.lastId = null;
    this.newest = new Map(); // channel -> the largest id handed out: an id not after it is a repeat
    this.replaying = new Map(); // channel -> {since, floor, seen}: a re-join's replay, until answered
    /** @type {string | null} the position the current stream resumed from (its URL's `since`) */
    this.openedFrom = null;
    /** @type {string | null} the largest id the stream has, as far as known: the welcome's
     * `position`, raised by every id received since (null: the node sent no position) */
    this.reach = null;
    /** @type {State} */
    this.state = "connecting";
    this.auto = opts.transport !== "ws" && opts.transport !== "sse";
    /** @type {"ws" | "sse"} */
    this.transport = opts.transport === "sse" ? "sse" : "ws";
    this.token = opts.token || null;
    /** @type {string | null} the stream's id, from its welcome (SSE commands name it) */
    this.conn = null;
    this.handlers = new Map();
    this.pending = new Map(); // ref -> {resolve, reject, timer, effect?, sock?, abort?}
    /** ref -> {effect, sock}: commands with an effect that timed out after they were sent on `sock`: the node
     * runs them all the same, and their answer takes effect when it comes (or null, once `sock` ends). */
    this.late = new Map();
    this.queue = []; // commands waiting for an open stream
    this.posting = Promise.resolve(); // SSE: commands are posted one after the other, in order
    this.refs = 0;
    this.attempt = 0;
    this.worked = false; // some transport has opened: "auto" stops switching
    this.refreshed = false; // getToken() was called since the last successful open
    this.sock = null; // WebSocket or EventSource
    this.timer = null; // the reconnect's wait
    this.heard = 0; // Date.now() of the last frame the open stream brought
    this.probed = null; // Date.now() when its silence was found and a sign of life asked for (null: none)
    this.keepalive = null; // ms between the SSE stream's `keepalive` events (null: none came: an older node)
    this.pulse = null; // the open stream's liveness check
    this.stopped = false;
    // Back online (a network switch, a laptop that wakes): reconnect now, not after the backoff's wait,
    // and ask an open WebSocket for a sign of life (its socket may be on the old network, half-open).
    this.onOnline = () => {
      if (this.stopped) return;
      if (this.sock === null && this.state === "reconnecting" && this.timer !== null) this.retryIn(0);
      else if (this.state === "open" && this.sock instanceof WebSocket && this.probed === null) this.probe();
    };
    // Kept in the back-forward cache, the page holds no stream: the node would count the user present
    // for as long as the page waits there, and an open WebSocket keeps it out of the cache. Back: resumed.
    this.hidden = false; // in the back-forward cache: no stream is opened
    this.onPageHide = (ev) => {
      if (!ev.persisted || this.stopped) return;
      this.hidden = true;
      clearTimeout(this.timer);
      this.timer = null;
      const sock = this.sock;
      this.drop();
      if (sock) this.failPending("disconnected", "the page was left", sock);
      this.setState("reconnecting");
    };
    this.onPageShow = (ev) => {
      if (!ev.persisted || !this.hidden) return;
      this.hidden = false;
      if (!this.stopped) this.retryIn(0);
    };
    this.listen("addEventListener");
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

  /** Join a room; resolves with the ack. Reconnects join it once it is acknowledged (also
   * after the timeout: the node holds it): a room the node refused in a URL would cost the whole
   * connection. The room set follows the answers, which the node sends in the order the commands
   * were sent. */
  subscribe(room) {
    return this.command({ type: "subscribe", room }, (answer) => {
      if (!answer || answer.type === "error") return;
      this.serverRooms.delete(room); // asked for now: in the URL (an unsubscribe sent since is answered after)
      this.rooms.add(room);
    });
  }

  /** Leave a room (one the backend joined too): reconnects no longer join it, also when a
   * subscribe of it sent before is answered after (the node runs the two in order: it is left),
   * or when it gets no answer. Refused `rate_limited`, it was not run: the room is kept (also
   * when that answer comes after the timeout: out of the room set until then). */
  unsubscribe(room) {
    this.leaving.set(room, (this.leaving.get(room) || 0) + 1);
    return this.command({ type: "unsubscribe", room }, (answer) => {
      const underWay = this.leaving.get(room);
      if (underWay > 1) this.leaving.set(room, underWay - 1);
      else this.leaving.delete(room);
      if (answer?.type === "error" && answer.code === "rate_limited") return; // not run (protocol §11.2)
      this.rooms.delete(room);
      this.serverRooms.delete(room);
    });
  }

  /** Replace the stream's token before it expires (and use it for reconnects); resolves with the ack,
   * whose `channels` are the stream's afterwards: the rooms the new token no longer allows are left, and
   * leave the room set. Over a WebSocket also when the ack comes after the timeout: the node took the token
   * (over SSE a timed-out POST is aborted and its answer lost: token and rooms stay as they were). */
  refresh(token) {
    return this.command({ type: "refresh", token }, (answer) => {
      if (!answer || answer.type === "error") return;
      this.token = token;
      if (!Array.isArray(answer.channels)) return;
      const kept = new Set(answer.channels.filter((c) => typeof c === "string" && c.startsWith("room:")).map((c) => c.slice(5)));
      for (const room of [...this.rooms]) if (!kept.has(room)) this.rooms.delete(room);
      for (const room of [...this.serverRooms.keys()]) if (!kept.has(room)) this.serverRooms.delete(room);
    });
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

  /**
   * A page of stored messages, oldest first, as the Message objects `message`
   * events get. Page backwards with `before` = the first id of the previous
   * page; a page shorter than `limit` is the last one. It is read, not
   * delivered: no `message` event, and the resume position does not move.
   *
   *   client.history("lobby", { limit: 50 })            // a room
   *   client.history("lobby", { before: page.messages[0].id })
   *   client.history({ channel: "user" }, { limit: 20 }) // the user's own inbox ("broadcast", "room:<id>" too)
   *
   * @param {string | {channel: string} | {room: string}} from  a room id, or `{channel}` (or `{room}`)
   * @param {PageOptions} [opts]
   * @returns {Promise<HistoryPage>}
   */
  history(from, { limit, before } = {}) {
    const where = typeof from === "object" && from !== null ? from : { room: from };
    const cmd = { type: "history", ...(where.channel !== undefined ? { channel: where.channel } : { room: where.room }) };
    if (limit !== undefined) cmd.limit = limit;
    if (before !== undefined && before !== null) cmd.before = String(before);
    return this.command(cmd).then((f) => ({ channel: f.channel, messages: (f.messages || []).map(toMessage) }));
  }

  close() {
    this.stopped = true;
    this.listen("removeEventListener");
    clearTimeout(this.timer);
    clearTimeout(this.pulse);
    this.drop();
    this.failPending("closed", "client closed");
    this.setState("closed");
  }

  // ---- commands -----------------------------------------------------------

  /** `effect`, if given, is applied once: with the answer (an error frame too) when it comes, also after
   * the timeout if the command was sent on a WebSocket (the node runs it all the same), else with null.
   * @param {(answer: any) => void} [effect] @returns {Promise<any>} */
  command(cmd, effect) {
    if (this.stopped) {
      effect?.(null);
      return Promise.reject({ code: "closed", message: "client closed" });
    }
    return new Promise((resolve, reject) => {
      // Over ws.max_frame the node would close the connection (1009), failing the other commands on
      // it too, and this one would certainly not run: refused here (SSE: the node would answer 413).
      // (Data JSON cannot carry, a BigInt, throws here: the promise rejects with it.)
      const { maxFrame = MAX_FRAME } = this.opts;
      const size = new TextEncoder().encode(JSON.stringify({ ...cmd, ref: "" })).length;
      if (size + REF_ROOM > maxFrame) {
        effect?.(null);
        reject({ code: "too_large", message: `${cmd.type} is ${size} bytes, over the node's ws.max_frame (${maxFrame}): not sent` });
        return;
      }
      const ref = String(++this.refs);
      const timer = setTimeout(() => {
        const waiting = this.pending.get(ref);
        this.pending.delete(ref);
        this.queue = this.queue.filter((c) => c.ref !== ref);
        waiting?.abort?.(); // SSE: its answer is not read
        if (waiting?.effect) this.keepLate(ref, waiting);
        reject({ code: "timeout", message: `no answer to ${cmd.type} within ${this.opts.timeout || 10000} ms`, ref });
      }, this.opts.timeout || 10000);
      this.pending.set(ref, { resolve, reject, timer, effect });
      this.send({ ...cmd, ref });
    });
  }

  /** A command with an effect timed out: sent on a WebSocket, its answer may still come on it. */
  keepLate(ref, { effect, sock }) {
    if (!sock || sock !== this.sock) return effect(null);
    this.late.set(ref, { effect, sock });
    if (this.late.size > MAX_LATE) {
      const [oldest, entry] = this.late.entries().next().value;
      this.late.delete(oldest);
      entry.effect(null);
    }
  }

  /** Send a command on the open stream, else once one is open. */
  send(frame) {
    const waiting = this.pending.get(frame.ref);
    if (!waiting) return;
    if (!this.sock || this.state !== "open") this.queue.push(frame);
    else if (this.sock instanceof WebSocket) {
      waiting.sock = this.sock; // its answer comes on this socket, or never
      this.sock.send(JSON.stringify(frame));
    } else this.posting = this.posting.then(() => this.post(frame)).catch((err) => this.emit("error", { code: "client", message: String(err) }));
  }

  /** SSE: POST one command; its answer (or error) settles its promise. */
  async post(frame) {
    const waiting = this.pending.get(frame.ref);
    if (!waiting) return; // timed out while the commands before it were posted
    if (ON_STREAM.has(frame.type) && this.state !== "open") return this.send(frame); // it names the next stream
    const stream = this.sock;
    const body = ON_STREAM.has(frame.type) ? { ...frame, conn: this.conn } : frame;
    const headers = { "Content-Type": "application/json" };
    const bearer = frame.type === "refresh" ? frame.token : this.token; // the old one may have expired (§2.3)
    if (bearer) headers.Authorization = `Bearer ${bearer}`;
    const abort = new AbortController();
    waiting.abort = () => abort.abort();
    let answer;
    try {
      const r = await fetch(`${this.base}/api/command`, {
        method: "POST", headers, body: JSON.stringify(body), credentials: "same-origin", cache: "no-store", signal: abort.signal,
      });
      answer = await r.json().catch(() => null);
      if (!answer || typeof answer.type !== "string") {
        answer = { type: "error", code: r.status >= 500 ? "unavailable" : "bad_response", message: `HTTP ${r.status} without an answer frame` };
      }
    } catch (err) {
      answer = { type: "error", code: "disconnected", message: `command not sent: ${err}` };
    }
    answer = { ...answer, ref: frame.ref }; // refusals made before the body was read carry no ref
    if (ON_STREAM.has(frame.type) && (answer.code === "not_found" || (answer.type !== "error" && this.sock !== stream))) {
      // The stream it named is gone, or ended while it was on its way: it acted on no stream
      // of ours. Send it again on the next open one (with its conn).
      if (this.sock === stream) {
        this.drop(); // the node no longer knows the stream this client holds: reopen it
        this.closed(1006, "the node no longer knows this stream", true);
      }
      this.send(frame);
    } else if (this.answer(answer) && answer.type === "presence") {
      this.emit("presence", answer);
    }
  }

  answer(frame) {
    const late = this.late.get(frame.ref);
    if (late) {
      this.late.delete(frame.ref);
      late.effect(frame);
      return false; // its caller has gone: handled as an answer to no command, as before
    }
    const waiting = this.pending.get(frame.ref);
    if (!waiting) return false;
    this.pending.delete(frame.ref);
    clearTimeout(waiting.timer);
    waiting.effect?.(frame);
    if (frame.type === "error") waiting.reject(frame);
    else waiting.resolve(frame);
    return true;
  }

  /** Reject the commands sent on `sock` (a WebSocket that closed), or all of them. */
  failPending(code, message, sock) {
    for (const [ref, w] of this.pending) {
      if (sock && w.sock !== sock) continue; // queued: it waits for the next connection
      this.pending.delete(ref);
      clearTimeout(w.timer);
      w.abort?.();
      w.effect?.(null);
      w.reject({ code, message, ref });
    }
    for (const [ref, late] of this.late) {
      if (sock && late.sock !== sock) continue;
      this.late.delete(ref);
      late.effect(null);
    }
    if (!sock) this.queue = [];
  }

  // ---- connection ---------------------------------------------------------

  async open() {
    this.timer = null;
    if (this.stopped || this.hidden) return;
    if (!this.token && this.opts.getToken) {
      try {
        this.token = await this.opts.getToken();
      } catch (err) {
        this.emit("error", { code: "token", message: `getToken failed: ${err}` });
        this.setState("reconnecting");
        this.retryIn(this.backoff());
        return;
      }
    }
    if (this.stopped || this.hidden) return; // (hidden: pageshow opens it)
    const q = new URLSearchParams({ token: this.token || "" });
    // A reconnect names the stream it gave up (the last welcome's): the node ends it and counts it out
    // as it admits this one (protocol §1.4). Named after it ended already, it is ignored.
    const replaces = this.conn ? new URLSearchParams({ replaces: this.conn }).toString().length + 1 : 0;
    let size = q.toString().length + (this.lastId ? this.lastId.length + 7 : 0) + replaces;
    for (const room of this.rooms) {
      if (this.leaving.has(room)) continue;
      size += new URLSearchParams({ room }).toString().length + 1;
      if (size <= MAX_QUERY) q.append("room", room);
      else { this.rooms.delete(room); this.serverRooms.set(room, undefined); } // joined after the welcome
    }
    if (this.lastId) q.set("since", this.lastId);
    if (this.conn) q.set("replaces", this.conn);
    try {
      if (this.transport === "ws") this.openWs(q);
      else this.openSse(q);
    } catch (err) { // a malformed URL, or one the page's CSP forbids: no socket, so no close event
      this.sock = null;
      this.emit("error", { code: "connect", message: `cannot open the ${this.transport} stream: ${err}` });
      this.closed(1006, "", false); // as an unreachable node: auto tries the other transport, else backs off
    }
  }

  openWs(q) {
    const ws = new WebSocket(`${this.base.replace(/^http/, "ws")}/ws?${q}`);
    this.sock = ws;
    let welcomed = false; // a proxy may accept the upgrade yet pass nothing: only a welcome counts
    const due = this.welcomeDue(ws);
    ws.onmessage = (ev) => {
      let f;
      if (this.sock === ws) this.alive();
      try { f = JSON.parse(ev.data); } catch { return; }
      if (f.type === "welcome") { welcomed = true; clearTimeout(due); }
      this.receive(f);
    };
    ws.onclose = (ev) => {
      clearTimeout(due);
      if (this.sock !== ws) return;
      this.sock = null;
      this.failPending("disconnected", `connection closed (${ev.code})`, ws);
      this.closed(ev.code, ev.reason, welcomed);
    };
  }

  openSse(q) {
    q.set("envelope", "1");
    const href = `${this.base}/sse?${q}`;
    const es = new EventSource(href);
    this.sock = es;
    this.keepalive = null; // a node that sends them sends one right after the welcome
    let welcomed = false;
    const due = this.welcomeDue(es);
    const onFrame = (ev) => {
      if (this.sock !== es || typeof ev.data !== "string") return;
      this.alive();
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      if (f.type === "close") { // the node ends the stream, and says why: the WebSocket close rules apply
        clearTimeout(due);
        this.sock = null;
        es.close(); // EventSource would reconnect by itself, with a stale room set
        this.closed(Number(f.code) || 1006, f.reason || "", welcomed);
        return;
      }
      if (f.type === "welcome") { welcomed = true; clearTimeout(due); }
      this.receive(f);
    };
    for (const name of SSE_FRAMES) es.addEventListener(name, onFrame);
    es.onerror = (ev) => {
      if (this.sock !== es || typeof ev.data === "string") return; // a stream's `event: error` is a frame
      clearTimeout(due);
      this.sock = null;
      const refused = es.readyState === EventSource.CLOSED; // an HTTP error (401, 403, 503…), not a lost stream
      es.close(); // this client reopens it (below): the new URL carries the current rooms and position
      if (welcomed || !refused) { this.closed(1006, "", welcomed); return; }
      // Ask for the refusal's status, then decide.
      const probe = new AbortController();
      fetch(href, { signal: probe.signal })
        .then(async (r) => {
          if (r.ok) { probe.abort(); return [200, null]; } // a stream again: it is made anew
          return [r.status, await r.json().catch(() => null)];
        })
        .catch(() => [0, null])
        .then(([status, body]) => {
          const code = refusedAs(status);
          this.closed(code, body?.message || (code === 4000 ? `HTTP ${status}` : ""), false);
        });
    };
  }

  /** A stream with no welcome within `timeout` ms is given up, and another opened: a node that takes
   * connections but answers nothing (a frozen process) would hold it for as long as a proxy in between
   * waits (ops/nginx: an hour), and a proxy that buffers the stream would hold it for good. */
  welcomeDue(sock) {
    const ms = this.opts.timeout || 10000;
    return setTimeout(() => {
      if (this.sock !== sock) return;
      this.drop();
      this.failPending("disconnected", `no welcome within ${ms} ms`, sock);
      this.closed(1006, `no welcome within ${ms} ms`, false);
    }, ms);
  }

  /** One frame from the stream (WebSocket, or an SSE event's data). */
  receive(f) {
    if (f.type === "keepalive") { // SSE only: the node's sign of life, every sse.keepalive seconds
      this.keepalive = Number(f.interval) * 1000 || null;
      return;
    }
    if (f.type === "welcome") {
      this.conn = typeof f.conn === "string" ? f.conn : null;
      this.openedFrom = this.lastId; // what this stream's URL resumed from
      this.reach = asId(f.position);
      if (this.lastId === null && f.position != null) this.lastId = String(f.position);
      this.opened();
      this.watch(this.sock);
      for (const frame of this.queue.splice(0)) this.send(frame);
      for (const room of this.serverRooms.keys()) if (!(f.channels || []).includes(`room:${room}`)) this.rejoin(room);
    }
    if (f.type === "subscribed" && !this.rooms.has(f.room) && !this.serverRooms.has(f.room)) this.serverRooms.set(f.room, undefined);
    if (f.type === "unsubscribed") { this.serverRooms.delete(f.room); this.rooms.delete(f.room); }
    if (f.type === "reset") this.reset(f.channel);
    if (f.ref !== undefined && this.answer(f)) {
      if (f.type === "presence") this.emit("presence", f);
      return;
    }
    if (f.type === "message") this.deliver(toMessage(f));
    else this.emit(f.type, f);
  }

  /** A room the backend joined us to is not in our URL (one the token no longer allows
   * would cost the whole connection): ask for it again with `subscribe {room, since}`,
   * from where the stream resumed, or where an earlier re-join of it that was not
   * answered asked from (the stream's position has moved past the room's messages). */
  rejoin(room, tries = 0) {
    if (!this.serverRooms.has(room) || this.leaving.has(room)) return; // left, or being left, meanwhile
    if (this.serverRooms.get(room) === undefined) this.serverRooms.set(room, this.lastId);
    const since = this.serverRooms.get(room), channel = `room:${room}`, conn = this.conn;
    // Its replay brings ids older than the other channels': each once, the ones handed out already (up to
    // `floor`) not again. From a position past the stream's end (recreated: its ids start over) the count
    // handed out is another stream's: the room's live messages before its reset are new.
    const pastTheEnd = since && this.reach !== null && after(since, this.reach);
    const replay = since && { since, floor: pastTheEnd ? undefined : this.newest.get(channel), seen: new Set() };
    if (replay) this.replaying.set(channel, replay);
    this.command({ type: "subscribe", room, ...(since ? { since } : {}) }).then(
      () => { if (this.serverRooms.has(room)) this.serverRooms.set(room, undefined); },
      (err) => {
        if (!PASSING.has(err.code)) return this.serverRooms.delete(room); // no longer allowed: given up
        if (this.conn !== conn || this.state !== "open") return; // the next stream asks by itself
        const { minDelay = 500, maxDelay = 30000 } = this.opts; // else again on this one, once the refusal has passed
        const wait = Math.max(1000 * (err.retry_after || 0), Math.random() * Math.min(maxDelay, minDelay * 2 ** tries));
        setTimeout(() => { if (this.conn === conn && this.state === "open") this.rejoin(room, tries + 1); }, wait);
      },
    ).finally(() => { if (this.replaying.get(channel) === replay) this.replaying.delete(channel); });
  }

  /** A frame came on the open stream: it is alive. */
  alive() {
    this.heard = Date.now();
    this.probed = null;
  }

  /** Watch the open stream for silence: a half-open connection (a network switch leaves the old socket
   * without a FIN) shows nothing else, and would hold the client for good. Silent `heartbeat` ms (an SSE
   * stream: also twice its keepalive interval; not without one: an older node sends no keepalive events):
   * probed; still silent `timeout` ms later: given up as a close 1006, and reopened. Times are read from
   * the clock, so a page whose timers ran late (a hidden tab, a frozen page) is probed first. */
  watch(sock) {
    const { heartbeat = 30000 } = this.opts;
    clearTimeout(this.pulse);
    this.alive();
    if (!heartbeat) return;
    const ms = this.opts.timeout || 10000;
    const every = Math.min(heartbeat, ms) / 2;
    const check = () => {
      if (this.sock !== sock || this.state !== "open") return;
      const now = Date.now();
      if (this.probed !== null && now - this.probed >= ms) {
        this.drop();
        this.failPending("disconnected", `no sign of life within ${ms} ms`, sock);
        this.closed(1006, `no sign of life within ${ms} ms`, true);
        return;
      }
      const quiet = sock instanceof WebSocket ? heartbeat : this.keepalive && Math.max(heartbeat, 2 * this.keepalive);
      if (this.probed === null && quiet && now - this.heard >= quiet) this.probe();
      this.pulse = setTimeout(check, every);
    };
    this.pulse = setTimeout(check, every);
  }

  /** Ask the open stream for a sign of life: a WebSocket gets a `ping` (its answer, or any frame, is one);
   * an SSE stream's next keepalive is. */
  probe() {
    this.probed = Date.now();
    if (this.sock instanceof WebSocket) this.ping().catch(() => {}); // its failure is the stream's
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

  /** A reset of `channel` (protocol §7.2). For messages no longer held, or lost in transit,
   * the stream is the same and its ids go on: the count handed out stays, or the next resume,
   * which may bring the same reset and the same held messages again, would hand them out twice.
   * For a position past the stream's end (it was recreated: ids start over) the count starts
   * over, and a re-join's replay window closes. The frame does not say which: the position it is
   * about (where the stream resumed from, or the re-join's `since`) is past the end when it is
   * above every id the stream is known to have reached. No `position` from the node: cannot be
   * told, the count starts over. */
  reset(channel) {
    const replay = this.replaying.get(channel);
    const about = replay ? replay.since : this.openedFrom;
    const pastTheEnd = about !== null && this.reach !== null && after(about, this.reach);
    if (pastTheEnd) this.replaying.delete(channel);
    if (pastTheEnd || this.reach === null) this.newest.delete(channel);
  }

  /** Hand a message out, unless its channel had it already (a resume or re-join brings
   * back ids handed out before): each channel's messages come once, in order. */
  deliver(message) {
    const { channel, id } = message;
    if (id) {
      this.lastId = id; // the last id received, repeated or not, is where a resume starts (protocol §7.1)
      if (this.reach !== null && after(id, this.reach)) this.reach = id;
      const newest = this.newest.get(channel), replay = this.replaying.get(channel);
      if (replay) {
        // Live messages of the room may come amid its replay, with larger ids: what was handed out
        // is what came before it (floor) and in it (seen), not every id up to `since`.
        if ((replay.floor && !after(id, replay.floor)) || replay.seen.has(id)) return;
        replay.seen.add(id);
      } else if (newest && !after(id, newest)) return;
      if (!newest || after(id, newest)) this.newest.set(channel, id);
    }
    this.emit("message", message);
  }

  /** The connection ended with `code`: reconnect, refresh the token, or stop. */
  closed(code, reason, wasOpen) {
    this.emit("close", { code, reason });
    if (this.stopped) return;
    const stop = (why) => {
      this.stopped = true;
      this.listen("removeEventListener");
      this.failPending("disconnected", why); // SSE: commands still waiting for a stream
      this.emit("error", { code: String(code), message: why });
      this.setState("closed");
    };
    if (code === 4003 || code === 4000) return stop(reason || "forbidden");
    if (FIX_THE_CLIENT.has(code)) return stop(reason || "the node cannot take a frame of this client");
    if (code === 4403) return stop(reason || "disconnected by the server"); // for good: no new token brings it back
    // Replaced by a newer stream of the user (close-oldest, or a `replaces` naming this one): reconnecting
    // would take a place back from it.
    if (code === 4029 && /oldest|replaced/.test(reason)) return stop(reason);
    if (code === 4001 && !this.opts.token && !this.opts.getToken) {
      // Admitted by the app's cookie (the connect hook): its answer expired. Ask again once.
      if (this.refreshed) return stop(reason || "refused by the app");
      this.refreshed = true;
      this.setState("reconnecting");
      this.retryIn(this.backoff());
      return;
    }
    if (code === 4001) {
      if (!this.opts.getToken || this.refreshed) return stop(reason || "invalid token");
      this.refreshed = true;
      this.token = null; // open() asks getToken() for a new one
      this.setState("reconnecting");
      this.open();
      return;
    }
    if (this.auto && !this.worked && !wasOpen) {
      this.transport = this.transport === "ws" ? "sse" : "ws"; // proxies that block upgrades
    }
    let wait;
    if (code === 4008) wait = 0; // slow consumer: resume at once
    else if (code === 1012) wait = Number(/(\d+)\s*ms/.exec(reason)?.[1]) || Math.random() * 1000; // drain hint
    else wait = this.backoff();
    this.setState("reconnecting");
    this.retryIn(wait);
  }

  /** Add or remove (`how`) the page's listeners: online, pagehide, pageshow. */
  listen(how) {
    globalThis[how]?.("online", this.onOnline);
    globalThis[how]?.("pagehide", this.onPageHide);
    globalThis[how]?.("pageshow", this.onPageShow);
  }

  /** Open the next stream in `wait` ms (one wait at a time: a new one replaces it). */
  retryIn(wait) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => { this.timer = null; this.open(); }, wait);
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

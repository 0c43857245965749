// Loaded before any page script in tests/system/browser/test_client.py: WebSocket,
// EventSource and fetch are scripted fakes, timers wait for the test to run them,
// Math.random is 1 (so a full-jitter backoff waits its whole bound).
(() => {
  const sockets = []; // WebSockets and EventSources, in the order they were made
  const requests = []; // fetch calls
  const timers = [];
  let ids = 0;
  class FakeWebSocket {
    constructor(url) { this.url = new URL(url); this.sent = []; this.closedWith = null; sockets.push(this); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code) { this.closedWith = code; }
    // Driven by the test:
    receive(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
    drop(code, reason = "") { this.onclose({ code, reason }); }
  }
  FakeWebSocket.OPEN = 1;
  class FakeEventSource {
    constructor(url) { this.url = new URL(url); this.readyState = 0; this.closed = false; this.listeners = {}; sockets.push(this); }
    addEventListener(name, fn) { (this.listeners[name] ||= []).push(fn); }
    close() { this.readyState = 2; this.closed = true; }
    dispatch(name, ev) {
      if (this.closed) return;
      for (const fn of this.listeners[name] || []) fn(ev);
      if (name === "error" && this.onerror) this.onerror(ev);
    }
    // Driven by the test: an envelope stream's event (its name is the frame's type)…
    receive(frame) {
      if (this.readyState === 0) { this.readyState = 1; this.onopen?.({}); }
      this.dispatch(frame.type, { type: frame.type, data: JSON.stringify(frame), lastEventId: frame.id || "" });
    }
    // …or a failure: "lost" (EventSource would retry: CONNECTING) or "refused" (an HTTP error: CLOSED).
    fail(how = "lost") { this.readyState = how === "refused" ? 2 : 0; this.dispatch("error", { type: "error" }); }
  }
  FakeEventSource.CONNECTING = 0;
  FakeEventSource.OPEN = 1;
  FakeEventSource.CLOSED = 2;
  window.WebSocket = FakeWebSocket;
  window.EventSource = FakeEventSource;
  window.fetch = (input, init = {}) => new Promise((resolve, reject) => {
    const req = {
      url: new URL(String(input), location.href),
      method: init.method || "GET",
      headers: { ...(init.headers || {}) },
      body: init.body === undefined ? null : JSON.parse(init.body),
      done: false,
      /** Answer with `status` and a JSON body (undefined: a body that is no JSON). */
      respond(status, body) {
        req.done = true;
        const json = async () => { if (body === undefined) throw new SyntaxError("not JSON"); return body; };
        resolve({ ok: status >= 200 && status < 300, status, json });
      },
      fail() { req.done = true; reject(new TypeError("Failed to fetch")); },
    };
    init.signal?.addEventListener("abort", () => { req.done = true; reject(new DOMException("aborted", "AbortError")); });
    requests.push(req);
  });
  window.setTimeout = (fn, ms) => { timers.push({ id: ++ids, fn, ms: Number(ms) || 0 }); return ids; };
  window.clearTimeout = (id) => { const i = timers.findIndex((t) => t.id === id); if (i >= 0) timers.splice(i, 1); };
  Math.random = () => 1;
  window.fake = {
    sockets,
    requests,
    timers,
    last: () => sockets[sockets.length - 1],
    /** The oldest fetch not answered yet. */
    request: () => requests.find((r) => !r.done),
    /** Run the oldest pending timer; returns its delay. */
    fire: () => { const t = timers.shift(); t.fn(); return t.ms; },
    /** Run the newest pending timer (a reconnect, behind command timeouts); returns its delay. */
    fireLast: () => { const t = timers.pop(); t.fn(); return t.ms; },
    /** Resolves after every pending promise callback has run (a macrotask later). */
    settle: () => new Promise((resolve) => { const ch = new MessageChannel(); ch.port1.onmessage = resolve; ch.port2.postMessage(0); }),
  };
})();

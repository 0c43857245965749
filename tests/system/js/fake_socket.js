// Loaded before any page script in tests/system/test_browser_client.py: WebSocket is a
// scripted fake, timers wait for the test to run them, Math.random is 1 (so a
// full-jitter backoff waits its whole bound).
(() => {
  const sockets = [];
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
  window.WebSocket = FakeWebSocket;
  window.setTimeout = (fn, ms) => { timers.push({ id: ++ids, fn, ms: Number(ms) || 0 }); return ids; };
  window.clearTimeout = (id) => { const i = timers.findIndex((t) => t.id === id); if (i >= 0) timers.splice(i, 1); };
  Math.random = () => 1;
  window.fake = {
    sockets,
    timers,
    last: () => sockets[sockets.length - 1],
    /** Run the oldest pending timer; returns its delay. */
    fire: () => { const t = timers.shift(); t.fn(); return t.ms; },
    /** Resolves after every pending promise callback has run (a macrotask later). */
    settle: () => new Promise((resolve) => { const ch = new MessageChannel(); ch.port1.onmessage = resolve; ch.port2.postMessage(0); }),
  };
})();

// Herald browser client (minimal): WebSocket with resume from the last id.
// Usage: const c = Herald.connect({url: location.origin, token, rooms: ["lobby"]});
//        c.on("message", m => ...); c.publish("lobby", {text: "hi"});

/** @typedef {{type: string, channel?: string, id?: string, event?: string, data?: any}} Frame */

export const Herald = {
  /** @param {{url?: string, token: string, rooms?: string[]}} opts */
  connect(opts) {
    const base = (opts.url || location.origin).replace(/^http/, "ws");
    const handlers = {};
    let ws, lastId = null, refs = 0, closed = false, delay = 500;
    const pending = new Map();
    const emit = (name, value) => (handlers[name] || []).forEach((h) => h(value));

    function open() {
      const q = new URLSearchParams({ token: opts.token });
      (opts.rooms || []).forEach((r) => q.append("room", r));
      if (lastId) q.set("since", lastId);
      emit("state", "connecting");
      ws = new WebSocket(`${base}/ws?${q}`);
      ws.onopen = () => { delay = 500; emit("state", "open"); };
      ws.onmessage = (ev) => {
        /** @type {Frame} */ const f = JSON.parse(ev.data);
        if (f.type === "message" && f.id) lastId = f.id;
        if ((f.type === "ack" || f.type === "error" || f.type === "pong") && pending.has(f.ref)) {
          const [ok, fail] = pending.get(f.ref); pending.delete(f.ref);
          f.type === "error" ? fail(f) : ok(f);
        }
        emit(f.type, f);
      };
      ws.onclose = (ev) => {
        emit("close", ev);
        if (closed || ev.code === 4001 || ev.code === 4003) { emit("state", "closed"); return; }
        emit("state", "reconnecting");
        const wait = ev.code === 1012 || ev.code === 4008 ? 100 : Math.random() * delay;
        delay = Math.min(delay * 2, 30000);
        setTimeout(open, wait);
      };
    }

    function send(cmd) {
      return new Promise((resolve, reject) => {
        cmd.ref = String(++refs);
        pending.set(cmd.ref, [resolve, reject]);
        ws.send(JSON.stringify(cmd));
      });
    }

    open();
    return {
      on(name, h) { (handlers[name] = handlers[name] || []).push(h); return this; },
      subscribe: (room) => send({ type: "subscribe", room }),
      unsubscribe: (room) => send({ type: "unsubscribe", room }),
      publish: (room, data, event) => send({ type: "publish", room, data, ...(event ? { event } : {}) }),
      close() { closed = true; ws.close(1000); },
      get lastId() { return lastId; },
    };
  },
};

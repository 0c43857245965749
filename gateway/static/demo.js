// The demo page: sign in with a dev token, chat in a room with presence and a
// typing indicator, user-channel notifications with an unread count. Joining a
// room shows its recent history (marked as such) above the live messages;
// scrolling to the top loads older pages; a reset reloads the newest page.
// Query parameters (handy for links and tests): user, room, transport, ttl (token lifetime, s).
import { Herald } from "/static/herald.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const STORE = "herald-demo";
const TYPING_EVERY = 2000; // ms between our typing announcements
const TYPING_SHOWN = 3500; // ms a typing announcement stays visible
const PAGE = 50; // messages per history page
const NEAR = 40; // px from an edge of the message list that count as "at" it

// What the node takes as a user or room id (docs/protocol.md): checked here, so
// that a bad one from a link or storage is named at sign-in, not closed 4000.
const ID = /^[A-Za-z0-9_:@=+-]{1,128}$/;
const RULE = "letters, digits and _ : @ = + - (1 to 128)";
const badId = (what, value) => (ID.test(value) ? null : `${what} ${JSON.stringify(value)} is not an id: use ${RULE}`);

/** Visible to tests and to the curious in the console. */
const demo = (window.heraldDemo = { client: null, tokens: 0, user: null, room: null });

async function mintToken(user) {
  const body = { user };
  if (params.get("ttl")) body.ttl = Number(params.get("ttl"));
  const r = await fetch("/api/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status === 404 ? "dev tokens are off on this node (run herald dev)" : doc.message || `HTTP ${r.status}`);
  demo.tokens += 1;
  return doc.token;
}

function line(text, { id, cls, who } = {}) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  if (id) { li.dataset.id = id; const s = document.createElement("span"); s.className = "id"; s.textContent = `#${id}`; li.append(s); }
  if (who) { const b = document.createElement("span"); b.className = "who"; b.textContent = who; li.append(b); }
  li.append(document.createTextNode(text));
  return li;
}

function item(parent, text, opts) {
  const li = line(text, opts);
  parent.append(li);
  return li;
}

/** Ids are decimal strings that can pass 2^53: compare them as BigInts. */
const olderThan = (a, b) => BigInt(a) < BigInt(b);

const textOf = (data) => (typeof data === "string" ? data : data && typeof data.text === "string" ? data.text : JSON.stringify(data));

function start({ user, room, transport }, token) {
  Object.assign(demo, { user, room });
  const save = () => localStorage.setItem(STORE, JSON.stringify({ user, room, transport }));
  save();
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("me").hidden = false;
  $("me").textContent = `signed in as ${user}`;
  $("room-name").textContent = room;
  $("pub-room").value = room;

  const client = Herald.connect({ token, getToken: () => mintToken(user), rooms: [room], transport });
  demo.client = client;
  const list = $("messages");
  const present = new Set();
  const typing = new Map(); // user -> timer
  let lastNotification = null;
  let lastTyping = 0;

  const status = () => {
    const badge = $("status");
    badge.dataset.state = client.state;
    badge.textContent = `${client.state} · ${client.transport} · last id ${client.lastId ?? "–"}`;
  };
  const showPresence = () => {
    $("presence").replaceChildren();
    for (const u of [...present].sort()) item($("presence"), u === user ? `${u} (you)` : u);
    $("present-count").textContent = String(present.size);
  };
  const refreshPresence = () => {
    if (client.state !== "open") return;
    const asked = room;
    client.presence(asked).then((p) => {
      if (asked !== room) return;
      present.clear();
      p.users.forEach((u) => present.add(u));
      showPresence();
    }, () => {});
  };
  const showTyping = () => {
    const who = [...typing.keys()];
    $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
  };
  const clearTyping = () => { typing.forEach((t) => clearTimeout(t)); typing.clear(); showTyping(); };
  const setUnread = (n) => {
    $("unread").textContent = String(n);
    $("unread").dataset.zero = String(n === 0);
    $("mark-read").disabled = n === 0;
  };
  const system = (text) => {
    item(list, text, { cls: "system" });
    list.scrollTop = list.scrollHeight;
  };

  // ---- the room's messages: history pages above, live messages below ------
  //
  // `view` is the list of the room being shown. A new one is made when the
  // page joins a room and on a reset of that room; a page of history that
  // comes back for an older view is dropped. Every id is shown once:
  // history and live messages that overlap are deduplicated by id.
  let view = null;
  const EDGE = {
    loading: "loading earlier messages…",
    more: "scroll up for earlier messages",
    start: "start of history",
  };
  const setEdge = (state, text = EDGE[state]) => {
    view.edge.dataset.state = state;
    view.edge.textContent = text;
  };
  const newView = () => {
    const edge = line("", { cls: "history-edge" });
    list.replaceChildren(edge);
    view = { room, edge, shown: new Set(), oldest: null, loaded: false, loading: false, done: false, divider: null, failures: 0 };
    setEdge("loading");
    return view;
  };
  const atBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < NEAR;
  // The author is the message's `from`, the publishing user as the node verified
  // it (a name in the data could be anyone's); a backend's message has none.
  const chatLine = (m, cls) => line(textOf(m.data), { id: m.id || undefined, who: m.from || undefined, cls });
  /** A page of history, oldest first, each in its place by id. */
  const insertHistory = (messages) => {
    let newest = null;
    for (const m of messages) {
      if (!m.id || view.shown.has(m.id)) continue; // already shown live (or from an overlapping page)
      const li = chatLine(m, "history");
      const next = [...list.querySelectorAll("li[data-id]")].find((el) => olderThan(m.id, el.dataset.id));
      if (next) next.before(li);
      else list.append(li);
      view.shown.add(m.id);
      newest = li;
    }
    return newest;
  };
  /** The newest page (`older` false), or the page before the oldest message shown. */
  const loadPage = async (older) => {
    const v = view;
    if (v.loading || (older && (v.done || !v.loaded))) return;
    v.loading = true;
    setEdge("loading");
    let page;
    try {
      page = await client.history(v.room, older ? { limit: PAGE, before: v.oldest } : { limit: PAGE });
    } catch (e) {
      v.loading = false;
      if (v !== view || e.code === "closed") return;
      // Asked again after a backoff (a lost connection: once it is back), or sooner by a scroll.
      const wait = Math.max(Math.min(10000, 500 * 2 ** v.failures++), (e.retry_after || 0) * 1000);
      setEdge("error", `earlier messages unavailable: ${e.message} (trying again)`);
      setTimeout(() => { if (v === view) loadPage(older); }, wait);
      return;
    }
    v.loading = false;
    v.failures = 0;
    if (v !== view) return; // another room, or a reset, meanwhile
    const fromBottom = list.scrollHeight - list.scrollTop;
    const stick = atBottom();
    const newest = insertHistory(page.messages);
    if (page.messages.length) v.oldest = page.messages[0].id;
    v.done = page.messages.length < PAGE;
    if (!older) {
      v.loaded = true;
      if (newest && !v.divider) {
        v.divider = line("↑ earlier messages", { cls: "divider" });
        const last = [...list.querySelectorAll("li.history")].pop();
        last.after(v.divider);
      }
    }
    setEdge(v.done ? "start" : "more");
    if (!older || stick) list.scrollTop = list.scrollHeight;
    else list.scrollTop = list.scrollHeight - fromBottom; // what the user was looking at stays in place
    if (!v.done && list.clientHeight > 0 && list.scrollHeight <= list.clientHeight) loadPage(true); // nothing to scroll yet: fill the list
  };
  list.onscroll = () => { if (list.scrollTop < NEAR) loadPage(view.loaded); };
  /** A live message of the room (or broadcast) below the others, unless it is shown already. */
  const showLive = (m) => {
    if (m.id && view.shown.has(m.id)) return;
    const stick = atBottom();
    list.append(chatLine(m));
    if (m.id) view.shown.add(m.id);
    if (stick) list.scrollTop = list.scrollHeight;
  };
  const showRoom = () => {
    demo.room = room;
    $("room-name").textContent = room;
    $("pub-room").value = room;
    $("join-room").value = "";
    present.clear();
    present.add(user);
    showPresence();
    clearTyping();
    newView();
    loadPage(false); // asked now, sent once the stream is open
  };
  showRoom();

  client
    .on("state", (s) => {
      status();
      if (s === "open") {
        present.add(user);
        showPresence();
        refreshPresence();
        if (!view.loaded) loadPage(false); // its first request was lost with the connection
      }
    })
    .on("message", (m) => {
      status();
      if (m.channel === "user") {
        item($("notifications"), textOf(m.data), { id: m.id, cls: "unread" });
        lastNotification = m.id || lastNotification;
        setUnread($("notifications").querySelectorAll(".unread").length);
      } else if (m.channel !== `room:${room}` && m.channel !== "broadcast") {
        // a room left a moment ago
      } else if (m.event === "typing") {
        const who = m.from;
        if (!who || who === user) return;
        clearTimeout(typing.get(who));
        typing.set(who, setTimeout(() => { typing.delete(who); showTyping(); }, TYPING_SHOWN));
        showTyping();
      } else {
        const who = m.from;
        if (who && typing.has(who)) { clearTimeout(typing.get(who)); typing.delete(who); showTyping(); }
        showLive(m);
      }
    })
    .on("join", (j) => { if (j.room === room) { present.add(j.user); showPresence(); } })
    .on("leave", (l) => { if (l.room === room) { present.delete(l.user); showPresence(); } })
    .on("reset", (r) => {
      // Messages of the room were lost to this page: what the node still
      // holds is its history, so show the newest page again.
      if (r.channel === `room:${room}`) { newView(); loadPage(false); }
      // The user's notifications start over with the messages that follow: those
      // shown may be gone, or be of a stream made anew (a restarted herald dev),
      // whose ids start over (a read of an old id would be refused).
      if (r.channel === "user") { $("notifications").replaceChildren(); lastNotification = null; setUnread(0); }
    })
    .on("error", (e) => { if (!e.ref) system(`error: ${e.message}`); });
  const presenceTimer = setInterval(refreshPresence, 15000);

  $("join").onsubmit = (ev) => {
    ev.preventDefault();
    const next = $("join-room").value.trim();
    if (!next || next === room) return;
    const left = room;
    room = next;
    save();
    client.subscribe(next).then(
      () => { client.unsubscribe(left).catch(() => {}); refreshPresence(); },
      (e) => { if (room === next) system(`could not join ${next}: ${e.message}`); },
    );
    showRoom(); // its history is asked after the subscribe: commands go in order
  };
  $("say").onsubmit = (ev) => {
    ev.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    client.publish(room, { text }, { event: "chat" }).then(
      () => { $("text").value = ""; },
      (e) => system(`not sent: ${e.message}`),
    );
  };
  $("text").oninput = () => {
    if (Date.now() - lastTyping < TYPING_EVERY) return;
    lastTyping = Date.now();
    client.publish(room, {}, { event: "typing", ephemeral: true }).catch(() => {});
  };
  $("mark-read").onclick = () => {
    if (!lastNotification) return;
    client.read(lastNotification).then(() => {
      $("notifications").querySelectorAll(".unread").forEach((li) => li.classList.remove("unread"));
      setUnread(0);
    }, (e) => system(`mark read failed: ${e.message}`));
  };
  $("publish").onsubmit = (ev) => {
    ev.preventDefault();
    let data;
    try { data = JSON.parse($("pub-data").value); } catch { $("pub-result").textContent = "data is not valid JSON"; return; }
    client.publish($("pub-room").value.trim(), data, { event: $("pub-event").value.trim() || undefined }).then(
      (ack) => { $("pub-result").textContent = `published, id ${ack.id ?? "(ephemeral)"}`; },
      (e) => { $("pub-result").textContent = `refused: ${e.message}`; },
    );
  };
  $("signout").onclick = () => {
    clearInterval(presenceTimer);
    client.close();
    localStorage.removeItem(STORE);
    location.search = "";
  };
  status();
}

async function signIn(choice) {
  $("signin-error").textContent = "";
  const bad = badId("name", choice.user) || badId("room", choice.room);
  if (bad) {
    $("name").value = choice.user;
    $("room").value = choice.room;
    $("signin-error").textContent = `Could not sign in: ${bad}`;
    return;
  }
  try {
    start(choice, await mintToken(choice.user));
  } catch (err) {
    $("signin").hidden = false;
    $("signin-error").textContent = `Could not sign in: ${err.message}`;
  }
}

// The browser's own "Please match the requested format" does not say which format.
for (const [field, what] of [["name", "name"], ["room", "room"], ["join-room", "room"]]) {
  const input = $(field);
  input.oninput = () => input.setCustomValidity(input.value && badId(what, input.value.trim()) ? `A ${what} may only use ${RULE}` : "");
}

$("signin").onsubmit = (ev) => {
  ev.preventDefault();
  signIn({ user: $("name").value.trim(), room: $("room").value.trim(), transport: $("transport").value });
};

const saved = JSON.parse(localStorage.getItem(STORE) || "null");
const wanted = params.get("user")
  ? { user: params.get("user"), room: params.get("room") || "lobby", transport: params.get("transport") || "auto" }
  : saved;
if (wanted) signIn(wanted);

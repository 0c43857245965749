// The demo page: sign in with a dev token, chat in a room with presence and a
// typing indicator, user-channel notifications with an unread count.
// Query parameters (handy for links and tests): user, room, transport, ttl (token lifetime, s).
import { Herald } from "/static/herald.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const STORE = "herald-demo";
const TYPING_EVERY = 2000; // ms between our typing announcements
const TYPING_SHOWN = 3500; // ms a typing announcement stays visible

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

function item(parent, text, { id, cls, who } = {}) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  if (id) { li.dataset.id = id; const s = document.createElement("span"); s.className = "id"; s.textContent = `#${id}`; li.append(s); }
  if (who) { const b = document.createElement("span"); b.className = "who"; b.textContent = who; li.append(b); }
  li.append(document.createTextNode(text));
  parent.append(li);
  return li;
}

const textOf = (data) => (typeof data === "string" ? data : data && typeof data.text === "string" ? data.text : JSON.stringify(data));

function start({ user, room, transport }, token) {
  Object.assign(demo, { user, room });
  localStorage.setItem(STORE, JSON.stringify({ user, room, transport }));
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("me").hidden = false;
  $("me").textContent = `signed in as ${user}`;
  $("room-name").textContent = room;
  $("pub-room").value = room;

  const client = Herald.connect({ token, getToken: () => mintToken(user), rooms: [room], transport });
  demo.client = client;
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
    client.presence(room).then((p) => { present.clear(); p.users.forEach((u) => present.add(u)); showPresence(); }, () => {});
  };
  const showTyping = () => {
    const who = [...typing.keys()];
    $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
  };
  const setUnread = (n) => {
    $("unread").textContent = String(n);
    $("unread").dataset.zero = String(n === 0);
    $("mark-read").disabled = n === 0;
  };

  client
    .on("state", (s) => {
      status();
      if (s === "open") { present.add(user); showPresence(); refreshPresence(); }
    })
    .on("message", (m) => {
      status();
      if (m.channel === "user") {
        item($("notifications"), textOf(m.data), { id: m.id, cls: "unread" });
        lastNotification = m.id || lastNotification;
        setUnread($("notifications").querySelectorAll(".unread").length);
      } else if (m.event === "typing") {
        const who = m.data && m.data.user;
        if (!who || who === user) return;
        clearTimeout(typing.get(who));
        typing.set(who, setTimeout(() => { typing.delete(who); showTyping(); }, TYPING_SHOWN));
        showTyping();
      } else {
        const who = m.data && typeof m.data.user === "string" ? m.data.user : null;
        if (who && typing.has(who)) { clearTimeout(typing.get(who)); typing.delete(who); showTyping(); }
        item($("messages"), textOf(m.data), { id: m.id, who: who || undefined });
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    })
    .on("join", (j) => { present.add(j.user); showPresence(); })
    .on("leave", (l) => { present.delete(l.user); showPresence(); })
    .on("reset", (r) => item($("messages"), `messages were lost (${r.reason || "history expired"}); older ones are not shown`, { cls: "system" }))
    .on("error", (e) => { if (!e.ref) item($("messages"), `error: ${e.message}`, { cls: "system" }); });
  const presenceTimer = setInterval(refreshPresence, 15000);

  $("say").onsubmit = (ev) => {
    ev.preventDefault();
    const text = $("text").value.trim();
    if (!text) return;
    client.publish(room, { user, text }, { event: "chat" }).then(
      () => { $("text").value = ""; },
      (e) => item($("messages"), `not sent: ${e.message}`, { cls: "system" }),
    );
  };
  $("text").oninput = () => {
    if (Date.now() - lastTyping < TYPING_EVERY) return;
    lastTyping = Date.now();
    client.publish(room, { user }, { event: "typing", ephemeral: true }).catch(() => {});
  };
  $("mark-read").onclick = () => {
    if (!lastNotification) return;
    client.read(lastNotification).then(() => {
      $("notifications").querySelectorAll(".unread").forEach((li) => li.classList.remove("unread"));
      setUnread(0);
    }, (e) => item($("messages"), `mark read failed: ${e.message}`, { cls: "system" }));
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
  try {
    start(choice, await mintToken(choice.user));
  } catch (err) {
    $("signin").hidden = false;
    $("signin-error").textContent = `Could not sign in: ${err.message}`;
  }
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

"""Authentication and the id boundary, against real nodes over real sockets.

Bad tokens are refused (WS close 4001, SSE 401 with a JSON reason), the
accepted algorithm is pinned by the configured key (no ``alg: none``, no
HS/RS confusion), tokens come from query, header or cookie but never two
different ones, rooms and channels outside ``[A-Za-z0-9_:@=+-]{1,128}`` are
refused at every edge, and none of it can ever widen a NATS subscription.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict

from broker.embedded import NatsServer
from gateway.auth import mint_token

from ..helpers import (
    ADMIN_KEY,
    PUBLISH_HEADERS,
    PUBLISH_KEY,
    SECRET,
    NodeFactory,
    RunningNode,
    SseClient,
    api_publish,
    expect_close,
    recv_json,
    recv_until,
    scrape,
    token,
    wait_for,
)

Params = list[tuple[str, str]]

OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"
HS256 = {"alg": "HS256", "typ": "JWT"}

# Ids that must never reach a subject: separators, wildcards, spaces, empty,
# too long, non-ASCII.
BAD_IDS = ["a.b", "*", ">", "lobby.*", "lobby.>", "a>", "a*", "a b", " ", "", "r" * 129, "caf\u00e9", "a/b"]


# -- tokens ---------------------------------------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A JWT built by hand: HMAC-SHA256 over the signing input, or an empty
    signature when ``hmac_key`` is None."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(user: Any = "alice", ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + ttl, "rooms": ["*"], **extra}


def _without_sub() -> str:
    c = claims()
    del c["sub"]
    return jwt.encode(c, SECRET, algorithm="HS256")


# kind -> (token factory, herald_auth_failures_total reason)
BAD_TOKENS: dict[str, tuple[Callable[[], str | None], str]] = {
    "missing": (lambda: None, "missing"),
    "garbage": (lambda: "not-a-jwt", "malformed"),
    "forged": (lambda: token("alice", key=OTHER_SECRET), "bad_signature"),
    "tampered": (lambda: handmade(HS256, claims(), OTHER_SECRET.encode()), "bad_signature"),
    "expired": (lambda: token("alice", ttl=-30), "expired"),
    "not_yet_valid": (lambda: token("alice", nbf=int(time.time()) + 600), "not_yet_valid"),
    "alg_none": (lambda: handmade({"alg": "none", "typ": "JWT"}, claims()), "bad_algorithm"),
    "alg_None": (lambda: handmade({"alg": "None", "typ": "JWT"}, claims()), "bad_algorithm"),
    "hs512": (lambda: jwt.encode(claims(), SECRET, algorithm="HS512"), "bad_algorithm"),
    "no_sub": (_without_sub, "bad_claims"),
    "sub_dot": (lambda: token("a.b"), "bad_claims"),
    "sub_star": (lambda: token("*"), "bad_claims"),
    "sub_gt": (lambda: token(">"), "bad_claims"),
    "sub_space": (lambda: token("a b"), "bad_claims"),
    "sub_empty": (lambda: token(""), "bad_claims"),
    "sub_129": (lambda: token("u" * 129), "bad_claims"),
    "sub_not_string": (
        lambda: handmade(HS256, claims(user=7), SECRET.encode()),
        "malformed",
    ),
    "rooms_wildcard": (lambda: token("alice", rooms=["lobby.>"]), "bad_claims"),
    "rooms_not_ids": (lambda: handmade(HS256, claims(rooms=[{"a": 1}]), SECRET.encode()), "bad_claims"),
    "publish_wildcard": (lambda: token("alice", publish=["a.*"]), "bad_claims"),
}


# -- clients --------------------------------------------------------------------


def query(tok: str | None, rooms: Sequence[str] = ()) -> Params:
    return ([("token", tok)] if tok is not None else []) + [("room", r) for r in rooms]


async def open_ws(
    http: aiohttp.ClientSession,
    node: RunningNode,
    tok: str,
    rooms: Sequence[str] = (),
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await http.ws_connect(node.ws_url, params=query(tok, rooms))
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def ws_refusal(
    http: aiohttp.ClientSession, node: RunningNode, params: Params, headers: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """Upgrade, then expect the server to close at once: (code, reason)."""
    async with http.ws_connect(node.ws_url, params=params, headers=headers) as ws:
        return await expect_close(ws, timeout=3.0)


@dataclass
class HttpAnswer:
    status: int
    body: Any


async def sse_refusal(
    http: aiohttp.ClientSession, node: RunningNode, params: Params, headers: Mapping[str, str] | None = None
) -> HttpAnswer:
    async with http.get(node.url + "/sse", params=params, headers=headers) as resp:
        # Never read the body of an accepted stream: it does not end.
        assert resp.content_type == "application/json", (resp.status, resp.content_type)
        return HttpAnswer(resp.status, await resp.json())


async def publish_api(
    http: aiohttp.ClientSession, node: RunningNode, body: Any, headers: dict[str, str] | None = None
) -> HttpAnswer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = PUBLISH_HEADERS if headers is None else headers
    async with http.post(node.url + "/api/publish", data=data, headers=h) as resp:
        return HttpAnswer(resp.status, await resp.json(content_type=None))


def failures(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(f'herald_auth_failures_total{{reason="{reason}"}}', 0.0)


async def live_subjects(nats_server: NatsServer, node: RunningNode) -> list[str]:
    """Every subscription subject, on any NATS client, under the node's live prefix."""
    prefix = node.settings.live_prefix + "."
    url = f"http://127.0.0.1:{nats_server.monitor_port}/connz?subs=1&limit=100000"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        doc = await resp.json()
    subjects = [sub for conn in doc.get("connections") or [] for sub in conn.get("subscriptions_list") or []]
    return [s for s in subjects if s.startswith(prefix)]


# -- keys -----------------------------------------------------------------------


@dataclass
class KeyPair:
    private_pem: str
    public_pem: str
    public_path: Path


def _keypair(private: Any, path: Path) -> KeyPair:
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path.write_text(public_pem)
    return KeyPair(private_pem, public_pem, path)


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _keypair(key, tmp_path_factory.mktemp("rsa") / "public.pem")


@pytest.fixture(scope="module")
def other_rsa_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _keypair(key, tmp_path_factory.mktemp("rsa2") / "public.pem")


@pytest.fixture(scope="module")
def ec_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    return _keypair(key, tmp_path_factory.mktemp("ec") / "public.pem")


@pytest.fixture
async def rs_node(node_factory: NodeFactory, rsa_key: KeyPair) -> RunningNode:
    return await node_factory(jwt={"secret": "", "public_key": str(rsa_key.public_path)})  # type: ignore[no-any-return]


@pytest.fixture
async def es_node(node_factory: NodeFactory, ec_key: KeyPair) -> RunningNode:
    return await node_factory(jwt={"secret": "", "public_key": str(ec_key.public_path)})  # type: ignore[no-any-return]


@pytest.fixture
async def sse_streams() -> AsyncIterator[list[aiohttp.ClientResponse]]:
    """Open SSE responses to release at the end of a test."""
    streams: list[aiohttp.ClientResponse] = []
    yield streams
    for resp in streams:
        resp.close()


# -- 1. bad tokens ----------------------------------------------------------------


async def test_handmade_token_with_right_secret_is_accepted(node: RunningNode, http: aiohttp.ClientSession) -> None:
    # Control for the forging helper: the refused handmade tokens below are
    # refused for what is wrong with them, not for being handmade.
    tok = handmade(HS256, claims("alice"), SECRET.encode())
    ws, welcome = await open_ws(http, node, tok)
    assert welcome["user"] == "alice"
    await ws.close()


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_token_is_refused_on_ws_and_sse(kind: str, node: RunningNode, http: aiohttp.ClientSession) -> None:
    make, reason = BAD_TOKENS[kind]
    params = query(make())
    code, message = await ws_refusal(http, node, params)
    assert code == 4001, (code, message)
    assert message  # the close reason says why
    answer = await sse_refusal(http, node, params)
    assert answer.status == 401
    assert answer.body["error"] == "bad_token"
    assert isinstance(answer.body["message"], str) and answer.body["message"]
    metrics = await scrape(http, node.url)
    assert failures(metrics, reason) == 2, {k: v for k, v in metrics.items() if "auth_failures" in k}
    await wait_for(lambda: not node.node.sessions)
    assert node.node.broker.stats().subscriptions == 0


async def test_longest_valid_ids_are_accepted(node: RunningNode, http: aiohttp.ClientSession) -> None:
    user, room = "u" * 128, "r" * 128
    ws, welcome = await open_ws(http, node, token(user), [room])
    assert welcome["user"] == user
    assert f"room:{room}" in welcome["channels"]
    await ws.close()


async def test_audience_and_issuer_are_checked_when_configured(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(jwt={"audience": "herald", "issuer": "https://auth.example"})
    good = {"aud": "herald", "iss": "https://auth.example"}
    ws, _ = await open_ws(http, node, token("alice", **good))
    await ws.close()
    bad = [
        {"iss": "https://auth.example"},  # no aud
        {"aud": "other", "iss": "https://auth.example"},
        {"aud": "herald"},  # no iss
        {"aud": "herald", "iss": "https://evil.example"},
    ]
    for extra in bad:
        tok = token("alice", **extra)
        assert (await ws_refusal(http, node, query(tok)))[0] == 4001, extra
        assert (await sse_refusal(http, node, query(tok))).status == 401, extra


# -- 2. algorithm pinned by the key ---------------------------------------------


async def test_rs256_node_accepts_rs256_and_refuses_key_confusion(
    rs_node: RunningNode, rsa_key: KeyPair, other_rsa_key: KeyPair, http: aiohttp.ClientSession
) -> None:
    good = mint_token(rsa_key.private_pem, "alice", ["*"], algorithm="RS256")
    ws, welcome = await open_ws(http, rs_node, good)
    assert welcome["user"] == "alice"
    await ws.close()
    sse = await http.get(rs_node.url + "/sse", params=query(good))
    assert sse.status == 200
    sse.close()

    header = {"alg": "HS256", "typ": "JWT"}
    refused = {
        # The classic confusion: HMAC keyed with the public key text (with and
        # without the trailing newline, as attackers try both).
        "hs256_public_pem": handmade(header, claims(), rsa_key.public_pem.encode()),
        "hs256_public_pem_stripped": handmade(header, claims(), rsa_key.public_pem.strip().encode()),
        "hs256_test_secret": token("alice"),
        "alg_none": handmade({"alg": "none", "typ": "JWT"}, claims()),
        "ps256_same_key": mint_token(rsa_key.private_pem, "alice", ["*"], algorithm="PS256"),
        "rs256_other_key": mint_token(other_rsa_key.private_pem, "alice", ["*"], algorithm="RS256"),
        "rs256_bad_sub": mint_token(rsa_key.private_pem, "*", ["*"], algorithm="RS256"),
    }
    for kind, tok in refused.items():
        assert (await ws_refusal(http, rs_node, query(tok)))[0] == 4001, kind
        answer = await sse_refusal(http, rs_node, query(tok))
        assert (answer.status, answer.body["error"]) == (401, "bad_token"), kind
    metrics = await scrape(http, rs_node.url)
    assert failures(metrics, "bad_algorithm") == 2 * 5
    assert failures(metrics, "bad_signature") == 2
    assert failures(metrics, "bad_claims") == 2
    await wait_for(lambda: not rs_node.node.sessions)


async def test_es256_node_accepts_es256_and_refuses_rs256(
    es_node: RunningNode, ec_key: KeyPair, rsa_key: KeyPair, http: aiohttp.ClientSession
) -> None:
    good = mint_token(ec_key.private_pem, "alice", ["*"], algorithm="ES256")
    ws, welcome = await open_ws(http, es_node, good)
    assert welcome["user"] == "alice"
    await ws.close()
    refused = {
        "rs256": mint_token(rsa_key.private_pem, "alice", ["*"], algorithm="RS256"),
        "hs256_public_pem": handmade(HS256, claims(), ec_key.public_pem.encode()),
        "alg_none": handmade({"alg": "none", "typ": "JWT"}, claims()),
    }
    for kind, tok in refused.items():
        assert (await ws_refusal(http, es_node, query(tok)))[0] == 4001, kind
        assert (await sse_refusal(http, es_node, query(tok))).status == 401, kind
    assert failures(await scrape(http, es_node.url), "bad_algorithm") == 2 * 3


# -- 3. where the token comes from ----------------------------------------------


@pytest.mark.parametrize("where", ["query", "header", "cookie"])
async def test_token_from_query_header_or_cookie(
    where: str, node: RunningNode, http: aiohttp.ClientSession, sse_streams: list[aiohttp.ClientResponse]
) -> None:
    tok = token("alice", rooms=["lobby"])
    params: Params = [("room", "lobby")]
    headers: dict[str, str] = {}
    if where == "query":
        params.append(("token", tok))
    elif where == "header":
        headers["Authorization"] = f"Bearer {tok}"
    else:
        headers["Cookie"] = f"herald_token={tok}"
    ws = await http.ws_connect(node.ws_url, params=params, headers=headers)
    welcome = await recv_json(ws)
    assert (welcome["type"], welcome["user"]) == ("welcome", "alice")
    assert "room:lobby" in welcome["channels"]
    resp = await http.get(node.url + "/sse", params=params, headers=headers)
    sse_streams.append(resp)
    assert resp.status == 200, await resp.text()
    # Both sessions in the local index and the NATS subscriptions held before publishing.
    await wait_for(lambda: len(node.node.sessions) == 2 and all(len(s.channels) == 3 for s in node.node.sessions))
    await wait_for(lambda: node.node.broker.stats().subscriptions == 3)
    async with http.post(
        node.url + "/api/publish", json={"channel": "user:alice", "data": {"via": where}}, headers=PUBLISH_HEADERS
    ) as r:
        assert r.status == 200
    assert (await recv_until(ws, "message"))["data"] == {"via": where}
    assert (await SseClient(resp).next()).json() == {"via": where}
    await ws.close()


async def test_same_token_in_two_places_is_fine(node: RunningNode, http: aiohttp.ClientSession) -> None:
    tok = token("alice")
    headers = {"Authorization": f"Bearer {tok}", "Cookie": f"herald_token={tok}"}
    ws = await http.ws_connect(node.ws_url, params=query(tok), headers=headers)
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.close()


@pytest.mark.parametrize(
    "places",
    [("query", "header"), ("query", "cookie"), ("header", "cookie")],
    ids=lambda p: "+".join(p),
)
async def test_two_different_tokens_are_refused(
    places: tuple[str, str], node: RunningNode, http: aiohttp.ClientSession
) -> None:
    # Both tokens are valid on their own, and even for the same user.
    first, second = token("alice"), token("alice", ttl=7200, jti="other")
    assert first != second
    params: Params = []
    headers: dict[str, str] = {}
    for place, tok in zip(places, (first, second), strict=True):
        if place == "query":
            params.append(("token", tok))
        elif place == "header":
            headers["Authorization"] = f"Bearer {tok}"
        else:
            headers["Cookie"] = f"herald_token={tok}"
    code, _ = await ws_refusal(http, node, params, headers)
    assert code == 4001
    answer = await sse_refusal(http, node, params, headers)
    assert (answer.status, answer.body["error"]) == (401, "bad_token")
    assert answer.body["message"]
    assert failures(await scrape(http, node.url), "conflicting") == 2
    await wait_for(lambda: not node.node.sessions)


@pytest.mark.parametrize("place", ["query", "header", "cookie"])
async def test_two_different_tokens_in_one_source_are_refused(
    place: str, node: RunningNode, http: aiohttp.ClientSession
) -> None:
    good, forged = token("alice"), token("mallory", key=OTHER_SECRET)
    params: Params = []
    headers: CIMultiDict[str] = CIMultiDict()
    if place == "query":
        params = [("token", good), ("token", forged)]
    elif place == "header":
        headers.add("Authorization", f"Bearer {good}")
        headers.add("Authorization", f"Bearer {forged}")
    else:
        headers["Cookie"] = f"herald_token={forged}; herald_token={good}"  # the last one wins today
    answer = await sse_refusal(http, node, params, headers)
    assert answer.status == 401
    assert (await ws_refusal(http, node, params, headers))[0] == 4001


async def test_stale_forged_cookie_does_not_lose_to_valid_query_token(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    params = query(token("alice"))
    headers = {"Cookie": f"herald_token={token('mallory', key=OTHER_SECRET)}"}
    assert (await ws_refusal(http, node, params, headers))[0] == 4001
    assert (await sse_refusal(http, node, params, headers)).status == 401


# -- 4. rooms -------------------------------------------------------------------


async def test_room_outside_token_rooms_is_forbidden(node: RunningNode, http: aiohttp.ClientSession) -> None:
    tok = token("alice", rooms=["team-*", "lobby"])
    ws, welcome = await open_ws(http, node, tok, ["team-a", "lobby"])
    assert {"room:team-a", "room:lobby"} <= set(welcome["channels"])
    await ws.close()
    for rooms in (["general"], ["team"], ["lobby2"], ["xteam-a"], ["team-a", "general"]):
        code, message = await ws_refusal(http, node, query(tok, rooms))
        assert code == 4003, (rooms, code, message)
        answer = await sse_refusal(http, node, query(tok, rooms))
        assert answer.status == 403, rooms
        assert answer.body["error"] == "forbidden" and answer.body["message"]
    # A token without a rooms claim may join no room at all.
    bare = mint_token(SECRET, "bob")
    assert (await ws_refusal(http, node, query(bare, ["lobby"])))[0] == 4003
    await wait_for(lambda: not node.node.sessions)
    assert node.node.broker.stats().subscriptions == 0


@pytest.mark.parametrize("room", BAD_IDS, ids=repr)
async def test_invalid_room_in_query_is_a_bad_request(
    room: str, node: RunningNode, http: aiohttp.ClientSession
) -> None:
    # The token allows every room: only the id check stands in the way.
    params = query(token("alice", rooms=["*"]), [room])
    code, message = await ws_refusal(http, node, params)
    assert code == 4000, (code, message)
    answer = await sse_refusal(http, node, params)
    assert answer.status == 400
    assert answer.body["error"] == "bad_request" and answer.body["message"]
    await wait_for(lambda: not node.node.sessions)
    assert node.node.broker.stats().subscriptions == 0


async def test_invalid_rooms_in_commands_get_errors_and_connection_survives(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ws, _ = await open_ws(http, node, token("alice", rooms=["*"], publish=["*"]))
    await wait_for(lambda: node.node.broker.stats().subscriptions == 2)
    rooms: list[Any] = [*BAD_IDS, None, 5, ["lobby"], {"a": 1}]
    n = 0
    for command in ("subscribe", "unsubscribe", "publish"):
        for room in rooms:
            n += 1
            frame = {"type": command, "room": room, "data": {"x": 1}, "ref": f"r{n}"}
            await ws.send_json(frame)
            err = await recv_json(ws)
            assert (err["type"], err["code"], err.get("ref")) == ("error", "bad_request", f"r{n}"), (command, room)
            assert err["message"]
        await ws.send_json({"type": command, "data": 1, "ref": "no-room"})
        err = await recv_json(ws)
        assert (err["code"], err["ref"]) == ("bad_request", "no-room")
    await ws.send_json({"type": "ping", "ref": "p"})
    assert await recv_json(ws) == {"type": "pong", "ref": "p"}
    assert node.node.broker.stats().subscriptions == 2
    await ws.close()


async def test_forbidden_room_via_subscribe(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws, _ = await open_ws(http, node, token("alice", rooms=["team-*"]))
    await ws.send_json({"type": "subscribe", "room": "general", "ref": "f"})
    err = await recv_json(ws)
    assert (err["type"], err["code"], err["ref"]) == ("error", "forbidden", "f")
    await ws.send_json({"type": "subscribe", "room": "team-a", "ref": 2})
    assert await recv_json(ws) == {"type": "ack", "ref": 2, "channel": "room:team-a"}
    await ws.send_json({"type": "ping"})
    assert await recv_json(ws) == {"type": "pong"}
    await wait_for(lambda: node.node.broker.stats().subscriptions == 3)
    await ws.close()


# -- 5. the publish API ---------------------------------------------------------

BAD_CHANNELS: list[Any] = [
    "room:a.b",
    "room:*",
    "room:>",
    "room:a.>",
    "room:",
    "room",
    "user:a b",
    "user:*",
    "user:>",
    "user:",
    "user",
    "bogus",
    "broadcast.x",
    "broadcast:x",
    "ROOM:x",
    "",
    None,
    5,
    ["room:a"],
]


@pytest.mark.parametrize("channel", BAD_CHANNELS, ids=repr)
async def test_publish_api_refuses_bad_channels(channel: Any, node: RunningNode, http: aiohttp.ClientSession) -> None:
    answer = await publish_api(http, node, {"channel": channel, "data": {"x": 1}})
    assert answer.status == 400
    assert answer.body["error"] == "bad_request" and answer.body["message"]
    if isinstance(channel, str):  # the message names what was sent: the id, or the whole name
        kind, sep, ident = channel.partition(":")
        sent = ident if sep and kind in ("room", "user") else channel
        assert ascii(sent) in answer.body["message"], answer.body


async def test_publish_api_validation(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ok = {"channel": "room:lobby", "data": {"x": 1}}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {PUBLISH_KEY}"},
        {"Authorization": f"Bearer {ADMIN_KEY}"},
        {"Authorization": "Bearer"},
    ):
        answer = await publish_api(http, node, ok, headers)
        assert answer.status == 401, headers
        assert answer.body["error"] == "unauthorized" and answer.body["message"]
    for body in (b"{not json", b"", b"[1, 2]", b'"text"', b'{"channel": "room:lobby"}'):
        answer = await publish_api(http, node, body)
        assert answer.status == 400, body
        assert answer.body["error"] == "bad_request" and answer.body["message"]
    for event in ("a b", "*", "", "e" * 65, 5):
        answer = await publish_api(http, node, {**ok, "event": event})
        assert (answer.status, answer.body["error"]) == (400, "bad_request"), event
    answer = await publish_api(http, node, ok)
    assert answer.status == 200
    assert set(answer.body) == {"id"} and answer.body["id"].isdigit()
    answer = await publish_api(http, node, {"channel": "user:a:b@c=d+e-f_g", "data": None, "event": "x.y"})
    assert answer.status == 200 and answer.body["id"].isdigit()


async def test_publish_api_body_limit(node: RunningNode, http: aiohttp.ClientSession) -> None:
    limit = node.settings.http.max_body
    assert limit == 65536
    big = json.dumps({"channel": "room:lobby", "data": "x" * limit}).encode()
    answer = await publish_api(http, node, big)
    assert answer.status == 413
    assert answer.body["error"] == "too_large" and answer.body["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    async with http.post(node.url + "/api/publish", data=chunks(), headers=PUBLISH_HEADERS) as resp:
        assert resp.status == 413
        body = await resp.json(content_type=None)
    assert body["error"] == "too_large"
    fits = json.dumps({"channel": "room:lobby", "data": "x" * (limit - 100)}).encode()
    assert len(fits) <= limit
    assert (await publish_api(http, node, fits)).status == 200


# -- 6. never a wider subscription ------------------------------------------------


async def test_refused_ids_never_widen_a_nats_subscription(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    wild = ["*", ">", "a.*", "a.>", "lobby.>", "*.x"]
    ws, _ = await open_ws(http, node, token("alice", rooms=["*"], publish=["*"]), ["lobby"])
    for bad in wild:
        refused = [token(bad)]
        if bad != "*":  # a lone "*" is a legitimate glob in rooms / publish claims
            refused += [token("alice", rooms=[bad]), token("alice", rooms=["*"], publish=[bad])]
        for tok in refused:
            assert (await ws_refusal(http, node, query(tok)))[0] == 4001, bad
            assert (await sse_refusal(http, node, query(tok))).status == 401, bad
        allowed = token("alice", rooms=["*"])
        assert (await ws_refusal(http, node, query(allowed, [bad])))[0] == 4000, bad
        assert (await sse_refusal(http, node, query(allowed, [bad]))).status == 400, bad
        for command in ("subscribe", "publish", "unsubscribe"):
            await ws.send_json({"type": command, "room": bad, "data": 1, "ephemeral": True, "ref": "c"})
            assert (await recv_json(ws))["code"] == "bad_request", (command, bad)
        await ws.send_json({"type": "refresh", "token": token(bad), "ref": "t"})
        assert (await recv_json(ws))["code"] == "bad_token", bad
        for channel in (f"room:{bad}", f"user:{bad}"):
            assert (await publish_api(http, node, {"channel": channel, "data": 1})).status == 400, channel

    live = node.settings.live_prefix
    expected = {f"{live}.user.alice", f"{live}.broadcast", f"{live}.room.lobby"}

    async def settled() -> bool:
        return set(await live_subjects(nats_server, node)) == expected

    await wait_for(settled, timeout=3.0)
    assert node.node.broker.stats().subscriptions == 3
    subjects = await live_subjects(nats_server, node)
    assert sorted(subjects) == sorted(expected)  # one subscription each, nothing else
    assert not [s for s in subjects if "*" in s or ">" in s]
    # The node listens to live subjects only, never to the input subjects.
    prefix = node.settings.subject.prefix + "."
    url = f"http://127.0.0.1:{nats_server.monitor_port}/connz?subs=1&limit=100000"
    async with http.get(url) as resp:
        doc = await resp.json()
    input_subs = [
        s for c in doc.get("connections") or [] for s in c.get("subscriptions_list") or [] if s.startswith(prefix)
    ]
    assert input_subs == []
    await ws.close()


# -- 7. expiry and refresh --------------------------------------------------------


async def test_expired_token_closes_ws_with_4001(node: RunningNode, http: aiohttp.ClientSession) -> None:
    started = time.time()
    ws, _ = await open_ws(http, node, token("alice", exp=started + 2.0))  # admitted well before (a loaded CI)
    code, message = await expect_close(ws, timeout=4.0)
    assert code == 4001
    assert "expired" in message
    assert time.time() - started >= 1.9
    metrics = await scrape(http, node.url)
    assert metrics['herald_connections_closed_total{reason="token_expired",transport="ws"}'] == 1
    await wait_for(lambda: node.node.broker.stats().subscriptions == 0)


async def test_a_token_admitted_within_the_leeway_stays_until_exp_plus_leeway(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """jwt.leeway admits a token whose exp passed by less than it (a client's
    clock behind). The stream was then closed 4001 at once, on every connect:
    it now stays open until exp + leeway."""
    node = await node_factory(jwt={"secret": SECRET, "leeway": 2.0})
    exp = time.time() - 0.5
    ws, _ = await open_ws(http, node, token("alice", exp=exp))
    code, _ = await expect_close(ws, timeout=4.0)
    assert code == 4001
    assert time.time() >= exp + 1.9


async def test_expired_token_ends_sse_stream(
    node: RunningNode, http: aiohttp.ClientSession, sse_streams: list[aiohttp.ClientResponse]
) -> None:
    started = time.time()
    resp = await http.get(node.url + "/sse", params=query(token("alice", exp=started + 1.0)))
    sse_streams.append(resp)
    assert resp.status == 200
    await SseClient(resp).read_to_end(timeout=3.0)
    assert time.time() - started >= 0.9
    await wait_for(lambda: not node.node.sessions)


async def test_refresh_extends_the_connection(node: RunningNode, http: aiohttp.ClientSession) -> None:
    now = time.time()
    ws, _ = await open_ws(http, node, token("alice", exp=now + 1.0))
    # A witness with a slightly later expiry and no refresh: once it is closed,
    # the first connection's original expiry has certainly passed.
    witness, _ = await open_ws(http, node, token("witness", exp=now + 1.3))
    await ws.send_json({"type": "refresh", "token": token("alice", ttl=60), "ref": "r"})
    ack = await recv_json(ws)
    assert (ack["type"], ack["ref"]) == ("ack", "r")
    assert (await expect_close(witness, timeout=3.0))[0] == 4001
    await ws.send_json({"type": "ping", "ref": "still-here"})
    assert await recv_json(ws) == {"type": "pong", "ref": "still-here"}
    assert not ws.closed
    await ws.close()


async def test_refresh_for_another_user_is_forbidden(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws, welcome = await open_ws(http, node, token("alice", exp=time.time() + 1.5))
    assert welcome["user"] == "alice"
    await ws.send_json({"type": "refresh", "token": token("bob", ttl=60), "ref": "r"})
    err = await recv_json(ws)
    assert (err["type"], err["code"], err["ref"]) == ("error", "forbidden", "r")
    await wait_for(lambda: node.node.broker.stats().subscriptions == 2)
    # Identity unchanged: alice's channel still reaches this socket, bob's does not.
    for user in ("bob", "alice"):
        answer = await publish_api(http, node, {"channel": f"user:{user}", "data": {"to": user}})
        assert answer.status == 200
    frame = await recv_json(ws)
    assert (frame["type"], frame["channel"], frame["data"]) == ("message", "user", {"to": "alice"})
    assert [s.user for s in node.node.sessions] == ["alice"]
    assert failures(await scrape(http, node.url), "other_user") == 1
    # …and the refused refresh did not extend alice's original expiry.
    assert (await expect_close(ws, timeout=3.0))[0] == 4001


async def test_refresh_with_bad_tokens(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws, _ = await open_ws(http, node, token("alice"))
    bad = {
        "forged": token("alice", key=OTHER_SECRET),
        "expired": token("alice", ttl=-30),
        "alg_none": handmade({"alg": "none", "typ": "JWT"}, claims("alice")),
        "garbage": "x.y.z",
    }
    for kind, tok in bad.items():
        await ws.send_json({"type": "refresh", "token": tok, "ref": kind})
        err = await recv_json(ws)
        assert (err["type"], err["code"], err["ref"]) == ("error", "bad_token", kind)
    for value in (None, 5, ""):
        await ws.send_json({"type": "refresh", "token": value, "ref": "v"})
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] in ("bad_request", "bad_token"), value
    await ws.send_json({"type": "ping", "ref": 1})
    assert await recv_json(ws) == {"type": "pong", "ref": 1}
    metrics = await scrape(http, node.url)
    assert failures(metrics, "bad_signature") == 1
    assert failures(metrics, "expired") == 1
    assert failures(metrics, "bad_algorithm") == 1
    await ws.close()


async def test_refresh_leaves_rooms_the_new_token_no_longer_allows(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ws, _ = await open_ws(http, node, token("alice", rooms=["a", "b"]), ["a", "b"])
    # A room the backend joined the connection to, whatever the token says (docs/protocol.md 3.2), stays.
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.post(node.url + "/api/subscribe", json={"user": "alice", "room": "p9"}, headers=headers) as r:
        assert (r.status, (await r.json())["subscribed"]) == (200, 1)
    assert await recv_json(ws) == {"type": "subscribed", "room": "p9"}
    await ws.send_json({"type": "refresh", "token": token("alice", rooms=["a"]), "ref": "r"})
    ack = await recv_json(ws)
    assert ack == {"type": "ack", "ref": "r", "channels": ["broadcast", "room:a", "room:p9", "user"]}
    await wait_for(lambda: node.node.broker.stats().subscriptions == 4)
    await api_publish(http, node, "room:p9", {"n": 1})
    assert (await recv_json(ws))["channel"] == "room:p9"
    await ws.close()


# -- edge: resume positions -------------------------------------------------------

# str.isdigit() accepts all of the first three; a position is ASCII digits only.
BAD_POSITIONS = ["\u00b2", "\u0661\u0662", "\uff11", "-1", "+1", "1.5", "1e3", "0x1", "abc", "9" * 21]


@pytest.mark.parametrize("since", BAD_POSITIONS, ids=repr)
async def test_bad_since_is_a_bad_request(since: str, node: RunningNode, http: aiohttp.ClientSession) -> None:
    params = [("token", token("alice")), ("since", since)]
    assert (await ws_refusal(http, node, params))[0] == 4000
    answer = await sse_refusal(http, node, params)
    assert (answer.status, answer.body["error"]) == (400, "bad_request")
    if since.isascii():
        answer = await sse_refusal(http, node, query(token("alice")), {"Last-Event-ID": since})
        assert (answer.status, answer.body["error"]) == (400, "bad_request")
    await wait_for(lambda: not node.node.sessions)


async def test_bad_since_in_subscribe_is_a_bad_request(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws, _ = await open_ws(http, node, token("alice"))
    await wait_for(lambda: node.node.broker.stats().subscriptions == 2)
    for n, since in enumerate([*BAD_POSITIONS, -5, 2**63, True, 1.5, ["1"]]):
        await ws.send_json({"type": "subscribe", "room": "lobby", "since": since, "ref": n})
        err = await recv_json(ws, timeout=2.0)
        assert (err["type"], err["code"], err["ref"]) == ("error", "bad_request", n), since
    await ws.send_json({"type": "ping", "ref": "p"})
    assert await recv_json(ws) == {"type": "pong", "ref": "p"}
    assert node.node.broker.stats().subscriptions == 2  # nothing joined on a refused command
    await ws.close()


async def test_signed_token_with_absurd_exp_is_refused(node: RunningNode, http: aiohttp.ClientSession) -> None:
    import jwt as pyjwt

    from ..helpers import SECRET

    tok = pyjwt.encode({"sub": "alice", "exp": 1e400}, SECRET, algorithm="HS256")
    async with http.get(node.url + "/sse", params={"token": tok}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "bad_token"

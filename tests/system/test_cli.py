"""The helper commands of ``python -m gateway``: token, publish, listen, dev."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.embedded import NatsServer, free_port
from gateway.auth import Authenticator
from gateway.settings import JwtSettings

from ..helpers import ADMIN_KEY, SECRET, api_publish, cli_env, make_settings, recv_json, start_node, token, wait_for

_ids = itertools.count(1)


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a short CLI command to completion (killed if it outlives 15 s)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=cli_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=15,
    )


# --- token -------------------------------------------------------------------


def test_token_mints_a_jwt_the_node_accepts(tmp_path: Path) -> None:
    result = run_cli(["token", "bob", "--room", "lobby", "--ttl", "60"], tmp_path, HERALD_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    identity = Authenticator(JwtSettings(secret=SECRET)).verify(lines[0])
    assert identity.user == "bob"
    assert identity.rooms == ("lobby",)
    assert identity.publish == ()
    assert identity.expires is not None and 50 < identity.expires - time.time() <= 61
    # Signed with that secret, not another one.
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        Authenticator(JwtSettings(secret=SECRET + "-other")).verify(lines[0])


def test_token_carries_the_audience_and_issuer_the_node_requires(tmp_path: Path) -> None:
    aud, iss = "herald-prod", "https://auth.example"
    env = {"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_AUDIENCE": aud, "HERALD_JWT_ISSUER": iss}
    result = run_cli(["token", "bob"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    identity = Authenticator(JwtSettings(secret=SECRET, audience=aud, issuer=iss)).verify(result.stdout.strip())
    assert identity.user == "bob"


def test_token_without_a_secret_exits_2_with_a_message(tmp_path: Path) -> None:
    result = run_cli(["token", "bob"], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "HERALD_JWT_SECRET" in result.stderr or "jwt.secret" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_refuses_a_bad_user_id(tmp_path: Path) -> None:
    result = run_cli(["token", "*"], tmp_path, HERALD_JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "user id" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_taken_before_or_after_the_command(where: str, tmp_path: Path) -> None:
    """README writes ``herald serve [--config F]``, ops/systemd ``herald
    --config F serve``: both work. After the command it used to be refused
    (unrecognized arguments)."""
    (tmp_path / "mine.toml").write_text(f'[jwt]\nsecret = "{SECRET}"\n')
    args = ["--config", "mine.toml", "token", "bob"] if where == "before" else ["token", "bob", "--config", "mine.toml"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Authenticator(JwtSettings(secret=SECRET)).verify(result.stdout.strip()).user == "bob"
    elsewhere = [a.replace("mine.toml", "none.toml") for a in args]
    missing = run_cli(elsewhere, tmp_path)
    assert missing.returncode == 2 and "cannot read none.toml" in missing.stderr, missing.stderr


@pytest.mark.parametrize("option", ["--room", "--publish"])
@pytest.mark.parametrize("glob", ["a b", "x.y", "lobby>", ""])
def test_token_refuses_a_room_glob_no_node_takes(option: str, glob: str, tmp_path: Path) -> None:
    """It used to mint the token, which every node then refused (4001 claim
    'rooms' must be a list of room ids or globs)."""
    result = run_cli(["token", "bob", option, glob], tmp_path, HERALD_JWT_SECRET=SECRET)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], result.stderr


@pytest.mark.parametrize("ttl", ["inf", "nan", "0", "-5"])
def test_token_refuses_a_ttl_that_is_not_a_positive_number(ttl: str, tmp_path: Path) -> None:
    result = run_cli(["token", "bob", f"--ttl={ttl}"], tmp_path, HERALD_JWT_SECRET=SECRET)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ttl" in lines[0], result.stderr


def _pem(key: Any, password: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    encryption = serialization.NoEncryption() if password is None else serialization.BestAvailableEncryption(password)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)  # type: ignore[no-any-return]


def test_token_signs_with_an_rsa_or_p256_key_and_refuses_other_keys_in_one_line(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    good = {"rsa": rsa.generate_private_key(65537, 2048), "p256": ec.generate_private_key(ec.SECP256R1())}
    for name, key in good.items():
        private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
        private.write_bytes(_pem(key))
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        result = run_cli(["token", "bob", "--key", str(private)], tmp_path)
        assert result.returncode == 0, result.stderr
        assert Authenticator(JwtSettings(public_key=str(public))).verify(result.stdout.strip()).user == "bob"
    bad = {
        "junk.pem": b"not a key\n",
        "ed25519.pem": _pem(ed25519.Ed25519PrivateKey.generate()),
        "p384.pem": _pem(ec.generate_private_key(ec.SECP384R1())),
        "locked.pem": _pem(good["rsa"], password=b"secret"),
    }
    for name, pem in bad.items():
        (tmp_path / name).write_bytes(pem)
    for path in [*bad, "missing.pem", "."]:
        result = run_cli(["token", "bob", "--key", path], tmp_path)
        assert result.returncode == 2 and result.stdout == "", (path, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--key {path}" in lines[0], (path, result.stderr)


# --- publish -----------------------------------------------------------------


async def test_publish_prints_the_stream_id_and_reaches_clients(nats_server: NatsServer, tmp_path: Path) -> None:
    n = next(_ids)
    prefix, stream = f"cli{n}x{os.getpid()}", f"CLI{n}X{os.getpid()}"
    node = await start_node(
        make_settings(nats_server.url, subject={"prefix": prefix}, stream={"name": stream, "storage": "memory"})
    )
    proc: asyncio.subprocess.Process | None = None
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(node.ws_url, params=[("token", token("alice")), ("room", "lobby")])
            assert (await recv_json(ws))["type"] == "welcome"
            await wait_for(lambda: node.node.broker.stats().subscriptions >= 3)
            await asyncio.sleep(0.05)
            # Run asynchronously: the node lives in this event loop.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "publish",
                "room:lobby",
                '{"x":1}',
                "--event",
                "cli",
                env=cli_env(HERALD_NATS_URLS=nats_server.url, HERALD_SUBJECT_PREFIX=prefix, HERALD_STREAM_NAME=stream),
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
            assert proc.returncode == 0, err.decode()
            seq = out.decode().strip()
            assert seq.isdigit() and int(seq) >= 1, out
            frame = await recv_json(ws)
            assert frame == {"type": "message", "channel": "room:lobby", "id": seq, "event": "cli", "data": {"x": 1}}
            # --key: the same key twice publishes once, and prints the first id both times.
            env = cli_env(HERALD_NATS_URLS=nats_server.url, HERALD_SUBJECT_PREFIX=prefix, HERALD_STREAM_NAME=stream)
            keyed = []
            for _ in range(2):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "publish", "room:lobby", "2", "--key", "cli-once",
                    env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
                assert proc.returncode == 0, err.decode()
                keyed.append(out.decode().strip())
            assert keyed[0] == keyed[1] and int(keyed[0]) > int(seq)
            assert (await recv_json(ws))["id"] == keyed[0]
            await ws.send_json({"type": "ping"})
            assert (await recv_json(ws))["type"] == "pong"  # the repeat was not delivered
            await ws.close()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await node.stop()


async def test_publish_reads_stdin_with_a_dash_and_sends_argument_bytes_as_they_are(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """``-`` reads the payload from stdin (past the 128 KiB the kernel allows
    one argument; one final newline dropped); an argument that is not UTF-8
    is sent as its bytes (the node replaces what is not UTF-8 with U+FFFD).
    It used to be a UnicodeEncodeError traceback."""
    n = next(_ids)
    prefix, stream = f"clis{n}x{os.getpid()}", f"CLIS{n}X{os.getpid()}"
    node = await start_node(
        make_settings(nats_server.url, subject={"prefix": prefix}, stream={"name": stream, "storage": "memory"})
    )
    env = cli_env(HERALD_NATS_URLS=nats_server.url, HERALD_SUBJECT_PREFIX=prefix, HERALD_STREAM_NAME=stream)
    big = {"text": "y" * 200_000}

    async def publish(data: bytes, stdin: bytes | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, b"-m", b"gateway", b"publish", b"room:lobby", data,
            env=env, cwd=tmp_path, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=15)
        assert proc.returncode == 0 and err == b"", err.decode()
        return out.decode().strip()

    try:
        ids = [await publish(b"-", json.dumps(big).encode() + b"\n"), await publish(b"\xff\xfe raw")]
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                node.url + "/api/history",
                params={"channel": "room:lobby"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ) as resp,
        ):
            assert resp.status == 200
            messages = (await resp.json())["messages"]
        assert [m["id"] for m in messages] == ids
        assert [m["data"] for m in messages] == [big, "\ufffd\ufffd raw"]
    finally:
        await node.stop()


@pytest.mark.parametrize(
    ("channel", "says"),
    [
        ("room:a.b", "invalid room id 'a.b'"),
        ("room:x*", "invalid room id 'x*'"),
        ("room:>", "invalid room id '>'"),
        ("lobby", "invalid channel 'lobby'"),
        ("user:", "invalid user id ''"),
    ],
)
def test_publish_refuses_a_bad_channel(channel: str, says: str, tmp_path: Path) -> None:
    # A closed NATS port: the channel must be refused before any connection.
    result = run_cli(["publish", channel, "x"], tmp_path, HERALD_NATS_URLS=f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


@pytest.mark.parametrize("event", ["", "a b", "e" * 65])
def test_publish_refuses_a_bad_event_before_connecting(event: str, tmp_path: Path) -> None:
    """An empty --event skipped the argument check: refused only once NATS
    answered, and with NATS down the user heard about the connection instead.
    The node's publish API refuses "" too (400), as docs/protocol.md 1.1 says."""
    result = run_cli(
        ["publish", "room:lobby", "x", "--event", event], tmp_path, HERALD_NATS_URLS=f"nats://127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid event name" in lines[0], result.stderr


def test_publish_without_nats_fails_within_connect_timeout_with_one_line(tmp_path: Path) -> None:
    """nats.connect_timeout bounds the wait (it used to be 5 s whatever it
    said), and stderr is one line naming the URL and why, not the broker's
    log of the failed attempt ("NATS error", "disconnected", "closed")."""
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli(["publish", "room:lobby", "x"], tmp_path, HERALD_NATS_URLS=url, HERALD_NATS_CONNECT_TIMEOUT="1")
    assert time.monotonic() - started < 4
    assert result.returncode == 1 and result.stdout == ""  # a failure, not a usage error (2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "ConnectionRefused" in lines[0], result.stderr


def test_publish_not_stored_exits_1_and_a_message_over_max_payload_2(nats_server: NatsServer, tmp_path: Path) -> None:
    """Exit 1 is a failure that a retry may get past (NATS away, no stream, no
    ack in time), 2 what no retry will (a bad argument, config, a message
    NATS never takes): a script tells them apart, as with listen and hooks."""
    n = next(_ids)
    env = cli_env(
        HERALD_NATS_URLS=nats_server.url, HERALD_SUBJECT_PREFIX=f"nostream{n}", HERALD_STREAM_NAME=f"NOSTREAM{n}"
    )
    unstored = subprocess.run(
        [sys.executable, "-m", "gateway", "publish", "room:lobby", "x"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    assert unstored.returncode == 1 and unstored.stdout == "", unstored.stderr
    lines = unstored.stderr.strip().splitlines()
    assert len(lines) == 1 and "stream" in lines[0], unstored.stderr
    too_large = subprocess.run(
        [sys.executable, "-m", "gateway", "publish", "room:lobby", "-"],
        input="x" * (1024 * 1024 + 1), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    assert too_large.returncode == 2 and too_large.stdout == "", too_large.stderr
    lines = too_large.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_payload" in lines[0], too_large.stderr


async def test_publish_interrupted_while_connecting_exits_130_quietly(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) is the shell's 130 and no KeyboardInterrupt traceback."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "publish", "room:lobby", "x",
        env=cli_env(HERALD_NATS_URLS=f"nats://127.0.0.1:{free_port()}", HERALD_NATS_CONNECT_TIMEOUT="10"),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(1.5)  # past the imports, connecting
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 5)
    assert proc.returncode == 130 and out == b"", err.decode()
    assert "Traceback" not in err.decode(), err.decode()


# --- dev ---------------------------------------------------------------------


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("target", ["parent", "group"])
async def test_dev_starts_nats_and_a_node_and_stops_both_on_sigint(
    target: str, spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    port, nats_port = free_port(), free_port()
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    store_parent = tmp_path / "tmp"
    store_parent.mkdir()
    # TMPDIR: the dev JetStream store is created under tmp_path.
    proc = spawn(
        ["dev", "--port", str(port), "--nats-port", str(nats_port)], cli_env(TMPDIR=str(store_parent)), out, err
    )

    def banner_complete() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"dev exited with {proc.returncode}:\n{err.read_text()}")
        text = out.read_text()
        return "sample token" in text and "try:" in text

    await wait_for(banner_complete, timeout=15, interval=0.05)
    banner = out.read_text()
    base = f"http://127.0.0.1:{port}"
    assert f"{base}/" in banner
    lines = banner.splitlines()
    sample = lines[next(i for i, line in enumerate(lines) if "sample token" in line) + 1].strip()
    assert sample.count(".") == 2, sample
    assert port_open(nats_port)

    async def ws_open() -> aiohttp.ClientWebSocketResponse | None:
        try:
            return await http.ws_connect(f"ws://127.0.0.1:{port}/ws", params=[("token", sample), ("room", "lobby")])
        except aiohttp.ClientConnectorError:
            return None  # the banner is printed just before the socket listens

    ws: aiohttp.ClientWebSocketResponse | None = None
    deadline = time.monotonic() + 5
    while ws is None and time.monotonic() < deadline:
        ws = await ws_open()
        if ws is None:
            await asyncio.sleep(0.05)
    assert ws is not None, "could not open a WebSocket to the dev node"
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome"
    assert "room:lobby" in welcome["channels"]
    async with http.get(base + "/") as resp:
        assert resp.status == 200
        assert "text/html" in resp.headers["Content-Type"]
    async with http.post(base + "/api/dev/token", json={"user": "bob"}) as resp:
        assert resp.status == 200  # the demo signs in by name on a dev node
        assert (await resp.json())["user"] == "bob"
    await ws.close()

    if target == "parent":
        proc.send_signal(signal.SIGINT)  # the nats-server child must be stopped by its parent
    else:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proc.poll() is not None, f"dev still running 10s after SIGINT:\n{err.read_text()}"
    assert not port_open(nats_port), "the dev nats-server outlived its parent"
    assert not port_open(port)
    log = err.read_text()
    assert proc.returncode == 0, log


async def test_dev_with_a_bad_port_fails_fast_and_leaves_no_nats_server(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    nats_port = free_port()
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    store_parent = tmp_path / "tmp"
    store_parent.mkdir()
    proc = spawn(["dev", "--port", "70000", "--nats-port", str(nats_port)], cli_env(TMPDIR=str(store_parent)), out, err)
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proc.returncode == 2, err.read_text()
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1 and "http.port" in lines[0], lines
    assert not port_open(nats_port), "nats-server left running after dev failed"


@pytest.mark.parametrize("end", ["hangup", "sigkill"])
async def test_dev_ended_by_its_terminal_or_sigkill_leaves_no_nats_server(
    end: str, spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A closed terminal sends SIGHUP to the whole group: nats-server reloads its
    config and stays, so dev must stop it (and remove the store) as on Ctrl-C.
    A SIGKILLed dev cannot: its nats-server must stop by itself."""
    port, nats_port = free_port(), free_port()
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    store_parent = tmp_path / "tmp"
    store_parent.mkdir()
    proc = spawn(
        ["dev", "--port", str(port), "--nats-port", str(nats_port)], cli_env(TMPDIR=str(store_parent)), out, err
    )

    def banner() -> bool:
        assert proc.poll() is None, err.read_text()
        return "sample token" in out.read_text()

    await wait_for(banner, timeout=15, interval=0.05)
    if end == "hangup":
        os.killpg(proc.pid, signal.SIGHUP)
    else:
        proc.kill()
    code = await asyncio.to_thread(proc.wait, 10)
    await wait_for(lambda: not port_open(nats_port), timeout=5)  # else: the dev nats-server outlived dev
    if end == "hangup":
        assert code == 0, err.read_text()
        assert list(store_parent.iterdir()) == [], "the JetStream store was left behind"


@pytest.mark.parametrize("how", ["--port 0", "HERALD_HTTP_PORT"])
async def test_dev_on_port_0_prints_the_port_it_took(
    how: str, spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """``--port 0`` takes a free port; without ``--port``, http.port is used (as serve and listen do)."""
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    port = free_port()
    args, env = (["--port", "0"], {}) if how == "--port 0" else ([], {"HERALD_HTTP_PORT": str(port)})
    proc = spawn(["dev", *args, "--nats-port", str(free_port())], cli_env(TMPDIR=str(tmp_path), **env), out, err)

    def banner() -> bool:
        assert proc.poll() is None, err.read_text()
        return "sample token" in out.read_text()

    await wait_for(banner, timeout=15, interval=0.05)
    demo = next(line.split()[-1] for line in out.read_text().splitlines() if "demo:" in line)
    assert not demo.endswith(":0/"), demo
    if how == "HERALD_HTTP_PORT":
        assert demo.endswith(f":{port}/"), demo
    async with http.get(demo) as resp:
        assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 10) == 0, err.read_text()


@pytest.mark.parametrize("busy", ["nats", "http"])
async def test_dev_on_a_port_in_use_says_which_and_starts_nothing(
    busy: str, nats_server: NatsServer, spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A second ``herald dev`` on a taken --nats-port must not serve on the other
    server's NATS (its own nats-server failed to listen, in silence); on a taken
    --port it must not start a nats-server first."""
    taken = nats_server.port
    port, nats_port = (free_port(), taken) if busy == "nats" else (taken, free_port())
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    store_parent = tmp_path / "tmp"
    store_parent.mkdir()
    proc = spawn(
        ["dev", "--port", str(port), "--nats-port", str(nats_port)], cli_env(TMPDIR=str(store_parent)), out, err
    )
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proc.returncode == 2, f"dev did not stop on port {taken} in use:\n{out.read_text()}{err.read_text()}"
    lines = err.read_text().strip().splitlines()
    flag = "--nats-port" if busy == "nats" else "--port"
    assert len(lines) == 1 and f"127.0.0.1:{taken}" in lines[0] and flag in lines[0], lines
    assert not port_open(port if busy == "nats" else nats_port)
    assert list(store_parent.iterdir()) == [], "a JetStream store was left behind"


# --- listen ------------------------------------------------------------------


async def start_listen(args: list[str], tmp_path: Path, **env: str) -> asyncio.subprocess.Process:
    """``herald listen ARGS`` in the background (the node lives in this event loop)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "listen",
        *args,
        env=cli_env(**env),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_lines(proc: asyncio.subprocess.Process, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        return [json.loads(await proc.stdout.readline()) for _ in range(n)]


async def test_listen_prints_json_lines_resumes_from_since_and_exits_0_on_sigterm(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    node = await start_node(make_settings(nats_server.url))
    proc: asyncio.subprocess.Process | None = None
    try:
        async with aiohttp.ClientSession() as http:
            before = await api_publish(http, node, "room:lobby", {"n": 0})
            earlier = str(int(before) - 1)
            # A token minted with jwt.secret for --user; the stored message after --since comes first.
            args = ["room:lobby", "user:bob", "--since", earlier, "--url", node.url, "--user", "bob", "-v"]
            proc = await start_listen(args, tmp_path, HERALD_JWT_SECRET=SECRET)
            first = await read_lines(proc, 1)
            assert first == [{"channel": "room:lobby", "id": before, "event": "message", "data": {"n": 0}}]
            ids = [
                await api_publish(http, node, "room:other", {"n": 1}),  # not joined
                await api_publish(http, node, "broadcast", {"n": 2}),  # delivered, not asked for
                await api_publish(http, node, "user:bob", {"n": 3}),
                await api_publish(http, node, "room:lobby", [4]),
            ]
            assert await read_lines(proc, 2) == [
                {"channel": "user", "id": ids[2], "event": "message", "data": {"n": 3}},
                {"channel": "room:lobby", "id": ids[3], "event": "message", "data": [4]},
            ]
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert proc.returncode == 0, err.decode()
            assert out == b"" and "connected to" in err.decode() and "Traceback" not in err.decode()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await node.stop()


async def test_listen_prints_any_payload_a_node_delivers_as_one_json_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Integers past 64 bits and nesting past orjson's 255 levels come exact,
    and the lines after them too. It used to die with a traceback on them,
    and again at the same message on every run resumed from before it."""
    node = await start_node(make_settings(nats_server.url))
    proc: asyncio.subprocess.Process | None = None
    try:
        async with aiohttp.ClientSession() as http:
            deep: Any = []
            for _ in range(299):
                deep = [deep]
            payloads = [{"n": 12345678901234567890123456789}, deep, "after"]
            ids = [await api_publish(http, node, "room:lobby", data) for data in payloads]
            since = str(int(ids[0]) - 1)
            proc = await start_listen(
                ["room:lobby", "--since", since, "--url", node.url], tmp_path, HERALD_TOKEN=token("dave")
            )
            lines = await read_lines(proc, 3)
            assert [line["data"] for line in lines] == payloads
            assert [line["id"] for line in lines] == ids
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert proc.returncode == 0 and out == b"" and err == b"", err.decode()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await node.stop()


async def test_listen_user_mints_the_audience_and_issuer_the_node_requires(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """--user mints with jwt.secret, and with jwt.audience / jwt.issuer as
    ``herald token`` does: it used to leave them out, and such a node
    refused every token it minted (4001 token lacks claim), exit 1."""
    aud, iss = "herald-prod", "https://auth.example"
    node = await start_node(make_settings(nats_server.url, jwt={"audience": aud, "issuer": iss}))
    proc: asyncio.subprocess.Process | None = None
    try:
        env = {"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_AUDIENCE": aud, "HERALD_JWT_ISSUER": iss}
        proc = await start_listen(["room:lobby", "--user", "gus", "--url", node.url, "-v"], tmp_path, **env)
        assert proc.stderr is not None
        async with asyncio.timeout(10):
            said = (await proc.stderr.readline()).decode()
        assert "connected to" in said, said
        async with aiohttp.ClientSession() as http:
            sent = await api_publish(http, node, "room:lobby", {"n": 1})
        assert (await read_lines(proc, 1))[0]["id"] == sent
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await node.stop()


async def test_listen_piped_into_head_ends_with_head(nats_server: NatsServer, tmp_path: Path) -> None:
    """``$(herald listen … | head -1)``: the shell waits for listen too, so
    listen must end when head does, not at the next message it fails to
    write (there may be none: it used to wait forever)."""
    node = await start_node(make_settings(nats_server.url))
    proc: asyncio.subprocess.Process | None = None
    try:
        async with aiohttp.ClientSession() as http:
            first = await api_publish(http, node, "room:lobby", {"n": 1})
            since = str(int(first) - 1)
            listen = f"{sys.executable} -m gateway listen room:lobby --since {since} --url {node.url}"
            proc = await asyncio.create_subprocess_exec(
                "sh", "-c", f"{listen} | head -1",
                env=cli_env(HERALD_TOKEN=token("erin")), cwd=tmp_path, start_new_session=True,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            started = time.monotonic()
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert time.monotonic() - started < 5
            assert json.loads(out.decode().splitlines()[0])["id"] == first
            assert proc.returncode == 0 and err == b"", err.decode()
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # sh and the listen it waits for
            await proc.wait()
        await node.stop()


def pipe_pending(fd: int) -> int:
    """Bytes written to a pipe and not read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


async def test_listen_blocked_on_a_full_pipe_still_ends_on_sigterm(nats_server: NatsServer, tmp_path: Path) -> None:
    """A reader that stops reading (a stuck consumer) fills the pipe: listen
    must still end on SIGTERM (``timeout 5 herald listen … | stuck``). It used
    to sit in a blocking write, where no signal handler of the loop runs."""
    body = 60000  # two fill the pipe
    node = await start_node(make_settings(nats_server.url))
    read_end, write_end = os.pipe()
    proc: asyncio.subprocess.Process | None = None
    try:
        async with aiohttp.ClientSession() as http:
            ids = [await api_publish(http, node, "room:lobby", "x" * body) for _ in range(4)]  # > the pipe's 64 KiB
            since = str(int(ids[0]) - 1)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "listen", "room:lobby", "--since", since, "--url", node.url,
                env=cli_env(HERALD_TOKEN=token("frank")), cwd=tmp_path,
                stdout=write_end, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            os.close(write_end)
            write_end = -1
            # Connected (its SIGTERM handler set), a message in the pipe, the next too big for the room
            # left: a fixed 2 s was not enough on a loaded machine, where SIGTERM came first and killed it.
            await wait_for(lambda: pipe_pending(read_end) > body, timeout=20, interval=0.05)
            await asyncio.sleep(0.5)  # the next message (already sent) is being written
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 5)
            assert proc.returncode == 0, err.decode()
            assert "Traceback" not in err.decode()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        await node.stop()


@pytest.mark.parametrize(
    ("args", "tokens", "says"),
    [
        (["room:secret"], {"rooms": ["lobby"]}, "4003 token does not allow room secret"),
        (["room:lobby"], {"ttl": -60}, "4001 token expired"),
    ],
)
async def test_listen_stopped_for_good_exits_1_with_one_line(
    nats_server: NatsServer, tmp_path: Path, args: list[str], tokens: dict[str, Any], says: str
) -> None:
    node = await start_node(make_settings(nats_server.url))
    try:
        proc = await start_listen([*args, "--url", node.url], tmp_path, HERALD_TOKEN=token("carol", **tokens))
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        await node.stop()
    assert proc.returncode == 1
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines


async def test_listen_without_a_node_says_so_once(tmp_path: Path) -> None:
    """A dead or wrong --url: one line on stderr at the first failed attempt,
    then quiet retries (each is said with -v). It used to retry silently."""
    proc = await start_listen(["user", "--url", f"http://127.0.0.1:{free_port()}"], tmp_path, HERALD_TOKEN="x")
    await asyncio.sleep(3.0)  # several attempts (0.5 s backoff, doubling)
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0 and out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "reconnecting in" in lines[0], lines


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["room:lobby"], {}, "--token, $HERALD_TOKEN, or --user"),
        (["room:lobby", "--user", "bob"], {}, "jwt.secret"),
        (["lobby"], {"HERALD_TOKEN": "x"}, "invalid channel"),
        (["room:a.b"], {"HERALD_TOKEN": "x"}, "invalid room id 'a.b'"),
        (["room:" + "\u00e9" * 300], {"HERALD_TOKEN": "x"}, "invalid room id '\\xe9\\xe9"),
        (["user:bob", "--user", "eve"], {"HERALD_JWT_SECRET": SECRET}, "only your own user channel"),
        (["user", "--since", "x"], {"HERALD_TOKEN": "x"}, "position"),
        (["user", "--since", "9" * 23], {"HERALD_TOKEN": "x"}, "too large"),
        (["user", "--since", str(2**63)], {"HERALD_TOKEN": "x"}, "too large"),
        (["user", "--url", "ftp://h"], {"HERALD_TOKEN": "x"}, "not a node URL"),
    ],
)
def test_listen_refuses_bad_arguments_with_one_line(
    args: list[str], env: dict[str, str], says: str, tmp_path: Path
) -> None:
    result = run_cli(["listen", *args], tmp_path, **env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr

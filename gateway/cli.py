"""``herald`` / ``python -m gateway``: serve, dev, publish, listen, hooks, token."""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from broker import BrokerUnavailable, InvalidChannel, MessageTooLarge
from broker.channels import check_event, check_id, parse_channel
from broker.embedded import NatsServer, free_port, nats_server_binary
from broker.redact import redacted
from broker.tasks import cancel_and_wait

from .auth import GLOB_RE, mint_token
from .public_keys import private_key_algorithm
from .settings import ConfigError, Settings, load_settings, with_overrides

DEV_SECRET = "herald-dev-secret-do-not-use-in-production"
DEV_PUBLISH_KEY = "dev-publish-key"
DEV_ADMIN_KEY = "dev-admin-key"


def _parser() -> argparse.ArgumentParser:
    config_help = "TOML file (default: $HERALD_CONFIG or config/herald.toml)"
    p = argparse.ArgumentParser(prog="herald", description="Herald realtime gateway")
    p.add_argument("--config", help=config_help)
    # Also after the command (herald serve --config F): SUPPRESS leaves the one given before it.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[config])

    serve = add("serve", help="run a node")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT); one per core")

    dev = add("dev", help="local nats-server with JetStream + one node, dev secrets")
    dev.add_argument("--port", type=int, help="HTTP port (default: http.port, 8080; 0: any free one)")
    dev.add_argument("--nats-port", type=int, default=0, help="default: 4222 if free, else any")

    pub = add("publish", help="publish through JetStream (acked)")
    pub.add_argument("channel", help="room:<id>, user:<id> or broadcast")
    pub.add_argument("data", help="payload, usually JSON; - reads it from stdin (one final newline dropped)")
    pub.add_argument("--event")
    pub.add_argument("--key", help="idempotency key: a repeat within publish.dedup_window is stored once")

    listen = add("listen", help="print a node's messages as JSON lines, reconnecting and resuming")
    listen.add_argument("channels", nargs="+", metavar="CHANNEL", help="room:<id>, user, user:<id> or broadcast")
    listen.add_argument("--since", help="start after this message id")
    listen.add_argument("--url", action="append", default=[], help="a node's URL (repeatable; tried in turn)")
    listen.add_argument("--token", help="the client token (default: $HERALD_TOKEN)")
    listen.add_argument("--user", help="mint a token for this user with jwt.secret instead")
    listen.add_argument("-v", "--verbose", action="store_true", help="say on stderr when it connects and reconnects")

    add("hooks", help="run a webhook dispatcher (config [hooks])")

    tok = add("token", help="mint a client token")
    tok.add_argument("user")
    tok.add_argument("--room", action="append", default=[], help="room id or glob (repeatable)")
    tok.add_argument("--publish", action="append", default=[], help="room glob the user may publish to")
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    tok.add_argument("--key", help="PEM private key for RS256/ES256 (default: jwt.secret, HS256)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C where no handler of ours runs (imports, connecting): the shell's code
        return 130


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "serve":
            return _serve(settings, args)
        if args.command == "dev":
            return _dev(settings, args)
        if args.command == "publish":
            return asyncio.run(_publish(settings, args))
        if args.command == "listen":
            return _listen(settings, args)
        if args.command == "hooks":
            return _hooks(settings)
        return _token(settings, args)
    except (ConfigError, InvalidChannel, MessageTooLarge, FileNotFoundError) as exc:
        print(f"herald: {exc}", file=sys.stderr)
        return 2  # a usage or config error: no retry gets past it
    except BrokerUnavailable as exc:  # NATS away, no stream, no ack in time (publish)
        print(f"herald: {exc}", file=sys.stderr)
        return 1  # a failure, as serve, listen and hooks say theirs: a retry may succeed


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from .server import configure_logging, serve

    http = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if http:
        settings = with_overrides(settings, http=http)
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    _check_worker_ports(settings, args.workers)
    configure_logging(settings.log.level)
    return serve(settings, workers=args.workers)


def _check_worker_ports(settings: Settings, workers: int) -> None:
    """The workers share http.port, so it is one; worker k listens on
    admin.port + k: each must be a port, and not the HTTP one."""
    if workers <= 1:
        return
    if not settings.http.port:
        raise ConfigError(
            "config error: http.port (HERALD_HTTP_PORT): 0 (any free port) would give each worker its own"
        )
    first = settings.admin.port
    if not first:
        return
    last = first + workers - 1
    if last > 65535:
        raise ConfigError(
            f"config error: admin.port (HERALD_ADMIN_PORT): worker {workers - 1} would listen on {last}"
            " (admin.port + k), past 65535"
        )
    if first <= settings.http.port <= last:
        raise ConfigError(
            f"config error: admin.port (HERALD_ADMIN_PORT): the workers' admin ports {first}-{last}"
            f" include http.port {settings.http.port}"
        )


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    nats_server_binary()  # fail fast with a clear message
    port = (settings.http.port if args.port is None else args.port) or free_port()  # the banner names it: not 0
    nats_port = args.nats_port or (4222 if _port_free(4222) else free_port())
    # Its own temp store, removed on exit; a dev killed outright takes it down too.
    server = NatsServer(port=nats_port, stop_with_parent=True)
    server.log_file = str(Path(server.store_dir) / "nats.log")
    secret = settings.jwt.secret or DEV_SECRET
    try:
        settings = with_overrides(
            settings,
            http={"host": "127.0.0.1", "port": port, "dev_tokens": True},
            nats={"urls": (server.url,)},
            jwt={"secret": secret, "public_key": ""},
            publish={"key": settings.publish.key or DEV_PUBLISH_KEY},
            admin={"key": settings.admin.key or DEV_ADMIN_KEY},
            rooms={"join_leave": settings.rooms.join_leave or ("*",)},  # the demo's presence list
        )
        # Both ports are checked before anything starts: a nats-server that cannot
        # listen exits in silence, and the node would serve on whatever server does.
        _check_dev_port("--port", port)
        if args.nats_port:
            _check_dev_port("--nats-port", args.nats_port)
        server.start()
        return _run_dev(settings, server, port, secret)
    finally:
        server.cleanup()


def _run_dev(settings: Settings, server: NatsServer, port: int, secret: str) -> int:
    from .server import configure_logging, serve

    configure_logging(settings.log.level)
    base = f"http://127.0.0.1:{port}"
    jwt = settings.jwt
    token = mint_token(secret, "alice", ["*"], ["*"], 86400, audience=jwt.audience, issuer=jwt.issuer)

    def ready() -> None:
        # A closed terminal hangs up the whole group: nats-server reloads its
        # config and stays, so dev stops as on Ctrl-C and stops it.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, signal.raise_signal, signal.SIGTERM)
        print(
            f"\nHerald dev node {settings.node.id}\n"
            f"  demo:        {base}/\n"
            f"  websocket:   ws://127.0.0.1:{port}/ws?token=<token>&room=lobby\n"
            f"  events:      {base}/sse?token=<token>&room=lobby\n"
            f"  metrics:     {base}/metrics\n"
            f"  nats:        {redacted(server.url)} (JetStream store {server.store_dir})\n"
            f"  publish key: {settings.publish.key}   admin key: {settings.admin.key}\n"
            f"  sample token (user alice, all rooms, 24 h):\n    {token}\n"
            f"  try:  curl -N '{base}/sse?token={token}&room=lobby'\n"
            f"        curl -X POST {base}/api/publish -H 'Authorization: Bearer {settings.publish.key}' "
            f"""-d '{{"channel":"room:lobby","data":{{"text":"hi"}}}}'\n""",
            flush=True,
        )

    return serve(settings, on_ready=ready)


def _check_dev_port(flag: str, port: int) -> None:
    from .server import CannotListen, check_port_free

    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag} {port}: must be 0..65535")
    try:
        check_port_free("127.0.0.1", port)
    except CannotListen as exc:
        raise ConfigError(f"{exc} ({flag}: another herald dev or server?)") from exc


def _port_free(port: int) -> bool:
    from .server import CannotListen, check_port_free

    try:
        check_port_free("127.0.0.1", port)
    except CannotListen:
        return False
    return True


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from broker.publisher import NatsPublisher

    channel = parse_channel(args.channel)
    if args.event is not None:  # "" too, before connecting: the node refuses an empty event (400)
        check_event(args.event)
    nats = settings.nats
    publisher = NatsPublisher(
        nats.urls,
        settings.subject.prefix,
        settings.stream.name,
        attempts=1,
        timeout=nats.connect_timeout,
        publish_timeout=nats.publish_timeout,
    )
    async with publisher:
        seq = await publisher.publish(channel, _payload(args.data), args.event, idempotency_key=args.key)
    print(seq)
    return 0


def _payload(data: str) -> bytes:
    """The bytes to publish: the argument's as the shell passed them (not
    UTF-8 is fine: the node replaces it), or stdin's for ``-``."""
    if data != "-":
        return os.fsencode(data)
    if sys.stdin is None:  # started with <&-
        raise ConfigError("publish -: standard input is closed")
    raw = sys.stdin.buffer.read()
    return raw[:-1] if raw.endswith(b"\n") else raw


def _listen(settings: Settings, args: argparse.Namespace) -> int:
    from .client.listen import listen

    return listen(settings, args.channels, args.url, args.token, args.user, args.since, args.verbose)


def _hooks(settings: Settings) -> int:
    from .hooks import log, run_dispatcher
    from .server import configure_logging, new_event_loop

    h = settings.hooks
    if not (h.url or h.routes):
        raise ConfigError("config error: hooks.url (HERALD_HOOKS_URL) or hooks.routes is needed for herald hooks")
    if not h.secret:
        raise ConfigError("config error: hooks.secret (HERALD_HOOKS_SECRET) is needed: receivers verify signatures")
    configure_logging(settings.log.level)
    loop = new_event_loop()
    try:
        loop.run_until_complete(run_dispatcher(settings))
    except BrokerUnavailable as exc:  # NATS closed the connection for good
        log.error("webhook dispatcher: %s: exiting 1 for the service manager to restart it", exc)
        return 1
    finally:
        # What nats-py left running when its close failed (NATS away) ends
        # here, not destroyed pending (with a traceback) when the loop closes.
        loop.run_until_complete(cancel_and_wait(asyncio.all_tasks(loop)))
        loop.close()
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    check_id("user", args.user)
    if not (math.isfinite(args.ttl) and args.ttl > 0):
        raise ConfigError(f"--ttl must be a positive number of seconds, got {args.ttl:g}")
    for option, globs in (("--room", args.room), ("--publish", args.publish)):
        for glob in globs:
            if GLOB_RE.fullmatch(glob) is None:  # a node would refuse the token (4001 bad_claims)
                raise ConfigError(f"{option} {glob!r}: not a room id or glob ({GLOB_RE.pattern})")
    key: Any
    if args.key:
        try:
            key, algorithm = private_key_algorithm(Path(args.key).read_bytes())
        except OSError as exc:
            raise ConfigError(f"--key {args.key}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"--key {args.key}: {exc}") from None
    elif settings.jwt.secret:
        key, algorithm = settings.jwt.secret, "HS256"
    else:
        print("herald: set jwt.secret (HERALD_JWT_SECRET) or pass --key PRIVATE.pem", file=sys.stderr)
        return 2
    jwt = settings.jwt
    print(mint_token(key, args.user, args.room, args.publish, args.ttl, algorithm, jwt.audience, jwt.issuer))
    return 0

"""A webhook receiver for the local cluster (``make cluster``): checks each
request's ``Herald-Signature`` and appends it as one JSON line to a file.

``python -m ops.webhook_sink --port P --out FILE`` (the secret in
``HERALD_HOOKS_SECRET``). Development only: it answers 200 to everything.
"""

from __future__ import annotations

import argparse
import os

import orjson
from aiohttp import web

from gateway.hooks import verify


def app(out: str, secret: str) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "verified": verify(secret, request.headers.get("Herald-Signature", ""), body),
            "event": request.headers.get("Herald-Event"),
            "id": request.headers.get("Herald-Delivery-Id"),
            "body": orjson.loads(body),
        }
        with open(out, "ab") as f:
            f.write(orjson.dumps(record) + b"\n")
        return web.json_response({"ok": True})

    application = web.Application()
    application.router.add_post("/{tail:.*}", receive)
    return application


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ops.webhook_sink", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON lines, one per webhook received")
    args = p.parse_args(argv)
    web.run_app(app(args.out, os.environ.get("HERALD_HOOKS_SECRET", "")), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()

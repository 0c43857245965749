"""``python -m ops.loadtest``: parse, run on uvloop, print and save the results."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from . import report
from .cli import config
from .runner import Run, log, out, write_json


def _run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        log("uvloop not installed: using the default event loop (the generator will cost more CPU)")
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    cfg = config(argv)
    try:
        run = Run(cfg)
    except ValueError as exc:  # e.g. a --server-pid that does not exist
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    result = _run(run.main())
    out(report.summary_line(result["summary"]))
    if cfg.json_path:
        write_json(cfg.json_path, result)
        log(f"results written to {cfg.json_path}")
    return 0 if "aborted" not in result else 1


if __name__ == "__main__":
    sys.exit(main())

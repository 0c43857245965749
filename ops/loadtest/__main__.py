"""``python -m ops.loadtest``: parse, run on uvloop, print and save the results."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from . import report, storm
from .cli import config
from .procstat import ProcGroup
from .report import log, out, write_json
from .runner import Run


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
        if cfg.storm:  # the pids are checked here as Run checks them
            ProcGroup(list(cfg.server_pids))
            ProcGroup(list(cfg.aux_pids))
            coro = storm.run(cfg)
        else:
            coro = Run(cfg).main()
    except ValueError as exc:  # e.g. a --server-pid that does not exist
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    result = _run(coro)
    if cfg.child is not None:  # one part of a storm: its parent reports
        return 0 if "aborted" not in result else 1
    if "summary" in result:
        out(report.summary_line(result["summary"]))
    if cfg.json_path:
        write_json(cfg.json_path, result)
        log(f"results written to {cfg.json_path}")
    return 0 if "aborted" not in result else 1


if __name__ == "__main__":
    sys.exit(main())

"""A wall clock off by some seconds, for a Herald process under test: put this
directory first on the process's PYTHONPATH. ``time.time``, ``time.time_ns``
and ``datetime.datetime.now`` / ``utcnow`` run ``SKEWED_CLOCK_OFFSET``
seconds ahead (negative: behind); with ``SKEWED_CLOCK_FILE`` the offset
is what that file says, read again every 20 ms, so a test can step the clock
of a running node. ``time.monotonic`` and the event loop's clock are left as
they are: a skewed or stepped wall clock does not move them."""

from __future__ import annotations

import datetime as _datetime
import os
import threading
import time as _time

_real_time = _time.time
_real_time_ns = _time.time_ns
_offset = float(os.environ.get("SKEWED_CLOCK_OFFSET", "0") or 0)
_file = os.environ.get("SKEWED_CLOCK_FILE", "")


def _skewed_time() -> float:
    return _real_time() + _offset


def _skewed_time_ns() -> int:
    return _real_time_ns() + int(_offset * 1e9)


class _SkewedDatetime(_datetime.datetime):
    @classmethod
    def now(cls, tz: _datetime.tzinfo | None = None) -> _datetime.datetime:  # type: ignore[override]
        return _datetime.datetime.fromtimestamp(_skewed_time(), tz)

    @classmethod
    def utcnow(cls) -> _datetime.datetime:  # type: ignore[override]
        return _datetime.datetime.fromtimestamp(_skewed_time(), _datetime.UTC).replace(tzinfo=None)


def _follow(path: str) -> None:
    global _offset
    while True:
        try:
            with open(path) as fh:
                _offset = float(fh.read().strip() or 0)
        except (OSError, ValueError):
            pass
        _real_sleep(0.02)


_real_sleep = _time.sleep
_time.time = _skewed_time
_time.time_ns = _skewed_time_ns
_datetime.datetime = _SkewedDatetime  # type: ignore[misc]
if _file:
    try:
        with open(_file) as _fh:
            _offset = float(_fh.read().strip() or 0)
    except (OSError, ValueError):
        pass
    threading.Thread(target=_follow, args=(_file,), daemon=True, name="skewed-clock").start()

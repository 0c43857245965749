"""broker.server_clock: nats-server's clock read from JetStream API answers,
and when a reading is stale."""

from __future__ import annotations

import time

import pytest

from broker.server_clock import ServerClock


def answer_at(server_time: float) -> dict[str, str]:
    return {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(server_time)) + f".{int(server_time % 1 * 1e6):06d}Z"}


def test_a_step_of_this_host_s_clock_makes_the_reading_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reading stays good while this host's wall clock runs with its
    monotonic clock; stepped, it is wrong by the step: read again (the scrape
    that sees it asks), not after CLOCK_AGE."""
    offsets: list[float] = []
    clock = ServerClock(offsets.append)
    assert clock.stepped() and clock.age() == float("inf")  # never read
    now = time.time()
    clock.note(answer_at(now + 5.0), now, now + 0.002)
    assert abs(offsets[-1] + 5.0) < 0.01
    assert not clock.stepped() and 0 <= clock.age() < 1.0
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 0.005)  # within what slewing never does either
    assert not clock.stepped()
    monkeypatch.setattr(time, "time", lambda: real() + 60.0)  # stepped 60 s ahead
    assert clock.stepped()
    now = time.time()
    clock.note(answer_at(now - 55.0), now, now + 0.002)  # read again
    assert not clock.stepped() and abs(offsets[-1] - 55.0) < 0.01


def test_an_answer_too_slow_is_no_reading() -> None:
    clock = ServerClock()
    now = time.time()
    clock.note(answer_at(now), now - 2.0, now)  # the round trip took 2 s: its ts may be off by 1 s
    assert clock.stepped() and clock.age() == float("inf")

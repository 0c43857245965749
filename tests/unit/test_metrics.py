"""The metric vocabularies, checked against the source (the metrics of a
running node: tests/nats/test_metrics.py)."""

from __future__ import annotations

import pytest


def test_every_label_value_the_code_uses_is_pre_created() -> None:
    """The vocabularies in gateway/metrics.py cover every literal label the code
    passes, so no series appears late (its first event invisible to rate())."""
    import re
    from pathlib import Path

    from gateway import auth, metrics

    source = "\n".join(p.read_text() for p in Path(auth.__file__).parent.glob("*.py"))
    auth_reasons = set(re.findall(r'auth_failures\.labels\("(\w+)"\)|AuthError\("(\w+)"', source))
    used_auth = {a or b for a, b in auth_reasons} | {reason for _, reason, _ in auth._REFUSALS}
    assert used_auth <= set(metrics.AUTH_FAILURE_REASONS), used_auth - set(metrics.AUTH_FAILURE_REASONS)
    used_limits = set(re.findall(r'limit_rejections\.labels\("(\w+)"\)', source)) | {"publish_rate", "command_rate"}
    assert used_limits <= set(metrics.LIMITS), used_limits - set(metrics.LIMITS)
    used_results = set(re.findall(r'refuse\(\d+, "(\w+)"', source)) | {"ok"}
    assert used_results <= set(metrics.API_RESULTS), used_results - set(metrics.API_RESULTS)
    used_refusals = set(re.findall(r'Refusal\(\s*\d+, \w+, "(\w+)"', source))
    assert used_refusals <= set(metrics.REFUSALS), used_refusals - set(metrics.REFUSALS)
    assert len(used_auth) > 10 and len(used_limits) > 6 and len(used_results) > 5  # the patterns still match
    assert len(used_refusals) > 8


def test_the_accept_queue_counts_connections_the_node_has_not_taken() -> None:
    """A listening socket nobody accepts from: the kernel queues the connects
    (up to the backlog) and the gauges say so."""
    import socket

    from prometheus_client import generate_latest

    from gateway.metrics import Metrics, accept_queue

    listener = socket.create_server(("127.0.0.1", 0), backlog=7)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        assert accept_queue(listener) == (3, 7)
        metrics = Metrics()
        metrics.watch_accept_queue(lambda: [listener])
        text = generate_latest(metrics.registry).decode()
        assert "herald_accept_queue 3.0" in text and "herald_accept_queue_limit 7.0" in text
        listener.accept()[0].close()
        assert accept_queue(listener) == (2, 7)
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_open_fds_are_counted_without_listing_every_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    """process_open_fds is read on every scrape, on the event loop: listing
    /proc/self/fd took 20 ms at 10,000 connections (each scrape, 1 s apart on
    some fleets). Linux 6.2 and later give the count as the directory's size."""
    import os
    import socket

    from prometheus_client import generate_latest

    from gateway.metrics import Metrics

    if not os.path.isdir("/proc/self/fd") or os.stat("/proc/self/fd").st_size == 0:
        pytest.skip("no /proc, or a kernel before 6.2: the descriptors are listed")
    pairs = [socket.socketpair() for _ in range(300)]
    try:
        metrics = Metrics()
        expected = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened

        def listed(path: str) -> list[str]:
            raise AssertionError(f"{path} listed on a scrape")

        monkeypatch.setattr(os, "listdir", listed)
        text = generate_latest(metrics.registry).decode()
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    samples = dict(line.split(" ") for line in text.splitlines() if line.startswith("process_"))
    assert float(samples["process_open_fds"]) == expected >= 600
    assert {"process_max_fds", "process_cpu_seconds_total", "process_resident_memory_bytes"} <= set(samples)
    assert {"process_virtual_memory_bytes", "process_start_time_seconds"} <= set(samples)


def test_the_webhook_consumer_gauges_say_they_are_the_same_on_every_dispatcher() -> None:
    """Every dispatcher reports the shared consumer's queue and ack-pending count: two dispatchers summed on a
    dashboard would show twice the backlog. Their help says to take max."""
    from gateway.hooks import HookMetrics

    helps = {m.name: m.documentation for m in HookMetrics().registry.collect()}
    for name in ("herald_webhook_queue_depth", "herald_webhook_ack_pending", "herald_webhook_ack_pending_limit"):
        assert "every dispatcher reports the same: max, not sum" in helps[name], (name, helps[name])
    assert "every dispatcher" not in helps["herald_webhook_deliveries"]

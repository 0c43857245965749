"""Load generator for Herald (and other WebSocket / SSE push servers).

    .venv/bin/python -m ops.loadtest --help
    .venv/bin/python -m ops.loadtest --jwt-secret "$SECRET" --server-pid "$(pgrep -f 'gateway serve')" \\
        --conns 1000 --rooms 10 --rates 100,200,500,1000,2000 --json artifacts/load.json

Connections are raw asyncio Protocols with hand-written, incremental
WebSocket and SSE parsers on uvloop (no client library in the receive path),
so the generator costs a few microseconds per message; its own CPU is
reported next to the server's, and a step where it passes 85 % of a core says
so. It only ever connects to 127.0.0.1, localhost or ::1, and every run is
bounded by ``--conns``, rate x step length and ``--max-seconds``.

Each step publishes at one rate (round-robin over the rooms, paced), waits
``--settle`` seconds, then reports: expected deliveries (published to a room x
clean connections in it), delivered, lost and duplicated (per-connection
sequence tracking), latency percentiles (publish time → receive), server and
helper CPU and RSS from /proc, the generator's CPU, and server-side closes.
Stepping stops at the first step that falls behind (< 95 % delivered, or the
publisher could not keep the rate) or whose p99 is above ``--max-p99-ms``.

``--storm`` connects only: ``--conns`` connects offered at ``--connect-rate``
(optionally split over ``--procs`` processes), handshake latency to ready and
connects admitted per second, the server's CPU per connect; then close.
``--conns 0`` publishes with no receivers (the cost of the publish path).

Modules: ``cli`` (options → Config), ``runner`` (one run), ``storm`` (a
connect storm), ``clients`` (the Protocols), ``wsproto`` / ``sse`` / ``http1``
(sans-I/O parsers), ``payload`` (test messages), ``stats`` (sequences,
histogram), ``publisher`` (NATS / HTTP, paced), ``httpclient`` (keep-alive
POSTs), ``procstat`` (/proc), ``report`` (the table, output), ``target``
(loopback only).
"""

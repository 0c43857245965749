"""Why a connection ends: a close code for the client and a label for metrics.

Every close goes through one of these, so the code a client sees and the
``reason`` label of ``herald_connections_closed_total`` never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Why a connection ends: the close code and message a client gets, and the metric label."""

    code: int
    message: str
    label: str
    # When the client should reconnect, in ms (0: its own choice). WS says it in
    # the close reason, SSE as a ``retry:`` line before the stream ends.
    retry_ms: int = 0
    # The client is told to come back at once: its connection is counted out of
    # its user's count before it is told (else, at its limit, it is refused 4029
    # for the very connection being closed).
    count_out_first: bool = False

    def with_message(self, message: str) -> Disconnect:
        # WebSocket close reasons are limited to 123 bytes.
        return replace(self, message=message.encode()[:123].decode(errors="ignore"))

    def reconnect_in(self, ms: int) -> Disconnect:
        """The same reason, telling the client to reconnect in ``ms``."""
        return replace(self, message=f"{self.message} in {ms} ms", retry_ms=ms)


CLIENT_CLOSED = Disconnect(1000, "", "client_closed")
GOING_AWAY = Disconnect(1001, "going away", "client_closed")
BAD_TOKEN = Disconnect(4001, "invalid token", "bad_token")
TOKEN_EXPIRED = Disconnect(4001, "token expired", "token_expired", count_out_first=True)
FORBIDDEN = Disconnect(4003, "forbidden", "forbidden")
BAD_REQUEST = Disconnect(4000, "bad request", "bad_request")
SLOW_CONSUMER = Disconnect(4008, "slow consumer: reconnect with since=<last id>", "slow_consumer", count_out_first=True)
STALLED = Disconnect(4008, "stalled: reconnect with since=<last id>", "slow_consumer", count_out_first=True)
RATE_LIMITED = Disconnect(4029, "rate limited", "rate_limited")
TOO_MANY_CONNECTIONS = Disconnect(4029, "too many connections for this user", "too_many_connections")
REPLACED = Disconnect(4029, "too many connections: this was the user's oldest", "replaced")
# The client opened a new stream naming this one (``replaces=``): it gave this one up.
RECONNECTED = Disconnect(4029, "replaced by the client's new connection (replaces=)", "reconnected")
TOO_BIG = Disconnect(1009, "frame too big", "too_big")
NOT_UTF8 = Disconnect(1007, "text frame is not UTF-8", "bad_request")
PROTOCOL_ERROR = Disconnect(1002, "protocol error", "bad_request")
HEARTBEAT_TIMEOUT = Disconnect(1006, "heartbeat timeout", "heartbeat_timeout")
DISCONNECTED = Disconnect(4009, "disconnected by the server: reconnect", "disconnected")
DISCONNECTED_FOR_GOOD = Disconnect(4403, "disconnected by the server: do not reconnect", "disconnected_for_good")
SHUTDOWN = Disconnect(1012, "node restarting: reconnect", "shutdown")
INTERNAL = Disconnect(1011, "internal error", "internal")
UNAVAILABLE = Disconnect(1013, "broker unavailable: try again", "unavailable")

# Every ``label`` above: the reasons of herald_connections_closed_total.
CLOSE_REASONS = tuple(dict.fromkeys(d.label for d in list(globals().values()) if isinstance(d, Disconnect)))

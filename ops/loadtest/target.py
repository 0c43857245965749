"""Where connections go, and the rule that they only ever go to this machine.

A load generator pointed at someone else's server is an attack, so every URL
(client, NATS, HTTP publish) must name a loopback host; anything else is
refused before a single socket opens.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Host as written in a URL → (address to connect to, family). "localhost" is
# mapped here rather than resolved, so /etc/hosts cannot point it elsewhere.
LOOPBACK = {
    "127.0.0.1": ("127.0.0.1", socket.AF_INET),
    "localhost": ("127.0.0.1", socket.AF_INET),
    "::1": ("::1", socket.AF_INET6),
}


class UnsafeTarget(ValueError):
    """A URL that is not for a loopback host (or not one we can speak)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # IP to connect to
    port: int
    family: int
    host_header: str  # as the URL wrote it, for Host:
    target: str  # path and query


def loopback_url(url: str, schemes: tuple[str, ...]) -> Endpoint:
    """Parse ``url`` and refuse it unless it is ``scheme://<loopback>[:port]/…``."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise UnsafeTarget(f"{url!r}: scheme must be one of {', '.join(schemes)} (TLS is not supported)")
    host = (parts.hostname or "").lower()
    if host not in LOOPBACK:
        raise UnsafeTarget(
            f"{url!r}: refusing to connect to {host or 'no host'!r}: only 127.0.0.1, localhost or ::1 are allowed"
        )
    try:
        port = parts.port or {"ws": 80, "http": 80, "nats": 4222}[parts.scheme]
    except ValueError as exc:
        raise UnsafeTarget(f"{url!r}: {exc}") from None
    address, family = LOOPBACK[host]
    host_header = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(address, port, family, host_header, target)


def expand(template: str, room: str = "r0", token: str = "", index: int = 0) -> str:
    """Fill ``{room}``, ``{token}`` and ``{i}``. Plain replacement, so other braces pass through."""
    return template.replace("{room}", room).replace("{token}", token).replace("{i}", str(index))

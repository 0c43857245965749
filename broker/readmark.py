"""A stored read position: the sequence, and the stream it counts in.

Sequences start over when the stream is recreated (deleted by an operator,
a new cluster, a restore), while the read positions in ``<stream>_read``
stay: a position is only trusted for the stream it was written against
(its creation time names it), and never beyond that stream's last sequence.
Anything else reads as "nothing read", so the user's held inbox is unread
again rather than silently skipped forever.
"""

from __future__ import annotations

from datetime import datetime


def stream_id(created: datetime | None) -> str:
    """What names one incarnation of the stream: its creation time."""
    return f"{created.timestamp():.6f}" if created is not None else "0"


def encode(seq: int, stream: str) -> bytes:
    return b"%d %s" % (seq, stream.encode())


def decode(value: bytes | None) -> tuple[int, str | None]:
    """(sequence, stream id); the id is None for a position stored before
    they carried one, and a value that cannot be read is (0, None)."""
    seq, _, stream = (value or b"").partition(b" ")
    if not seq.isdigit():
        return 0, None
    return int(seq), stream.decode(errors="replace") or None


def trusted(value: bytes | None, stream: str, last: int) -> tuple[int, bool]:
    """The position to use, and whether the stored one was set aside
    (another stream's, or past this one's last sequence)."""
    seq, written_for = decode(value)
    if (written_for is not None and written_for != stream) or seq > last:
        return 0, True
    return seq, False

"""Herald's faster NATS header parsing (broker/dispatch.py) reads every
header block exactly as nats-py's own does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from broker.dispatch import DispatchingClient

PIECES = [b"Nats-Sequence", b"a b", b":", b": ", b"\t", b" ", b"\r\n", b"\r", b"\n", b"\xff", b"\xc3\xa9", b"x", b"42"]


@given(st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join) | st.binary(max_size=200))
def test_headers_parse_as_nats_py_parses_them(raw: bytes) -> None:
    assert DispatchingClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_a_jetstream_reply_block() -> None:
    raw = b"Nats-Stream: S\r\nNats-Sequence: 12\r\nNats-Time-Stamp: 2026-12-06T00:30:54.671303694Z\r\n\r\n"
    assert DispatchingClient._parse_header_lines(raw) == {
        "Nats-Stream": "S",
        "Nats-Sequence": "12",
        "Nats-Time-Stamp": "2026-12-06T00:30:54.671303694Z",
    }


def test_only_ascii_whitespace_is_trimmed_as_nats_py_trims_it() -> None:
    for raw in (b"\x1c:", b"A:\x1cv\x85", b"\x1fB: x"):
        assert DispatchingClient._parse_header_lines(raw) == Client._parse_header_lines(raw), raw

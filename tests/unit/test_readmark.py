"""Stored read positions (broker/readmark.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.readmark import decode, encode, stream_id, trusted

NOW = stream_id(datetime(2026, 12, 6, tzinfo=UTC))
OLD = stream_id(datetime(2026, 1, 1, tzinfo=UTC))


def test_a_position_round_trips_with_its_stream() -> None:
    assert decode(encode(42, NOW)) == (42, NOW)
    assert decode(b"17") == (17, None)  # stored before positions named their stream
    assert decode(None) == (0, None) and decode(b"garbage") == (0, None)


def test_only_this_streams_positions_within_its_end_are_trusted() -> None:
    assert trusted(encode(42, NOW), NOW, 100) == (42, False)
    assert trusted(encode(42, NOW), NOW, 42) == (42, False)  # at the last message: nothing unread
    assert trusted(encode(42, OLD), NOW, 100) == (0, True)  # another incarnation of the stream
    assert trusted(encode(420, NOW), NOW, 100) == (0, True)  # past the end
    assert trusted(b"17", NOW, 100) == (17, False) and trusted(b"170", NOW, 100) == (0, True)
    assert trusted(None, NOW, 100) == (0, False)

"""Channel ids, channel names, subjects, event names and stream timestamps
(broker/channels.py, broker/timestamps.py). Pure functions: no loop, no network."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest

from broker.channels import (
    BROADCAST,
    InvalidChannel,
    Subjects,
    check_event,
    check_id,
    client_name,
    parse_channel,
    parse_seq,
    room_channel,
    user_channel,
)
from broker.timestamps import parse_rfc3339

VALID_IDS = [
    "a",
    "A",
    "0",
    "user_1",
    "a:b@c=d+e-f",
    "lobby",
    "x" * 128,
    "_",
    "-",
    "9z:Z",
]

INVALID_IDS = [
    "",
    ".",
    "a.b",
    "*",
    ">",
    "a*",
    "a>",
    "a b",
    " a",
    "a ",
    "a\tb",
    "a\nb",
    "a\n",  # `$` would accept this; fullmatch must not
    "a\r",
    "a\x00b",
    "ä",
    "a\u2024b",  # ONE DOT LEADER, looks like a.b
    "a\u2027b",  # HYPHENATION POINT
    "\uff0a",  # FULLWIDTH ASTERISK
    "\uff1e",  # FULLWIDTH GREATER-THAN SIGN
    "\u0430",  # Cyrillic a
    "\u0661",  # ARABIC-INDIC DIGIT ONE
    "a/b",
    "a\\b",
    "a,b",
    "a$b",
    "x" * 129,
]

NON_STRINGS = [None, 1, 1.5, b"a", ["a"], ("a",), {"a": 1}, True]


@pytest.mark.parametrize("value", VALID_IDS)
def test_valid_ids_are_accepted(value: str) -> None:
    assert check_id("room", value) == value
    assert room_channel(value) == f"room:{value}"
    assert user_channel(value) == f"user:{value}"
    assert parse_channel(f"room:{value}") == f"room:{value}"
    assert parse_channel(f"user:{value}") == f"user:{value}"


@pytest.mark.parametrize("value", INVALID_IDS)
def test_invalid_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidChannel):
        check_id("room", value)
    with pytest.raises(InvalidChannel):
        room_channel(value)
    with pytest.raises(InvalidChannel):
        user_channel(value)
    with pytest.raises(InvalidChannel):
        parse_channel(f"room:{value}")
    with pytest.raises(InvalidChannel):
        parse_channel(f"user:{value}")


@pytest.mark.parametrize("value", NON_STRINGS, ids=repr)
def test_non_string_ids_are_refused(value: object) -> None:
    with pytest.raises(InvalidChannel):
        check_id("user", value)
    with pytest.raises(InvalidChannel):
        parse_channel(value)


def test_invalid_channel_is_a_value_error_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="invalid user id"):
        check_id("user", "*")


def test_id_length_boundary() -> None:
    assert check_id("room", "r" * 128)
    with pytest.raises(InvalidChannel):
        check_id("room", "r" * 129)


@pytest.mark.parametrize(
    "name",
    ["broadcast", "room:lobby", "user:alice", "room:a:b", "user:a@b=c+d-e_f", "room:" + "x" * 128],
)
def test_parse_channel_accepts(name: str) -> None:
    assert parse_channel(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "room",
        "room:",
        "user",
        "user:",
        "Broadcast",
        "broadcast:x",
        "topic:a",
        "rooms:a",
        ":a",
        "room:a.b",
        "room:*",
        "user:>",
        "room: a",
        "ROOM:a",
        "room:" + "x" * 129,
        "room:\uff0a",
    ],
)
def test_parse_channel_refuses(name: str) -> None:
    with pytest.raises(InvalidChannel):
        parse_channel(name)


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("1042", 1042), (str(2**63 - 1), 2**63 - 1), ("007", 7), (5, 5), (0, 0)]
)
def test_parse_seq_accepts(text: str, value: int) -> None:
    assert parse_seq(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-1",
        "+1",
        "1.5",
        " 1",
        "1 ",
        "1\n",
        "\u00b2",
        "\u0661",
        "\uff11",
        "1" * 21,
        "9" * 20,
        str(2**63),
        "0x10",
        None,
        -5,
        2**63,
        True,
        1.5,
        b"1",
    ],
    ids=repr,
)
def test_parse_seq_refuses(text: object) -> None:
    with pytest.raises(InvalidChannel):
        parse_seq(text)


def test_client_name() -> None:
    assert client_name("user:alice") == "user"
    assert client_name("room:lobby") == "room:lobby"
    assert client_name(BROADCAST) == BROADCAST


# --- subjects ------------------------------------------------------------------------------------------------

ROUND_TRIP_CHANNELS = ["broadcast", "room:lobby", "user:alice", "room:a:b@c=d+e-f", "user:" + "u" * 128]


@pytest.mark.parametrize("name", ROUND_TRIP_CHANNELS)
def test_subjects_round_trip_default_prefix(name: str) -> None:
    channel = parse_channel(name)
    s = Subjects()
    inp = s.input_subject(channel)
    live = s.live_subject(channel)
    assert inp.startswith("herald.")
    assert live.startswith("herald_live.")
    assert s.channel_of(inp) == channel
    assert s.channel_of(live) == channel


@pytest.mark.parametrize("name", ROUND_TRIP_CHANNELS)
@pytest.mark.parametrize(
    ("prefix", "live_prefix"),
    [("herald", "herald_live"), ("app.herald", "app.live"), ("t1", "t1_live"), ("a", "b.c.d"), ("x_y-z", "live")],
)
def test_subjects_round_trip_custom_prefixes(name: str, prefix: str, live_prefix: str) -> None:
    channel = parse_channel(name)
    s = Subjects(prefix, live_prefix)
    assert s.input_subject(channel).startswith(prefix + ".")
    assert s.live_subject(channel).startswith(live_prefix + ".")
    assert s.channel_of(s.input_subject(channel)) == channel
    assert s.channel_of(s.live_subject(channel)) == channel


def test_subject_shapes() -> None:
    s = Subjects()
    assert s.input_subject(parse_channel("room:lobby")) == "herald.room.lobby"
    assert s.input_subject(parse_channel("user:alice")) == "herald.user.alice"
    assert s.input_subject(parse_channel("broadcast")) == "herald.broadcast"
    assert s.live_subject(parse_channel("room:lobby")) == "herald_live.room.lobby"
    assert s.stream_subjects() == ["herald.user.>", "herald.room.>", "herald.broadcast"]


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "herald",
        "herald.",
        "herald.room",
        "herald.room.",
        "herald.room.a.b",
        "herald.room.*",
        "herald.room.>",
        "herald.user.*",
        "herald.>",
        "herald.*",
        "herald.topic.a",
        "herald.broadcast.x",
        "herald.broadcastx",
        "heraldx.room.a",
        "herald_livex.room.a",
        "other.room.a",
        "other.herald.room.a",
        "room.a",
        "broadcast",
        "herald_live",
        "herald_live.room",
        "herald_live.room.a b",
        "herald.room.\uff0a",
    ],
)
def test_channel_of_refuses_foreign_or_malformed_subjects(subject: str) -> None:
    assert Subjects().channel_of(subject) is None


@pytest.mark.parametrize(
    ("prefix", "live_prefix"),
    [
        ("herald", "herald"),
        ("herald", "herald.live"),
        ("herald", "herald.a.b"),
    ],
)
def test_subjects_refuses_live_prefix_inside_prefix(prefix: str, live_prefix: str) -> None:
    with pytest.raises(InvalidChannel):
        Subjects(prefix, live_prefix)


@pytest.mark.parametrize(("prefix", "live_prefix"), [("herald.in", "herald"), ("a.b.c", "a"), ("a.b", "a")])
def test_subjects_refuses_prefix_inside_live_prefix(prefix: str, live_prefix: str) -> None:
    # The mirror case: RePublish dest "<live>.>" would overlap the stream subjects "<prefix>.*.>"
    # (nats-server refuses such a stream as a republish cycle).
    with pytest.raises(InvalidChannel):
        Subjects(prefix, live_prefix)


@pytest.mark.parametrize("value", ["", "*", "herald.", ".herald", "her ald", "herald.>", "a..b", "h\u00e9rald"])
def test_subjects_refuses_bad_prefixes(value: str) -> None:
    with pytest.raises(InvalidChannel):
        Subjects(value, "ok_live")
    with pytest.raises(InvalidChannel):
        Subjects("ok", value)


def test_similar_prefixes_do_not_collide() -> None:
    # "herald_live" starts with "herald" but is not inside it; each subject maps back once.
    s = Subjects("herald", "herald_live")
    assert s.channel_of("herald_live.room.a") == "room:a"
    assert s.channel_of("herald.room.a") == "room:a"
    t = Subjects("herald_live", "herald")
    assert t.channel_of("herald_live.room.a") == "room:a"
    assert t.channel_of("herald.room.a") == "room:a"


# --- event names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["message", "chat.new", "a:b@c+d-e_f", "E" * 64, "x", "typing.start"])
def test_check_event_accepts(value: str) -> None:
    assert check_event(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "E" * 65, "a b", "a\nb", "a\rb", "message\n", "évt", "a=b", "a/b", None, 5, b"message"],
    ids=repr,
)
def test_check_event_refuses(value: object) -> None:
    with pytest.raises(InvalidChannel):
        check_event(value)


# --- timestamps ----------------------------------------------------------------------------------------------


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_parse_rfc3339_nanoseconds() -> None:
    got = parse_rfc3339("2026-11-23T17:12:22.123456789Z")
    assert got == pytest.approx(_ts("2026-11-23T17:12:22+00:00") + 0.123456789, abs=1e-6)


def test_parse_rfc3339_short_fraction() -> None:
    assert parse_rfc3339("2026-11-23T17:12:22.5Z") == pytest.approx(_ts("2026-11-23T17:12:22.5+00:00"), abs=1e-6)


def test_parse_rfc3339_no_fraction() -> None:
    assert parse_rfc3339("2026-11-23T17:12:22Z") == _ts("2026-11-23T17:12:22+00:00")


def test_parse_rfc3339_uses_the_cache_consistently() -> None:
    # Same whole second, different fractions: the cached second must not leak a fraction.
    a = parse_rfc3339("2030-01-01T00:00:00.250Z")
    b = parse_rfc3339("2030-01-01T00:00:00.750Z")
    c = parse_rfc3339("2030-01-01T00:00:00Z")
    base = _ts("2030-01-01T00:00:00+00:00")
    assert (a, b, c) == (pytest.approx(base + 0.25), pytest.approx(base + 0.75), base)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-23T17:12:22.123456+00:00",
        "2026-11-23T17:12:22+00:00",
        "2026-11-23T19:12:22.5+02:00",
        "2026-11-23T15:12:22.25-02:00",
        "2026-11-23T19:12:22+02:00",
    ],
)
def test_parse_rfc3339_offsets(text: str) -> None:
    assert parse_rfc3339(text) == pytest.approx(_ts(text), abs=1e-6)


def test_parse_rfc3339_lowercase_and_tiny_fraction() -> None:
    base = _ts("2026-11-23T17:12:22+00:00")
    assert parse_rfc3339("2026-11-23t17:12:22.5z") == pytest.approx(base + 0.5)
    assert parse_rfc3339("2026-11-23T17:12:22.000000001Z") == pytest.approx(base + 1e-9, abs=1e-6)


@pytest.mark.parametrize("text", ["", "garbage", "2026-11-23", "2026-11-23T17:12:22.Z"])
def test_parse_rfc3339_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


@pytest.mark.parametrize(
    ("check", "value", "says"),
    [
        (lambda v: check_id("room", v), "a.b", "invalid room id 'a.b': must match"),
        (lambda v: check_id("user", v), "", "invalid user id '': must match"),
        (lambda v: check_id("room", v), "a\nb\x1b", "invalid room id 'a\\nb\\x1b'"),  # no line or escape reaches a log
        (lambda v: check_id("room", v), 5, "invalid room id 5:"),
        (parse_channel, "lobby", "invalid channel 'lobby': expected"),
        (parse_channel, "room:x*", "invalid room id 'x*'"),
        (check_event, "", "invalid event name '': must match"),
    ],
)
def test_refusals_name_the_value_quoted(check: Callable[[object], object], value: object, says: str) -> None:
    with pytest.raises(InvalidChannel) as refused:
        check(value)
    assert str(refused.value).startswith(says), refused.value


@pytest.mark.parametrize("value", ["r" * 5000, "\U0001f600" * 200, ["room"] * 10_000, {"a": "b" * 5000}])
def test_a_long_value_is_cut_so_the_refusal_fits_a_close_reason(value: object) -> None:
    """A 4000 close reason holds 123 bytes: the value is cut, the rule kept."""
    with pytest.raises(InvalidChannel) as refused:
        check_id("room", value)
    said = str(refused.value)
    assert said.isascii() and len(said) <= 123 and said.endswith("must match [A-Za-z0-9_:@=+-]{1,128}"), said


@pytest.mark.parametrize("value", ["9" * 20, "9" * 23, str(2**63), 2**63, 10**30])
def test_a_position_past_2_63_is_too_large(value: object) -> None:
    """Digits, but too many: it used to say "must be a stream id (a string of digits)"."""
    with pytest.raises(InvalidChannel, match="too large"):
        parse_seq(value)


@pytest.mark.parametrize("value", ["x", "-1", "1.5", "\u00b2", "", -1, 1.5, True])
def test_a_position_not_digits_is_said_so(value: object) -> None:
    with pytest.raises(InvalidChannel, match="string of digits"):
        parse_seq(value)

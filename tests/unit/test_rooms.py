"""Room settings refused at load (rooms across real nodes: tests/nats/test_rooms.py)."""

from __future__ import annotations


def test_bad_room_history_rule_is_refused() -> None:
    from gateway.settings import ConfigError, load_settings

    for bad in ("chat-*", "chat-*=x/1", "=3/60", "chat-*=3/-1", "chat-*=0/60"):
        try:
            load_settings(env={"HERALD_ROOMS_HISTORY": bad}, use_default_file=False)
        except ConfigError as exc:
            assert "rooms.history" in str(exc), exc
        else:
            raise AssertionError(f"{bad!r} was accepted")

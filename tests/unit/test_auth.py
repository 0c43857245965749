"""Authentication without a node: the verified-token cache (the HS256 fast
path against PyJWT: tests/unit/test_hs256.py; the rest of the authentication
tests drive real nodes: tests/nats/test_auth.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth import Authenticator, AuthError
from gateway.settings import JwtSettings

from ..helpers import SECRET, token

OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"


def test_verified_tokens_are_cached_but_expiry_still_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as time_module

    from gateway.auth import Authenticator, AuthError
    from gateway.settings import JwtSettings

    from ..helpers import SECRET

    calls = 0
    real_decode = Authenticator._decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(Authenticator, "_decode", counting_decode)
    auth = Authenticator(JwtSettings(secret=SECRET))
    tok = token("alice", ttl=60)
    assert auth.verify(tok).user == "alice"
    assert auth.verify(tok).user == "alice"
    assert calls == 1  # the second connect with the same token skipped the signature check
    forged = token("alice", key=OTHER_SECRET)
    for _ in range(2):
        with pytest.raises(AuthError):
            auth.verify(forged)
    assert calls == 3  # refused tokens are never cached
    # Once a cached token expires it is refused, as a fresh one would be.
    short = token("bob", ttl=2)
    identity = auth.verify(short)
    assert identity.user == "bob" and identity.expires is not None
    later = identity.expires + 0.1  # the clock past its expiry, not a sleep until then
    monkeypatch.setattr(time_module, "time", lambda: later)
    with pytest.raises(AuthError) as err:
        auth.verify(short)
    assert err.value.reason == "expired"


def test_an_exp_as_a_string_or_too_large_for_a_float_is_read_or_refused() -> None:
    import time

    import jwt

    from gateway.auth import Authenticator, AuthError
    from gateway.settings import JwtSettings

    from ..helpers import SECRET

    auth = Authenticator(JwtSettings(secret=SECRET))
    later = int(time.time()) + 600
    as_text = jwt.encode({"sub": "alice", "exp": str(later)}, SECRET, algorithm="HS256")
    assert auth.verify(as_text).expires == later  # PyJWT takes it: so does the session's expiry
    huge = jwt.encode({"sub": "alice", "exp": 10**400}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as refused:
        auth.verify(huge)
    assert refused.value.reason == "malformed"


@pytest.mark.parametrize("aud", ["billing-api", ["billing-api", "other"]])
def test_a_token_for_some_audience_is_refused_where_none_is_configured(aud: object) -> None:
    """It was minted for another service (RFC 7519 4.1.3): whoever got it
    there must not connect here as its user. PyJWT's default too."""
    auth = Authenticator(JwtSettings(secret=SECRET))
    with pytest.raises(AuthError) as refused:
        auth.verify(token("alice", aud=aud))
    assert refused.value.reason == "bad_audience"
    assert auth.verify(token("alice", aud="")).user == "alice"  # an empty aud names no one

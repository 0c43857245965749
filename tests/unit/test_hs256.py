"""The HS256 fast path (gateway/hs256.py) against PyJWT: for every token, the
same Identity or the same refusal (reason and message) as ``jwt.decode``.

The property draws tokens by hand, segment by segment (header and claims as
raw JSON text, so duplicate keys, 1e400, NaN, lone surrogates and non-objects
can be drawn), signs them with the right key or not, and sometimes mangles the
result. Budget: ``HERALD_FUZZ_EXAMPLES`` examples (tests/fuzzing.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.auth import Authenticator, AuthError, Identity
from gateway.hs256 import HS256
from gateway.settings import ConfigError, JwtSettings, load_settings

from ..fuzzing import FUZZ, REPORTS, fuzz_report, one_in  # noqa: F401 - fuzz_report: autouse
from ..helpers import SECRET, token

OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"
PREVIOUS_SECRET = "the-secret-being-replaced-long-enough-for-hs256"
AUDIENCE = "herald"
ISSUER = "https://auth.example"
# Seconds from now: clear of the boundaries (now, now ± leeway) by 15 s at least.
OFFSETS = (-(10**6), -3600, -100, -15, 15, 100, 3600, 10**6)
LEEWAYS = (0.0, 30.0)

Outcome = tuple[Any, ...]


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(signing_input: str, key: str) -> str:
    return b64url(hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest())


def outcome(decode: Callable[[str], Identity], tok: str) -> Outcome:
    try:
        return ("accepted", decode(tok))
    except AuthError as exc:
        return ("refused", exc.reason, str(exc))
    except (ArithmeticError, LookupError, ValueError, TypeError) as exc:  # e.g. OverflowError: exp of 400 digits
        return ("raised", type(exc).__name__)


_authenticators: dict[JwtSettings, tuple[Authenticator, Authenticator]] = {}


def authenticators(jwt_settings: JwtSettings) -> tuple[Authenticator, Authenticator]:
    """(with the fast path, PyJWT only) for these settings."""
    if jwt_settings not in _authenticators:
        fast, reference = Authenticator(jwt_settings), Authenticator(jwt_settings)
        reference._hs256 = ()
        assert fast._hs256
        _authenticators[jwt_settings] = (fast, reference)
    return _authenticators[jwt_settings]


def decided_by_fast_path(auth: Authenticator, tok: str) -> bool:
    assert auth._hs256
    try:
        return auth._fast_claims(tok) is not None
    except jwt.InvalidTokenError:
        return True


# -- JSON text ------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# JSON text Python's json reads but orjson does not, or reads otherwise; and text neither reads.
ODD_LITERALS = (
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "1" + "0" * 30,
    "9" * 400,
    '"\\ud800"',
    '"\\udfff x"',
    "[" * 150 + "]" * 150,
    "[" * 1100 + "]" * 1100,
    "{",
    "",
    "01",
)


def raw_value(values: list[Any]) -> st.SearchStrategy[str]:
    """JSON text: one of ``values`` (or anything at all, now and then), or an odd literal."""
    return st.one_of(
        st.sampled_from(values).map(json.dumps),
        JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False)),
        st.sampled_from(ODD_LITERALS),
    )


def field(usual: list[Any], odd: st.SearchStrategy[str], absent: int = 1) -> st.SearchStrategy[str | None]:
    """A field's JSON text: usually one of ``usual``, else ``odd``; None (no field) ``absent`` times in 10."""
    choices = [st.sampled_from(usual).map(json.dumps)] * (9 - absent) + [odd] + [st.none()] * absent
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


def time_value(now: int, usual: list[int]) -> st.SearchStrategy[str]:
    odd = st.one_of(
        st.sampled_from(OFFSETS).map(lambda o: str(now + o)),
        st.sampled_from(OFFSETS).map(lambda o: str(now + o + 0.5)),  # a float
        st.sampled_from(OFFSETS).map(lambda o: json.dumps(str(now + o))),  # "1700000000": int() takes it
        raw_value([None, True, False, "soon", [], {}, 0, -1, 2**64, 2**63 - 1, 1.5]),
    )
    return field([now + o for o in usual], odd)


@st.composite
def json_object(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[str | None]], odd: int = 12) -> bytes:
    """A JSON object's bytes, its fields in any order, sometimes one twice; rarely something else
    (a list, a string, text that is no JSON, another encoding, a BOM)."""
    if draw(one_in(odd)):
        return draw(
            st.one_of(
                st.sampled_from([b"[]", b'"x"', b"null", b"", b"{", b"\xef\xbb\xbf{}", b"\xff{}", b"{}\x00"]),
                st.binary(max_size=12),
                st.builds(lambda t: f'{{"a":"{t}"}}'.encode("utf-16"), st.text(max_size=3)),
            )
        )
    names = draw(st.permutations(list(fields)))
    pairs = [(n, v) for n in names if (v := draw(fields[n])) is not None]
    if pairs and draw(one_in(8)):
        name, _ = draw(st.sampled_from(pairs))
        again = draw(fields[name])
        if again is not None:
            pairs.insert(draw(st.integers(0, len(pairs))), (name, again))
    if draw(one_in(8)):
        pairs.append((draw(st.text(max_size=5)), draw(raw_value([1]))))
    space = draw(st.sampled_from(["", "", " ", "\n", "\t "]))
    text = "{" + ",".join(f"{space}{json.dumps(k)}{space}:{space}{v}" for k, v in pairs) + space + "}"
    return text.encode("utf-8", "surrogatepass")


def header_fields() -> dict[str, st.SearchStrategy[str | None]]:
    return {
        "alg": field(["HS256"], raw_value(["none", "None", "HS512", "RS256", "hs256", "", ["HS256"], 5]), absent=0),
        "typ": field(["JWT"], raw_value(["at+jwt", 5])),
        "kid": field(["k1"], raw_value([5]), absent=5),
        "crit": field([["b64"]], raw_value([["exp"], [], "b64"]), absent=7),
        "b64": field([True], raw_value([False]), absent=7),
    }


def claim_fields(now: int) -> dict[str, st.SearchStrategy[str | None]]:
    def rooms() -> st.SearchStrategy[str | None]:
        return field([["lobby", "room:*"], [], "lobby"], raw_value([["a.b"], [""], [1], 5]), absent=3)

    return {
        "sub": field(["alice", "u" * 128], raw_value(["u" * 129, "a.b", "", "*", "é", "a b", 7, ["a"]])),
        "iat": time_value(now, [-3600, -100, -100, -100, 15, 100]),
        "nbf": time_value(now, [-100, -100, -100, -100, -15, 15, 100]),
        "exp": time_value(now, [3600, 3600, 3600, 3600, 100, 15, -15, -100]),
        "aud": field([AUDIENCE, [AUDIENCE, "x"]], raw_value(["other", ["x"], [], [1], "", 5, {"a": 1}])),
        "iss": field([ISSUER], raw_value(["https://evil.example", "", 5])),
        "jti": field(["id-1"], raw_value([5]), absent=5),
        "rooms": rooms(),
        "publish": rooms(),
    }


# -- tokens ---------------------------------------------------------------------


def mangle(tok: str, how: str, where: int) -> str:
    segments = tok.split(".")
    i = where % len(segments)
    s = segments[i]
    if how == "pad":
        segments[i] = s + "=" * (-len(s) % 4 or 4)
    elif how == "last_char" and s:  # stray trailing bits, or another signature
        segments[i] = s[:-1] + ("B" if s[-1] == "A" else "A")
    elif how == "drop_char" and s:
        segments[i] = s[:-1]
    elif how == "non_ascii":
        segments[i] = s[: where % (len(s) + 1)] + "é" + s[where % (len(s) + 1) :]
    elif how == "bad_char":
        segments[i] = s[: where % (len(s) + 1)] + "+/!"[where % 3] + s[where % (len(s) + 1) :]
    mangled = ".".join(segments)
    return {
        "space": f" {mangled}",
        "newline": f"{mangled}\n",
        "extra_segment": f"{mangled}.e30",
        "no_signature": mangled.rsplit(".", 1)[0],
        "empty_signature": mangled.rsplit(".", 1)[0] + ".",
        "swapcase": mangled.swapcase(),
    }.get(how, mangled)


MANGLINGS = [
    "pad",
    "last_char",
    "drop_char",
    "non_ascii",
    "bad_char",
    "space",
    "newline",
    "extra_segment",
    "no_signature",
    "empty_signature",
    "swapcase",
]


@st.composite
def tokens(draw: st.DrawFn, now: int) -> str:
    header = draw(json_object(header_fields(), odd=20)) if draw(one_in(3)) else b'{"alg":"HS256","typ":"JWT"}'
    signing_input = f"{b64url(header)}.{b64url(draw(json_object(claim_fields(now))))}"
    key = draw(st.sampled_from([SECRET] * 5 + [PREVIOUS_SECRET] * 2 + [OTHER_SECRET]))
    tok = f"{signing_input}.{sign(signing_input, key)}"
    if draw(one_in(4)):
        tok = mangle(tok, draw(st.sampled_from(MANGLINGS)), draw(st.integers(0, 200)))
    return tok


JWT_SETTINGS = st.builds(
    JwtSettings,
    secret=st.just(SECRET),
    secret_previous=st.sampled_from(["", PREVIOUS_SECRET]),  # a rotation: tokens of either secret are taken
    audience=st.sampled_from(["", AUDIENCE]),
    issuer=st.sampled_from(["", ISSUER]),
    require_exp=st.booleans(),
    leeway=st.sampled_from(LEEWAYS),
)
decided: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def hs256_report() -> Any:
    started = time.monotonic()
    yield
    if decided:
        elapsed = max(time.monotonic() - started, 1e-9)
        examples = sum(decided.values())
        REPORTS["hs256"] = {
            "examples": examples,
            "seconds": round(elapsed, 3),
            "per_second": round(examples / elapsed, 1),
            "notes": ", ".join(f"{k}: {v}" for k, v in decided.most_common()),
        }


@pytest.mark.timeout(0)
@settings(FUZZ)
@given(data=st.data(), jwt_settings=JWT_SETTINGS)
def test_fast_path_decides_as_pyjwt(data: st.DataObject, jwt_settings: JwtSettings) -> None:
    fast, reference = authenticators(jwt_settings)
    tok = data.draw(tokens(int(time.time())), label="token")
    by = "fast path" if decided_by_fast_path(fast, tok) else "PyJWT"
    expected = outcome(reference._decode, tok)
    assert outcome(fast._decode, tok) == expected
    label = f"{by}: {expected[0]} {expected[1] if expected[0] == 'refused' else ''}".strip()
    event(label)
    decided[label] += 1


def handmade(header: dict[str, Any], claims: dict[str, Any], key: str = SECRET) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{sign(signing_input, key)}"


def _common_tokens() -> dict[str, tuple[str, JwtSettings, str]]:
    """The tokens a connect storm brings: name -> (token, settings, expected outcome)."""
    now = int(time.time())
    plain = JwtSettings(secret=SECRET)
    both = JwtSettings(secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    hs = {"alg": "HS256", "typ": "JWT"}
    return {
        "valid": (token("alice", ["lobby", "room:*"]), plain, "accepted"),
        "valid_no_typ": (handmade({"alg": "HS256"}, {"sub": "a", "exp": now + 60}), plain, "accepted"),
        "valid_kid": (handmade({**hs, "kid": "k1"}, {"sub": "a", "exp": now + 60}), plain, "accepted"),
        "valid_aud_iss": (token("alice", aud=AUDIENCE, iss=ISSUER), both, "accepted"),
        "valid_aud_list": (token("alice", aud=["x", AUDIENCE], iss=ISSUER), both, "accepted"),
        "expired": (token("alice", ttl=-30), plain, "expired"),
        "not_yet_valid": (token("alice", nbf=now + 600), plain, "not_yet_valid"),
        "iat_future": (handmade(hs, {"sub": "a", "exp": now + 60, "iat": now + 600}), plain, "accepted"),
        "forged": (token("alice", key=OTHER_SECRET), plain, "bad_signature"),
        "no_sub": (handmade(hs, {"exp": now + 60}), plain, "bad_claims"),
        "no_exp": (handmade(hs, {"sub": "a"}), plain, "bad_claims"),
        "sub_dot": (token("a.b"), plain, "bad_claims"),
        "sub_int": (handmade(hs, {"sub": 7, "exp": now + 60}), plain, "malformed"),
        "rooms_bad": (token("alice", ["a.>"]), plain, "bad_claims"),
        "no_aud": (token("alice", iss=ISSUER), both, "bad_claims"),
        "wrong_aud": (token("alice", aud="other", iss=ISSUER), both, "bad_audience"),
        "no_iss": (token("alice", aud=AUDIENCE), both, "bad_claims"),
        "wrong_iss": (token("alice", aud=AUDIENCE, iss="https://evil.example"), both, "bad_issuer"),
    }


@pytest.mark.parametrize("name", list(_common_tokens()))
def test_common_tokens_never_fall_back_to_pyjwt(name: str) -> None:
    """The fast path decides these itself (else a connect storm pays PyJWT's cost again), as PyJWT would."""
    tok, jwt_settings, expected = _common_tokens()[name]
    fast, reference = authenticators(jwt_settings)
    assert decided_by_fast_path(fast, tok)
    got = outcome(fast._decode, tok)
    assert got == outcome(reference._decode, tok)
    assert (got[1] if got[0] == "refused" else got[0]) == expected


@pytest.mark.parametrize(
    "secret",
    ["-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n", '{"kty": "oct", "k": "c2VjcmV0"}'],
)
def test_a_secret_pyjwt_refuses_leaves_every_token_to_pyjwt(secret: str) -> None:
    assert HS256.for_secret(secret, ("sub", "exp"), None, None, 0.0) is None
    assert Authenticator(JwtSettings(secret=secret))._hs256 == ()


@pytest.mark.parametrize(
    "secret", ["-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n", "ssh-rsa AAAAB3NzaC1yc2E host"]
)
def test_a_secret_pyjwt_refuses_stops_the_node_at_load(secret: str) -> None:
    """PyJWT refuses it for every token (InvalidKeyError, not a token error):
    each stream was refused as a node error (1011, 500)."""
    with pytest.raises(ConfigError, match=r"jwt\.secret: looks like a public key"):
        load_settings(env={"HERALD_JWT_SECRET": secret}, use_default_file=False)

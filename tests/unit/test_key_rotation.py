"""Rotating the token keys without an outage (README: Rotating secrets): a node
with ``jwt.secret_previous`` / ``jwt.public_key_previous`` takes tokens signed
with either key, the HS256 fast path answering as PyJWT does; one without
refuses tokens of the old key. The publish and admin keys: tests/nats/test_key_rotation.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth import Authenticator, AuthError
from gateway.settings import ConfigError, JwtSettings, load_settings

from ..helpers import SECRET, token

OLD_SECRET = "the-old-secret-that-is-long-enough-for-hs256"
STRANGER = "a-third-secret-that-is-long-enough-for-hs256"


def outcome(auth: Authenticator, tok: str) -> str:
    try:
        return "ok " + auth.verify(tok).user
    except AuthError as exc:
        return exc.reason


def pyjwt_only(settings: JwtSettings) -> Authenticator:
    """The same settings with the HS256 fast path off: PyJWT decides every token."""
    auth = Authenticator(settings)
    auth._hs256 = ()  # type: ignore[assignment]
    return auth


def odd(key: str, **header: Any) -> str:
    """A token of an unusual shape (padded base64): the fast path leaves it to PyJWT."""
    tok = jwt.encode({"sub": "odd", "exp": 2**40}, key, algorithm="HS256", headers=header or None)
    head, payload, signature = tok.split(".")
    return f"{head}.{payload}{'=' * (-len(payload) % 4)}.{signature}"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def with_kid(key: str, kid: object, user: str = "kid") -> str:
    """Signed by hand: PyJWT would not sign a kid that is not a string."""
    head = b64url(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
    signing_input = f"{head}.{b64url(orjson.dumps({'sub': user, 'exp': 2**40}))}"
    return f"{signing_input}.{b64url(hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest())}"


ROTATING = JwtSettings(secret=SECRET, secret_previous=OLD_SECRET)
TOKENS = {
    "new": token("new"),
    "old": token("old", key=OLD_SECRET),
    "stranger": token("x", key=STRANGER),
    "old expired": token("x", key=OLD_SECRET, ttl=-10),
    "new expired": token("x", ttl=-10),
    "old odd": odd(OLD_SECRET),
    "stranger odd": odd(STRANGER),
    "old kid": with_kid(OLD_SECRET, "2025-01"),
    "new kid": with_kid(SECRET, "2026-01"),
    "old kid not a string": with_kid(OLD_SECRET, 7),
    "stranger kid": with_kid(STRANGER, "2026-01"),
    "bad payload": "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24." + base64.urlsafe_b64encode(b"x" * 32).decode().rstrip("="),
}
EXPECTED = {
    "new": "ok new",
    "old": "ok old",
    "stranger": "bad_signature",
    "old expired": "expired",
    "new expired": "expired",
    "old odd": "ok odd",
    "stranger odd": "bad_signature",
    "old kid": "ok kid",
    "new kid": "ok kid",
    "old kid not a string": "malformed",
    "stranger kid": "bad_signature",
    "bad payload": "bad_signature",
}


@pytest.mark.parametrize("name", list(TOKENS))
def test_a_rotating_hs256_node_takes_both_secrets_on_both_paths(name: str) -> None:
    fast, slow = Authenticator(ROTATING), pyjwt_only(ROTATING)
    assert outcome(fast, TOKENS[name]) == outcome(slow, TOKENS[name]) == EXPECTED[name]


def test_once_the_previous_secret_is_dropped_its_tokens_are_refused() -> None:
    auth = Authenticator(JwtSettings(secret=SECRET))
    assert outcome(auth, TOKENS["old"]) == outcome(pyjwt_only(JwtSettings(secret=SECRET)), TOKENS["old"])
    assert outcome(auth, TOKENS["old"]) == "bad_signature"
    assert outcome(auth, TOKENS["old kid"]) == "bad_signature"


def pem_pair(tmp_path: Path, name: str, private: Any) -> tuple[str, bytes]:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return str(path), private


def test_a_rotating_public_key_node_takes_both_keys_even_of_another_algorithm(tmp_path: Path) -> None:
    new_path, new = pem_pair(tmp_path, "new", ec.generate_private_key(ec.SECP256R1()))
    old_path, old = pem_pair(tmp_path, "old", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    stranger = ec.generate_private_key(ec.SECP256R1())
    auth = Authenticator(JwtSettings(public_key=new_path, public_key_previous=old_path))
    assert outcome(auth, token("a", key=new, algorithm="ES256")) == "ok a"
    assert outcome(auth, token("b", key=old, algorithm="RS256")) == "ok b"
    kid = jwt.encode({"sub": "k", "exp": 2**40}, old, algorithm="RS256", headers={"kid": "2025"})
    assert outcome(auth, kid) == "ok k"
    assert outcome(auth, token("c", key=stranger, algorithm="ES256")) == "bad_signature"
    assert outcome(auth, token("d", key=SECRET)) == "bad_algorithm"  # HS256: no secret is configured
    # RS256 is accepted only for the previous (RSA) key: an RS256 token that key did not sign is refused.
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert outcome(auth, token("e", key=other_rsa, algorithm="RS256")) == "bad_signature"
    done = Authenticator(JwtSettings(public_key=new_path))
    assert outcome(done, token("b", key=old, algorithm="RS256")) == "bad_algorithm"


def test_a_move_from_a_secret_to_a_public_key_takes_both(tmp_path: Path) -> None:
    new_path, new = pem_pair(tmp_path, "new", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    auth = Authenticator(JwtSettings(public_key=new_path, secret_previous=OLD_SECRET))
    assert outcome(auth, token("a", key=new, algorithm="RS256")) == "ok a"
    assert outcome(auth, token("b", key=OLD_SECRET)) == "ok b"
    assert outcome(auth, token("c", key=STRANGER)) == "bad_signature"


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, use_default_file=False)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_previous_keys_come_from_the_environment(tmp_path: Path) -> None:
    path, _ = pem_pair(tmp_path, "old", ec.generate_private_key(ec.SECP256R1()))
    env = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_JWT_SECRET_PREVIOUS": OLD_SECRET,
        "HERALD_JWT_PUBLIC_KEY_PREVIOUS": path,
        "HERALD_PUBLISH_KEY": "new-publish",
        "HERALD_PUBLISH_KEY_PREVIOUS": "old-publish",
        "HERALD_ADMIN_KEY": "new-admin",
        "HERALD_ADMIN_KEY_PREVIOUS": "old-admin",
    }
    s = load_settings(env=env, use_default_file=False)
    assert (s.jwt.secret_previous, s.jwt.public_key_previous) == (OLD_SECRET, path)
    assert (s.publish.key_previous, s.admin.key_previous) == ("old-publish", "old-admin")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HERALD_JWT_SECRET_PREVIOUS": OLD_SECRET}, "jwt.secret_previous"),
        ({"HERALD_PUBLISH_KEY_PREVIOUS": "old"}, "publish.key_previous"),
        ({"HERALD_ADMIN_KEY_PREVIOUS": "old"}, "admin.key_previous"),
        (
            {"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_PUBLIC_KEY_PREVIOUS": "/nonexistent.pem"},
            "jwt.public_key_previous",
        ),
        ({"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_SECRET_PREVIOUS": SECRET}, "jwt.secret_previous"),
        ({"HERALD_PUBLISH_KEY": "k", "HERALD_PUBLISH_KEY_PREVIOUS": "k"}, "publish.key_previous"),
        # Signed with the old secret only: a receiver already on the new one refuses every webhook.
        ({"HERALD_HOOKS_SECRET_PREVIOUS": OLD_SECRET}, "hooks.secret_previous"),
        ({"HERALD_AUTH_CONNECT_SECRET_PREVIOUS": OLD_SECRET}, "auth.connect_secret_previous"),
    ],
    ids=["secret-alone", "publish-alone", "admin-alone", "missing-file", "same-secret", "same-key", "hooks", "connect"],
)
def test_a_previous_key_without_a_current_one_or_equal_to_it_stops_the_node(env: dict[str, str], named: str) -> None:
    assert named in config_error(env)


def test_a_previous_secret_pyjwt_refuses_stops_the_node() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
    message = config_error({"HERALD_JWT_SECRET": SECRET, "HERALD_JWT_SECRET_PREVIOUS": pem})
    assert "jwt.secret_previous" in message and "MFkw" not in message


def test_the_refusal_names_no_secret() -> None:
    message = str(orjson.dumps(config_error({"HERALD_JWT_SECRET_PREVIOUS": OLD_SECRET})))
    assert OLD_SECRET not in message

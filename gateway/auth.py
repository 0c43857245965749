"""JWT verification: who a connection is and which rooms it may use.

The accepted algorithm is pinned by the configured key — HS256 for a shared
secret, RS256 or ES256 for a public key file — so ``alg: none`` and HS/RS key
confusion are refused by construction.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from broker.channels import ID_RE, glob_match

from .hs256 import HS256
from .public_keys import key_algorithm
from .settings.schema import JwtSettings

MAX_TOKEN_LENGTH = 8192
VERIFIED_CACHE_SIZE = 10_000
# A room id or glob in a token's rooms / publish (and in a connect hook's answer).
GLOB_RE = re.compile(r"[A-Za-z0-9_:@=+*?-]{1,128}")


# PyJWT's errors → (metric reason, message for the client); the first match wins.
_REFUSALS: tuple[tuple[type[jwt.InvalidTokenError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token not yet valid"),
    (jwt.InvalidAudienceError, "bad_audience", "wrong token audience"),
    (jwt.InvalidIssuerError, "bad_issuer", "wrong token issuer"),
    (jwt.InvalidAlgorithmError, "bad_algorithm", "token algorithm not accepted"),
    (jwt.InvalidSignatureError, "bad_signature", "token signature invalid"),
    (jwt.InvalidTokenError, "malformed", "malformed token"),
)


class AuthError(Exception):
    """A refused token. ``reason`` is the metric label, the message is for the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the client is, and what it may do."""

    user: str
    rooms: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    expires: float | None = None  # when the node stops honouring it (a token's exp + jwt.leeway)

    def may_join(self, room: str) -> bool:
        return glob_match(self.rooms, room)

    def may_publish(self, room: str) -> bool:
        return glob_match(self.publish, room)


def _globs(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and GLOB_RE.fullmatch(v) for v in value):
        raise AuthError("bad_claims", f"claim {name!r} must be a list of room ids or globs")
    return tuple(value)


# Told of each refused token, with who presented it (a peer address or a conn id).
OnRefused = Callable[[AuthError, str], None]


class Authenticator:
    """Verifies tokens (and keeps the verified ones for reconnects)."""

    def __init__(self, settings: JwtSettings, on_refused: OnRefused | None = None) -> None:
        self._settings = settings
        self._on_refused = on_refused
        self._required = ["sub", "exp"] if settings.require_exp else ["sub"]
        # Each key pins its own algorithm; the current key first, then those a
        # rotation replaces (jwt.*_previous). A token's kid is not consulted.
        keys = (
            _key(settings.secret, settings.public_key),
            _key(settings.secret_previous, ""),
            _key("", settings.public_key_previous),
        )
        self._keys: list[tuple[Any, str]] = [k for k in keys if k is not None]
        secrets = [s for s in (settings.secret, settings.secret_previous) if s]
        fast = [
            HS256.for_secret(
                s, tuple(self._required), settings.audience or None, settings.issuer or None, settings.leeway
            )
            for s in secrets
        ]
        # A secret PyJWT refuses leaves every token to PyJWT, which says so per token.
        self._hs256: tuple[HS256, ...] = () if None in fast else tuple(h for h in fast if h is not None)
        self._verified: dict[str, Identity] = {}

    @property
    def configured(self) -> bool:
        return bool(self._settings.public_key or self._settings.secret)

    def authenticate(self, token: str | None, peer: str) -> Identity:
        """``verify``, telling ``on_refused`` of a refusal before raising it."""
        try:
            return self.verify(token)
        except AuthError as exc:
            if self._on_refused is not None:
                self._on_refused(exc, peer)
            raise

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing", "missing token")
        if not self.configured:
            raise AuthError("not_configured", "authentication is not configured on this node")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("too_large", "token too large")
        # Reconnects (EventSource retries, reloads, a reconnect storm after a
        # node dies) bring back tokens already verified: a check costs ~9 us
        # (HS256, hs256.py) to ~60-95 us (RS256/ES256, PyJWT). Only verified
        # tokens are kept; expiry is checked on use.
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires is None or cached.expires > time.time():
                return cached
            del self._verified[token]
        identity = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = identity
        return identity

    def _fast_claims(self, token: str) -> dict[str, Any] | None:
        """The HS256 fast path with each secret in turn: the first whose
        signature matches decides; None leaves the token to PyJWT."""
        for i, hs256 in enumerate(self._hs256):
            try:
                return hs256.claims(token)
            except jwt.InvalidSignatureError:
                if i == len(self._hs256) - 1:
                    raise
        return None

    def _pyjwt_claims(self, token: str) -> dict[str, Any]:
        """``jwt.decode`` with each key in turn: the first that takes the
        token's algorithm and signature decides. Refused by all: a bad
        signature if some key had the token's algorithm, else the algorithm."""
        s = self._settings
        refusal: jwt.InvalidTokenError | None = None
        for key, algorithm in self._keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=s.audience or None,
                    issuer=s.issuer or None,
                    leeway=s.leeway,
                    # A token with an aud needs jwt.audience set. iat is not checked
                    # against the clock: it says when the token was issued, not
                    # from when it is valid (that is nbf, RFC 7519 4.1.5-6), and
                    # a node a second behind its issuer would refuse every fresh token.
                    options={"require": self._required, "verify_iat": False},
                )
            except jwt.InvalidSignatureError as exc:
                refusal = exc
            except jwt.InvalidAlgorithmError as exc:
                refusal = refusal or exc
        raise refusal or jwt.InvalidTokenError("no key configured")

    def _decode(self, token: str) -> Identity:
        s = self._settings
        try:
            # PyJWT for public keys and for HS256 tokens of an unusual shape.
            claims = self._fast_claims(token)
            if claims is None:
                claims = self._pyjwt_claims(token)
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("bad_claims", f"token lacks claim {exc.claim!r}") from None
        except jwt.InvalidTokenError as exc:
            reason, message = next((r, m) for cls, r, m in _REFUSALS if isinstance(exc, cls))
            raise AuthError(reason, message) from None
        except (OverflowError, ValueError, TypeError):  # e.g. "exp": 1e400 in a signed token
            raise AuthError("malformed", "malformed token") from None
        if "iat" in claims and not _numeric_date(claims["iat"]):
            raise AuthError("malformed", "malformed token")  # as PyJWT's iat check had it
        sub = claims.get("sub")
        if not isinstance(sub, str) or ID_RE.fullmatch(sub) is None:
            raise AuthError("bad_claims", "invalid sub: must match [A-Za-z0-9_:@=+-]{1,128}")
        return Identity(
            user=sub,
            rooms=_globs(claims, "rooms"),
            publish=_globs(claims, "publish"),
            expires=_expiry(claims.get("exp"), s.leeway),
        )


def _key(secret: str, public_key: str) -> tuple[Any, str] | None:
    """A configured key and the one algorithm it verifies, or None."""
    if secret:
        return secret, "HS256"
    return key_algorithm(Path(public_key).read_bytes()) if public_key else None


def _numeric_date(value: object) -> bool:
    """Whether PyJWT's time checks take ``value`` (its ``int()``: 12, "12", 1.5, true)."""
    try:
        int(value)  # type: ignore[call-overload]
    except (OverflowError, ValueError, TypeError):
        return False
    return True


def _expiry(exp: object, leeway: float) -> float | None:
    """When a token with this ``exp`` (as PyJWT took it: a number, or a
    string ``int()`` reads) stops being honoured: the leeway that admits it
    past ``exp`` keeps its streams open as long. None without one. One PyJWT
    took but no float can hold is malformed."""
    if exp is None or isinstance(exp, bool):
        return None
    try:
        return float(int(exp) if isinstance(exp, str) else exp) + leeway  # type: ignore[arg-type]
    except (OverflowError, ValueError, TypeError):
        raise AuthError("malformed", "malformed token") from None


def mint_token(
    key: str,
    user: str,
    rooms: Iterable[str] = (),
    publish: Iterable[str] = (),
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    audience: str = "",
    issuer: str = "",
    **extra: Any,
) -> str:
    """A token for ``herald token``, ``herald dev`` and tests; with the
    ``audience`` and ``issuer`` a node's ``jwt`` settings require, if any."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl)}
    if rooms:
        claims["rooms"] = list(rooms)
    if publish:
        claims["publish"] = list(publish)
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    claims.update(extra)
    return jwt.encode(claims, key, algorithm=algorithm)

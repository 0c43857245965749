"""HS256 without PyJWT: in a connect storm each first-time token costs ~33 µs in jwt.decode, ~6 µs here."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import time
import warnings
from typing import Any

import jwt
import orjson
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.warnings import InsecureKeyLengthWarning

# Three unpadded base64url segments, the last one 32 bytes (PyJWT takes padding, and refuses non-canonical
# trailing bits: a token with either, or anything else unusual, is left to PyJWT).
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_CANONICAL_LAST = ("", "", "AQgw", "AEIMQUYcgkosw048")
_URLSAFE = bytes.maketrans(b"-_", b"+/")
# More brackets than this and Python's json (PyJWT's) might reach the recursion limit where orjson does not.
_MAX_BRACKETS = 100
_TIME_CLAIMS = ("iat", "nbf", "exp")


def _canonical(segment: str) -> bool:
    """Whether PyJWT takes this unpadded base64url segment (a length it can decode, no stray trailing bits)."""
    rest = len(segment) % 4
    return rest != 1 and (rest == 0 or segment[-1] in _CANONICAL_LAST[rest])


def _bytes(segment: str) -> bytes:
    return binascii.a2b_base64((segment + "==").encode().translate(_URLSAFE))


def _object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object ``raw`` holds, when orjson and Python's json are sure to read it the same way."""
    if raw.count(b"[") + raw.count(b"{") > _MAX_BRACKETS:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:  # NaN, 1e400, lone surrogates, a BOM...: json may accept them
        return None
    return value if isinstance(value, dict) else None


class HS256:
    """``jwt.decode`` with Herald's options for an HS256 secret: the same claims, the same PyJWT error, or
    None when the token is not of the usual shape and PyJWT must decide."""

    def __init__(
        self, key: bytes, required: tuple[str, ...], audience: str | None, issuer: str | None, leeway: float
    ) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._required = required
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    @classmethod
    def for_secret(
        cls, secret: str, required: tuple[str, ...], audience: str | None, issuer: str | None, leeway: float
    ) -> HS256 | None:
        """None for a secret PyJWT refuses (it looks like a public key or a JWK): PyJWT says so per token.
        PyJWT's warning about a short secret comes once, here, instead of at the first token."""
        algorithm = HMACAlgorithm(HMACAlgorithm.SHA256)
        try:
            key = algorithm.prepare_key(secret)
        except jwt.InvalidKeyError:
            return None
        short = algorithm.check_key_length(key)
        if short:
            warnings.warn(short, InsecureKeyLengthWarning, stacklevel=3)
        return cls(key, required, audience, issuer, leeway)

    def claims(self, token: str) -> dict[str, Any] | None:
        if _SHAPE.fullmatch(token) is None:
            return None
        header64, payload64, signature64 = token.split(".")
        if not (_canonical(header64) and _canonical(payload64)):
            return None
        header = _object(_bytes(header64))
        if header is None or header.get("alg") != "HS256" or "crit" in header or "b64" in header:
            return None
        if not isinstance(header.get("kid", ""), str):
            return None
        mac = self._mac.copy()
        mac.update(f"{header64}.{payload64}".encode())
        if not hmac.compare_digest(mac.digest(), _bytes(signature64)):
            raise jwt.InvalidSignatureError("Signature verification failed")
        claims = _object(_bytes(payload64))
        return None if claims is None else self._check(claims)

    def _check(self, claims: dict[str, Any]) -> dict[str, Any] | None:
        """PyJWT's ``_validate_claims`` with Herald's options, in its order; None when a time claim is not an
        int (PyJWT's int() takes "12", 1.5, true...)."""
        for name in self._required:
            if claims.get(name) is None:
                raise jwt.MissingRequiredClaimError(name)
        if any(name in claims and type(claims[name]) is not int for name in _TIME_CLAIMS):
            return None
        now = time.time()
        # iat is not checked against the clock (see Authenticator._decode).
        if "nbf" in claims and claims["nbf"] > now + self._leeway:
            raise jwt.ImmatureSignatureError("The token is not yet valid (nbf)")
        if "exp" in claims and claims["exp"] <= now - self._leeway:
            raise jwt.ExpiredSignatureError("Signature has expired")
        if self._issuer is not None:
            if "iss" not in claims:
                raise jwt.MissingRequiredClaimError("iss")
            if claims["iss"] != self._issuer:
                raise jwt.InvalidIssuerError("Invalid issuer")
        if self._audience is not None:
            audience = claims.get("aud")
            if not audience:
                raise jwt.MissingRequiredClaimError("aud")
            if isinstance(audience, str):
                audience = [audience]
            if not isinstance(audience, list) or not all(isinstance(a, str) for a in audience):
                raise jwt.InvalidAudienceError("Invalid claim format in token")
            if self._audience not in audience:
                raise jwt.InvalidAudienceError("Audience doesn't match")
        elif claims.get("aud"):  # meant for some service: this node names none (RFC 7519 4.1.3)
            raise jwt.InvalidAudienceError("Invalid audience")
        if "sub" in claims and not isinstance(claims["sub"], str):
            raise InvalidSubjectError("Subject must be a string")
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise InvalidJTIError("JWT ID must be a string")
        return claims

"""Public keys for token signatures (RS256 / ES256)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key


def key_algorithm(pem: bytes) -> tuple[Any, str]:
    """The public key in ``pem`` and the one algorithm it may verify."""
    try:
        public = load_pem_public_key(pem)
    except ValueError:
        raise ValueError("not a PEM public key") from None
    if isinstance(public, rsa.RSAPublicKey):
        return public, "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return public, "ES256"
    raise ValueError("must be an RSA or EC P-256 public key")

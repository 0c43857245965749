"""Keys for token signatures (RS256 / ES256): a node's public key, and the
private key ``herald token --key`` signs with."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key


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


def private_key_algorithm(pem: bytes) -> tuple[Any, str]:
    """The private key in ``pem`` and the algorithm a node verifies its
    signatures with (ValueError: not one a node can take)."""
    try:
        private = load_pem_private_key(pem, None)
    except TypeError:  # a password is needed
        raise ValueError("an encrypted key: give it unencrypted") from None
    except ValueError:
        raise ValueError("not a PEM private key") from None
    if isinstance(private, rsa.RSAPrivateKey):
        return private, "RS256"
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1):
        return private, "ES256"
    raise ValueError("must be an RSA or EC P-256 private key")

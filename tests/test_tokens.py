"""Tracking tokens: the hand-rolled MAC is the standard library's HMAC, and kinds are checked."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mailer.tokens import MAC_BYTES, Kind, Signer, Token, _Key, payload

SECRETS = ["k", "a much longer secret key than the SHA-256 block of sixty-four bytes, " * 2, "ü"]


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize("data", [b"", b"\x01\x02\x03\x00", bytes(range(256)) * 3])
def test_the_mac_is_hmac_sha256_of_the_purpose_bound_key(secret: str, data: bytes) -> None:
    # _Key precomputes HMAC's inner and outer states; it must stay HMAC itself.
    key = hashlib.sha256(b"mailer.tracking.tokens\0" + secret.encode()).digest()
    expected = hmac.new(key, data, hashlib.sha256).digest()[:MAC_BYTES]
    assert _Key(secret).mac(data) == expected


def test_a_signed_token_of_an_unknown_kind_is_refused() -> None:
    signer = Signer(["k"])
    assert signer.verify(signer.sign(Token(Kind.CLICK, 7, 42, 3))) == Token(Kind.CLICK, 7, 42, 3)
    unknown = bytes((max(Kind) + 1,)) + payload(Kind.OPEN, 7, 42)[1:]
    assert signer.verify(signer.sign_payload(unknown)) is None

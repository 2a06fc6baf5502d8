"""DKIM signatures (RFC 6376; Ed25519 per RFC 8463), relaxed/relaxed, made with ``cryptography``.

``DkimSigner.sign(message)`` puts one ``DKIM-Signature`` header per key in front of a finished
message. Per message it canonicalises and hashes the body once (shared by every key), then
each key signs the canonical headers: what a recipient's verifier recomputes. A
``Personaliser`` given the signer canonicalises its template's pieces once
(``relaxed_pieces``) and hands each message's body over already relaxed. ``load_key``
reads a PEM private key and refuses anything else with one line naming the file;
``generate_key`` and ``dns_record`` serve ``mailer dkim keygen``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mailer.config import Settings
from mailer.errors import ConfigError

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Gmail's and Yahoo's bulk-sender rules want these covered; only those present are signed.
SIGNED_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "feedback-id",
)
RSA_BITS = 2048
MAX_KEY_BYTES = 64 * 1024  # an RSA key of 16,384 bits is 12 KB of PEM

_WSP_RUN = re.compile(rb"[ \t]+")
_SPACE_RUN = re.compile(rb"  +")
_FOLD = re.compile(rb"\r\n(?=[ \t])")


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key: PrivateKey

    @property
    def algorithm(self) -> Algorithm:
        return "ed25519-sha256" if isinstance(self.key, ed25519.Ed25519PrivateKey) else "rsa-sha256"


def load_key(path: Path, *, domain: str, selector: str, setting: str) -> DkimKey:
    """The private key in ``path`` (PEM: RSA of 2048 bits or more, or Ed25519)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_BYTES + 1)  # not all of /dev/zero, or a disk image
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_BYTES:
        raise ConfigError(f"{setting}: {path} is over {MAX_KEY_BYTES // 1024} KB: not a key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{setting}: {path} is not an unencrypted PEM private key "
            "(make one with `mailer dkim keygen`)"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < RSA_BITS:
        raise ConfigError(f"{setting}: {path} is a {key.key_size}-bit RSA key; use 2048 bits")
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{setting}: {path} holds neither an RSA nor an Ed25519 key")
    return DkimKey(domain, selector, key)


def generate_key(ed25519_key: bool = False) -> PrivateKey:
    if ed25519_key:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def dns_record(key: DkimKey) -> tuple[str, str]:
    """The TXT record to publish: its name and its value."""
    public = key.key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kind = "rsa"
    value = f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode()}"
    return f"{key.selector}._domainkey.{key.domain}", value


def _relaxed_lines(text: bytes) -> bytes:
    """Relaxed body canonicalisation (RFC 6376, 3.4.4) but for the body's end: each run of
    whitespace one space, none at a line's end."""
    # Plain replaces and a literal search: a regex over every space of a 25 KB body cost ~1 ms.
    if b"\t" in text:
        text = text.replace(b"\t", b" ")  # every WSP a space, so that runs collapse below
    text = _SPACE_RUN.sub(b" ", text)
    if b" \r\n" in text:
        text = text.replace(b" \r\n", b"\r\n")  # after the collapse, at most one space
    return text


def _relaxed_body(body: bytes) -> bytes:
    body = _relaxed_lines(body).rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    if b"\r\n" in value:
        value = _FOLD.sub(b"", value)
    if b"\t" in value or b"  " in value:  # most values have neither: no regex to run
        value = _WSP_RUN.sub(b" ", value)
    return name.strip().lower() + b":" + value.strip(b" ")


class DkimSigner:
    """Signs finished messages (CRLF line ends) with each of ``keys``."""

    def __init__(self, keys: Sequence[DkimKey], signed: Sequence[str] = SIGNED_HEADERS) -> None:
        if not keys:
            raise ValueError("at least one key")
        self.keys = tuple(keys)
        self.signed = tuple(signed)

    def sign(self, message: bytes, *, relaxed_body: bytes | None = None) -> bytes:
        """``relaxed_body``: the body's relaxed form, where the caller made it more cheaply
        (``Personaliser`` does, from ``relaxed_pieces``)."""
        head, _, body = message.partition(b"\r\n\r\n")
        if relaxed_body is None:
            relaxed_body = _relaxed_body(body)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body).digest()).decode()
        headers = _headers(head + b"\r\n")
        names = [n for n in self.signed if n in headers]
        canonical = b"".join(_relaxed_header(*headers[n]) + b"\r\n" for n in names)
        signatures = b"".join(
            self._signature(key, names, canonical, body_hash) for key in self.keys
        )
        return signatures + message

    def relaxed_pieces(self, pieces: Sequence[bytes]) -> list[bytes] | None:
        """The relaxed forms of the literal pieces of a body that has a value between each two.

        Where every value is non-empty and holds no whitespace, no run of whitespace and no
        line's end spans a joint, so the body's relaxed form is these with the values between
        them: made once per template, not once per message. None when the last piece holds no
        text (the body's end would reach into a value).
        """
        *inner, last = pieces
        end = _relaxed_body(last)
        if not end.strip(b"\r\n"):
            return None
        return [_relaxed_lines(piece) for piece in inner] + [end]

    def _signature(self, key: DkimKey, names: list[str], canonical: bytes, body_hash: str) -> bytes:
        tags = (
            f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain}; s={key.selector};"
            f" h={':'.join(names)}; bh={body_hash}; b="
        )
        data = canonical + _relaxed_header(b"DKIM-Signature", tags.encode())
        if isinstance(key.key, ed25519.Ed25519PrivateKey):
            signature = key.key.sign(hashlib.sha256(data).digest())
        else:
            signature = key.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        b = base64.b64encode(signature).decode()
        # Folded at 76 so that no line comes near the 998-octet limit.
        folded = "\r\n\t".join(b[i : i + 76] for i in range(0, len(b), 76))
        return f"DKIM-Signature: {tags}{folded}\r\n".encode()


def _headers(head: bytes) -> dict[str, tuple[bytes, bytes]]:
    """The last occurrence of each header (what a verifier signing it picks first), by name."""
    found: dict[str, tuple[bytes, bytes]] = {}
    for field in re.split(rb"\r\n(?![ \t])", head):
        name, colon, value = field.partition(b":")
        if colon:
            found[name.strip().lower().decode()] = (name, value)
    return found


def signer_from_settings(settings: Settings) -> DkimSigner | None:
    """The configured signer, None without DKIM; ``ConfigError`` naming a bad key file."""
    if not settings.dkim_domain:
        return None
    domain = settings.dkim_domain
    keys = [
        load_key(
            Path(settings.dkim_key_file),
            domain=domain,
            selector=settings.dkim_selector,
            setting="MAILER_DKIM_KEY_FILE",
        )
    ]
    if settings.dkim_ed25519_key_file:
        selector = settings.dkim_ed25519_selector or f"{settings.dkim_selector}-ed25519"
        keys.append(
            load_key(
                Path(settings.dkim_ed25519_key_file),
                domain=domain,
                selector=selector,
                setting="MAILER_DKIM_ED25519_KEY_FILE",
            )
        )
    return DkimSigner(keys)

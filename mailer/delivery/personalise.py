"""Per-recipient personalisation: fill a composed message's tokens with a byte join.

Everything that can be done once per variant is done in ``Personaliser.__init__``; per
recipient there are only a few HMACs, tiny encodes and one ``bytes.join``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import format_datetime, formataddr, parseaddr
from typing import TYPE_CHECKING, Protocol

from mailer.tokens import Kind, SendSigner, Signer, varint

if TYPE_CHECKING:
    from mailer.delivery.dkim import DkimSigner  # cryptography: only where it signs

NAME_FALLBACK = "reader"
_TO_VALUE = 78 - len("To: ")  # RFC 5322's line length, where it can be kept
_WORD_OCTETS = 45  # an RFC 2047 encoded word of 45 octets is 72 characters long
# Whatever a reader's name holds, no CR, LF, NUL or other control character reaches a header.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_URL_TOKENS = frozenset({"unsubscribe_url", "pixel_url", "view_url"})
_QP_SAFE = re.compile(rb"[!-<>-~]{0,74}")  # printable ASCII but '=', short enough for one line


class Template(Protocol):
    """A composed message: ``compose.MessageTemplate``, or one read back from the ledger."""

    @property
    def nonce(self) -> str: ...

    @property
    def mime(self) -> bytes: ...


@dataclass(frozen=True)
class Recipient:
    subscriber_id: int
    email: str
    name: str | None = None


def _qp(value: bytes) -> bytes:
    if _QP_SAFE.fullmatch(value):
        return value
    return binascii.b2a_qp(value, quotetabs=True, istext=False).replace(b"=\n", b"=\r\n")


def _address(name: str, email: str) -> str:
    """The To header's value: the reader's address, with their name if they have one."""
    if not name:
        return email
    if email.isascii():
        value = formataddr((name, email))  # RFC 2047-encodes a non-ASCII name
    else:
        # An internationalised address can only travel as raw UTF-8 (RFC 6532, over SMTPUTF8).
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        value = f'"{quoted}" <{email}>'
    if len(value.encode()) <= _TO_VALUE:
        return value
    # Folded so that no line passes 78 octets and no encoded word 75 characters, however long
    # the name (RFC 5322, RFC 2047): before the address, and where the name alone is too long,
    # as encoded words on lines of their own (decoders join them).
    display = value.removesuffix(f" <{email}>")
    if len(display.encode()) <= _TO_VALUE:
        return f"{display}\r\n <{email}>"
    return "\r\n ".join([*_encoded_words(name), f"<{email}>"])


def _encoded_words(text: str) -> Iterator[str]:
    raw = text.encode()
    start = 0
    while start < len(raw):
        end = min(start + _WORD_OCTETS, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # never split a character
            end -= 1
        yield f"=?utf-8?b?{base64.b64encode(raw[start:end]).decode()}?="
        start = end


def _header(head: str, name: str) -> str:
    found = re.search(rf"^{name}: (.*)\r$", head, re.MULTILINE)
    if found is None:
        raise ValueError(f"the template has no {name} header")
    return found.group(1)


def _relaxed_skeleton(
    skeleton: list[bytes], positions: dict[tuple[str, str], list[int]], dkim: DkimSigner
) -> tuple[int, list[bytes]] | None:
    """Where the body's values start in ``skeleton``, and DKIM's relaxed form of the body's
    literal pieces: made once, so that per recipient only the values go between them.

    Values in the body are URLs, or quoted-printable with every space encoded: non-empty, no
    whitespace. A header's token in the body (a date, a name and address: spaces) would break
    that: None, and each body is made relaxed whole.
    """
    head_end = next((i for i, piece in enumerate(skeleton) if b"\r\n\r\n" in piece), None)
    if head_end is None:
        return None
    if any(ctx == "h" and max(where) > head_end for (ctx, _), where in positions.items()):
        return None
    first = skeleton[head_end].partition(b"\r\n\r\n")[2]
    pieces = dkim.relaxed_pieces([first, *skeleton[head_end + 2 :: 2]])
    if pieces is None:
        return None
    body = [b""] * (len(pieces) * 2 - 1)  # as the skeleton: each value's place between two
    body[0::2] = pieces
    return head_end + 1, body


class Personaliser:
    """Turns one ``MessageTemplate`` into the bytes each recipient gets."""

    def __init__(
        self,
        template: Template,
        *,
        send_id: int,
        signer: Signer,
        tracker_url: str,
        now: dt.datetime | None = None,
        dkim: DkimSigner | None = None,
    ) -> None:
        parts = re.split(f"@@{template.nonce}:([htm]):([a-z0-9_]+)@@".encode(), template.mime)
        # The output list: literal pieces at even positions, each token's value at the odd ones.
        self._skeleton = [b""] * (len(parts) // 3 * 2 + 1)
        self._skeleton[0::2] = parts[0::3]
        positions: dict[tuple[str, str], list[int]] = {}
        for i, (ctx, name) in enumerate(zip(parts[1::3], parts[2::3], strict=True)):
            positions.setdefault((ctx.decode(), name.decode()), []).append(2 * i + 1)
        # Our own URLs are usually identical once QP- or HTML-encoded: fill those as they are.
        plain = (
            _QP_SAFE.fullmatch(f"{tracker_url}/c/{'x' * 40}".encode())
            and html.escape(tracker_url) == tracker_url
        )
        self._as_is: dict[str, list[int]] = {}
        self._encoded: list[tuple[str, str, list[int]]] = []
        for (ctx, name), where in positions.items():
            if ctx == "h" or (plain and (name in _URL_TOKENS or name.startswith("link_"))):
                self._as_is.setdefault(name, []).extend(where)
            else:
                self._encoded.append((ctx, name, where))
        self._names = {name for _, name in positions}
        self._links = [(n, varint(int(n[5:]))) for n in self._names if n.startswith("link_")]
        self._send_id = send_id
        self._signer = SendSigner(signer, send_id)
        self._tracker = tracker_url
        self._date = format_datetime(now or dt.datetime.now(dt.UTC))
        # Message-ID is the template's header with the send and reader filled in.
        head = template.mime.split(b"\r\n\r\n", 1)[0].decode()
        self._message_id = _header(head, "Message-ID").replace(
            f"@@{template.nonce}:h:ids@@", f"{send_id}.{{subscriber}}"
        )
        self._bounce_domain = parseaddr(_header(head, "From"))[1].rpartition("@")[2]
        self._dkim = dkim
        self._relaxed = _relaxed_skeleton(self._skeleton, positions, dkim) if dkim else None

    def message_id(self, recipient: Recipient) -> str:
        """The Message-ID this recipient's message carries: the same on every retry."""
        return self._message_id.format(subscriber=recipient.subscriber_id)

    def envelope_sender(self, recipient: Recipient) -> str:
        """A VERP return path, ``bounces+TOKEN@domain``: a bounce names its send and reader."""
        token = self._signer.sign(Kind.BOUNCE, varint(recipient.subscriber_id))
        return f"bounces+{token}@{self._bounce_domain}"

    def values(self, recipient: Recipient) -> dict[str, str]:
        """Each token's value for ``recipient``, before any encoding."""
        sub = varint(recipient.subscriber_id)
        sign = self._signer.sign
        base = self._tracker
        unsubscribe = sign(Kind.UNSUBSCRIBE, sub)
        name = " ".join(_CONTROL.sub(" ", recipient.name or "").split())
        values = {
            "name": name or NAME_FALLBACK,
            "email": recipient.email,
            "to": _address(name, recipient.email),
            "date": self._date,
            "ids": f"{self._send_id}.{recipient.subscriber_id}",
            "send": str(self._send_id),
            "unsubscribe_token": unsubscribe,
            "unsubscribe_url": f"{base}/u/{unsubscribe}",
            "pixel_url": f"{base}/o/{sign(Kind.OPEN, sub)}.gif",
            "view_url": f"{base}/v/{sign(Kind.VIEW, sub)}",
        }
        for name, link in self._links:
            values[name] = f"{base}/c/{sign(Kind.CLICK, sub, link)}"
        return values

    def personalise(self, recipient: Recipient) -> bytes:
        """The recipient's message, DKIM-signed if the personaliser was given a signer."""
        out = self._filled(recipient)
        message = b"".join(out)
        if self._dkim is None:
            return message
        relaxed = None
        if self._relaxed is not None:
            values_from, pieces = self._relaxed
            body = pieces.copy()
            body[1::2] = out[values_from::2]
            relaxed = b"".join(body)
        return self._dkim.sign(message, relaxed_body=relaxed)

    def _filled(self, recipient: Recipient) -> list[bytes]:
        values = self.values(recipient)
        out = self._skeleton.copy()
        for name, where in self._as_is.items():
            value = values[name].encode()
            for i in where:
                out[i] = value
        for ctx, name, where in self._encoded:
            raw = values[name]
            value = _qp((html.escape(raw) if ctx == "m" else raw).encode())
            for i in where:
                out[i] = value
        return out

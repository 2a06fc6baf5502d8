"""The MIME message of one variant, built once, with per-recipient tokens left in place.

Both parts are quoted-printable. Every token stands alone between two soft line breaks
(``=\\r\\n``), so whatever value replaces it, once QP-encoded itself, keeps every line valid and
under 76 characters: personalisation is a byte join, never a re-encode of the message.
"""

from __future__ import annotations

import email
import email.policy
import email.quoprimime
import re
from collections.abc import Iterable
from email.message import EmailMessage
from typing import Literal

_POLICY = email.policy.SMTP
SOFT_BREAK = "=\r\n"
QP_LINE = 76


def marker_pattern(nonce: str) -> re.Pattern[str]:
    return re.compile(f"@@{nonce}:([htm]):([a-z0-9_]+)@@")


def _qp_body(text: str, markers: re.Pattern[str]) -> str:
    out: list[str] = []
    pos = 0
    for match in markers.finditer(text):
        out += [_qp(text[pos : match.start()]), SOFT_BREAK, match.group(0), SOFT_BREAK]
        pos = match.end()
    out.append(_qp(text[pos:]))
    return "".join(out)


def _qp(chunk: str) -> str:
    # body_encode wants one character per octet; one character of headroom, because a chunk's
    # last line is followed by the '=' of a soft break.
    octets = chunk.replace("\r\n", "\n").encode("utf-8").decode("latin-1")
    return email.quoprimime.body_encode(octets, QP_LINE - 1, eol="\r\n")


def header(name: str, value: str) -> str:
    """One header line, RFC 2047-encoded and folded as SMTP wants."""
    return str(_POLICY.header_factory(name, value).fold(policy=_POLICY))


def build(
    headers: Iterable[str],
    text: str,
    html: str,
    boundary: str,
    markers: re.Pattern[str],
) -> bytes:
    """``headers`` are whole header lines, already encoded (see ``header``) or holding markers."""
    lines = [*headers]
    lines += [
        "MIME-Version: 1.0\r\n",
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n',
        "\r\n",
    ]
    for subtype, body in (("plain", text), ("html", html)):
        lines += [
            f"--{boundary}\r\n",
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n',
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "\r\n",
            _qp_body(body, markers),
            "\r\n",
        ]
    lines.append(f"--{boundary}--\r\n")
    return "".join(lines).encode("ascii")


def part(message: bytes, subtype: Literal["html", "plain"]) -> str:
    """One part of a built message, decoded as a mail client would (markers stay whole)."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    body = parsed.get_body((subtype,))
    assert body is not None
    return str(body.get_content())

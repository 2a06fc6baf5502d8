"""What one inbound message is, and whom it is about: a pure function of its bytes.

In order, a message is:

1. a **complaint**: an ARF report (RFC 5965) of type abuse, fraud, virus or other;
2. an **unsubscribe**: mail to ``unsubscribe+TOKEN@`` (the ``mailto:`` of List-Unsubscribe)
   that is not itself automatic;
3. a **hard** or **soft** bounce: an RFC 3464 delivery status notification, where the status
   decides (5.x.x hard, 4.x.x soft, whatever the Action says: Postfix reports a message it gave
   up on after 4xx replies as ``Action: failed``, ``Status: 4.x.x``), or one of the other formats
   Mailman's ``flufl.bounce`` detectors know (Exim, qmail, Exchange, Yahoo, ...);
4. an **auto_reply**: an out-of-office or other automatic answer (RFC 3834 ``Auto-Submitted``,
   ``X-Autoreply``, ``Precedence: auto_reply`` and the like): not a bounce;
5. else **unmatched**.

Whom it is about comes from the signed tokens it carries (``Token``: send and reader): the
address it was sent to (``bounces+TOKEN@``, the VERP return path, or ``unsubscribe+TOKEN@``),
an ARF report's ``Original-Mail-From``, and the Return-Path and List-Unsubscribe headers of our
original message when a bounce or report returns it. Without one, the addresses it reports
(``Verdict.addresses``) name the readers, and the original's Message-ID the send.
"""

from __future__ import annotations

import email
import email.parser
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.header import Header
from email.message import Message
from email.policy import Compat32
from email.utils import getaddresses, parseaddr

from flufl.bounce import all_failures

from mailer.tokens import PREVIEW_SEND_ID, Kind, Signer, Token
from mailer.vocabulary import InboundOutcome

log = logging.getLogger(__name__)
# flufl.bounce logs each detector it runs, and a traceback for each one that fails, which
# _failures reports in one line of its own.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

BOUNCES = "bounces"  # local part before the + of the VERP return path (delivery.personalise)
UNSUBSCRIBE = "unsubscribe"  # ... of the List-Unsubscribe mailto (compose)
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})  # not not-spam, auth-failure
# Where a delivered message says which address it was delivered to (process reads files).
DELIVERED_TO = ("delivered-to", "x-original-to", "envelope-to", "x-envelope-to", "to", "cc")
MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # a bounce returns our message, ~100 KB at most
# flufl.bounce's heuristics try dozens of patterns on every line, about half a second a
# megabyte; what they look for comes first (the explanation, then the returned original), so
# they read no further than this, and a huge message costs no more than a bounce.
SCAN_BYTES = 256 * 1024
_TOKEN_ADDRESS = re.compile(r"\b(bounces|unsubscribe)\+([A-Za-z0-9_-]+)@([A-Za-z0-9.-]+)", re.I)
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_AUTO_HEADERS = (  # present (with any value) on automatic answers only
    "x-autoreply",
    "x-autorespond",
    "x-autoresponder",
    "x-autoreply-from",
    "x-mail-autoreply",
    "x-fc-machinegenerated",
)
_AUTO_PRECEDENCE = frozenset({"auto_reply", "bulk", "junk", "list"})
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto:|automatic reply|auto.?reply|autoresponse|out of (the )?office|"
    r"abwesenheitsnotiz|réponse automatique|respuesta automática)",
    re.I,
)


@dataclass(frozen=True)
class Verdict:
    outcome: InboundOutcome
    key: str  # the message's identity: a hash of its Message-ID (else of its bytes)
    tokens: tuple[Token, ...]  # (send, reader) pairs it names, most direct first
    addresses: tuple[tuple[str, InboundOutcome], ...]  # reported addresses (lower case), each
    # with its own outcome (a bounce without VERP may report one hard and one soft)
    message_ids: tuple[str, ...]  # Message-IDs of our original, when it is returned
    status: str = ""  # 5.1.1, 4.2.0, the feedback type ...


@dataclass(frozen=True)
class Ours:
    """The addresses that are ours: what ``mailer bounces serve`` accepts mail for."""

    signer: Signer
    domain: str  # the From address's domain: bounces+ and unsubscribe+ live there
    feedback: str  # the feedback (ARF) address

    def token(self, address: str) -> tuple[str, Token] | None:
        """("bounces" or "unsubscribe", its token) for one of our tokened addresses."""
        local, _, domain = address.strip().strip("<>").rpartition("@")
        base, plus, text = local.partition("+")
        if not plus or domain.lower() != self.domain or base.lower() not in (BOUNCES, UNSUBSCRIBE):
            return None
        kind = Kind.BOUNCE if base.lower() == BOUNCES else Kind.UNSUBSCRIBE
        token = self.signer.verify(text)
        if token is None or token.kind != kind or token.send_id == PREVIEW_SEND_ID:
            return None
        return base.lower(), token

    def describe(self) -> str:
        return f"bounces+TOKEN@{self.domain}, unsubscribe+TOKEN@{self.domain}, {self.feedback}"

    def accepts(self, address: str) -> bool:
        address = address.strip().strip("<>")
        return address.lower() == self.feedback or self.token(address) is not None


def message_key(msg: Message, raw: bytes) -> str:
    """A hash of the Message-ID (the same however the message reached us), else of the bytes."""
    message_id = str(msg.get("message-id") or "").strip()
    seed = b"id:" + message_id.encode("utf-8", "replace") if message_id else b"raw:" + raw
    return hashlib.sha256(seed).hexdigest()[:32]


def judge(raw: bytes, ours: Ours, recipients: Sequence[str] = ()) -> Verdict:
    """What the message ``raw`` is; ``recipients``: its envelope's (from SMTP), else the
    addresses it says it was delivered to are read from its headers."""
    msg = email.message_from_bytes(raw)  # compat32: lenient, and what flufl.bounce expects
    key = message_key(msg, raw)
    addressed = list(recipients) or [
        address for _, address in getaddresses(_all(msg, DELIVERED_TO)) if address
    ]
    tokens = [found for found in map(ours.token, addressed) if found is not None]
    direct = tuple(token for _, token in tokens)
    originals = list(_originals(msg))
    returned = tuple(_returned_tokens(originals, ours))
    message_ids = tuple(
        mid for mid in (str(o.get("message-id") or "").strip() for o in originals) if mid
    )

    report = _feedback_report(msg)
    if report is not None:
        kind = str(report.get("feedback-type") or "").strip().lower()
        if kind in COMPLAINT_TYPES:
            sender = ours.token(str(report.get("original-mail-from") or ""))
            named = (sender[1],) if sender else ()
            reported = [str(report.get("original-rcpt-to") or "")]
            reported += [a for o in originals for a in _all(o, ("to",))]
            addresses = _addresses(reported, "complaint")
            return Verdict(
                "complaint", key, direct + named + returned, addresses, message_ids, kind
            )

    unsubscribe = tuple(token for base, token in tokens if base == UNSUBSCRIBE)
    if unsubscribe:
        outcome: InboundOutcome = "auto_reply" if _automatic(msg) else "unsubscribe"
        return Verdict(outcome, key, unsubscribe, (), ())

    failures = _failures(_for_heuristics(msg, raw))
    if failures:
        hard = any(outcome == "hard" for _, outcome, _ in failures)
        statuses = sorted({status for _, _, status in failures if status})
        return Verdict(
            "hard" if hard else "soft",
            key,
            direct + returned,
            tuple((address, outcome) for address, outcome, _ in failures),
            message_ids,
            ", ".join(statuses),
        )
    if _automatic(msg):
        return Verdict("auto_reply", key, (), (), ())
    return Verdict("unmatched", key, (), (), ())


def _all(msg: Message, names: Iterable[str]) -> list[str]:
    return [str(value) for name in names for value in msg.get_all(name) or []]


def _addresses(
    values: Iterable[str], outcome: InboundOutcome
) -> tuple[tuple[str, InboundOutcome], ...]:
    found = dict.fromkeys(a.lower() for _, a in getaddresses(list(values)) if "@" in a)
    return tuple((address, outcome) for address in found)


def _sub_message(part: Message) -> Message | None:
    """The message inside a message/* or text/rfc822-headers part."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, str):
        return email.parser.HeaderParser().parsestr(payload.lstrip())
    return None


def _originals(msg: Message) -> Iterator[Message]:
    """Our original message (or its headers) as a bounce or report returns it."""
    for part in msg.walk():
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            inner = _sub_message(part)
            if inner is not None:
                yield inner


def _returned_tokens(originals: Iterable[Message], ours: Ours) -> Iterator[Token]:
    for original in originals:
        headers = " ".join(_all(original, ("return-path", "list-unsubscribe")))
        for match in _TOKEN_ADDRESS.finditer(headers):
            found = ours.token(match.group(0))
            if found is not None:
                yield found[1]


def _feedback_report(msg: Message) -> Message | None:
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            return _sub_message(part)
    return None


class _TextHeaders(Compat32):
    """compat32, but a header holding raw 8-bit bytes reads as text (undecodable bytes as
    U+FFFD), not as a ``Header``: flufl.bounce's detectors call str methods on headers."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_TEXT_HEADERS = _TextHeaders()


def _for_heuristics(msg: Message, raw: bytes) -> Message:
    """What flufl.bounce's detectors read: the first ``SCAN_BYTES``, with text headers and a
    From. A detector fails on a message without From or with 8-bit bytes in it, and one
    detector's failure ends every detector's turn."""
    has_sender = bool(getaddresses([str(msg.get("from") or "")]))
    text = not any(isinstance(value, Header) for part in msg.walk() for value in part.values())
    if has_sender and text and len(raw) <= SCAN_BYTES:
        return msg
    # A copy: msg stays as it came.
    scanned = email.message_from_bytes(raw[:SCAN_BYTES], policy=_TEXT_HEADERS)
    if not has_sender:
        del scanned["From"]
        scanned["From"] = "<>"
    return scanned


def _failures(msg: Message) -> list[tuple[str, InboundOutcome, str]]:
    """(address, hard or soft, status) for each recipient the bounce reports as failed."""
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # a heuristic of a foreign library, on anyone's input
        log.warning("flufl.bounce could not read a message: %r", exc)
        return []
    found: dict[str, InboundOutcome] = {}
    for raw in permanent:
        found[raw.decode("utf-8", "replace").lower()] = "hard"
    for raw in temporary:
        found.setdefault(raw.decode("utf-8", "replace").lower(), "soft")
    statuses = _dsn_statuses(msg)
    failures: list[tuple[str, InboundOutcome, str]] = []
    for address, outcome in found.items():
        status = statuses.get(address, "")
        if status.startswith("2"):  # delivered after all, whatever the Action says
            continue
        if status:  # RFC 3464: the status's class decides, whatever the Action says
            outcome = "hard" if status.startswith("5") else "soft"
        failures.append((address, outcome, status))
    return failures


def _dsn_statuses(msg: Message) -> dict[str, str]:
    """Recipient address → its Status (5.1.1 ...) in the message's delivery-status parts."""
    found: dict[str, str] = {}
    for part in msg.walk():
        blocks = part.get_payload() if part.get_content_type() == "message/delivery-status" else []
        for block in blocks if isinstance(blocks, list) else []:
            if not isinstance(block, Message):
                continue
            status = _STATUS.search(str(block.get("status") or ""))
            if status is None:
                continue
            for field in ("original-recipient", "final-recipient"):
                address = parseaddr(str(block.get(field) or "").partition(";")[2])[1]
                if address:
                    found[address.lower()] = status.group(0)
    return found


def _automatic(msg: Message) -> bool:
    """An automatic answer by RFC 3834 or the headers autoresponders add in practice."""
    submitted = str(msg.get("auto-submitted") or "").strip().lower()
    if submitted and not submitted.startswith("no"):
        return True
    if any(msg.get(name) is not None for name in _AUTO_HEADERS):
        return True
    precedence = {str(msg.get(n) or "").strip().lower() for n in ("precedence", "x-precedence")}
    if precedence & _AUTO_PRECEDENCE:
        return True
    if str(msg.get("x-autogenerated") or "").strip().lower() == "reply":
        return True
    return bool(_AUTO_SUBJECT.match(str(msg.get("subject") or "")))

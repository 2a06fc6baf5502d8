"""Inbound mail: bounces, complaints and unsubscribes by mail, read back into the database.

``handle(engine, raw, policy)`` is the one verb. ``mailer bounces serve`` (``server``: an SMTP
server) calls it for each message it accepts, ``mailer bounces process`` (``sources``: .eml
files, Maildir folders, mbox files) for each message it reads. ``verdict.judge`` says what a
message is and whom it names; this module makes it so, in one transaction per message:

- **hard** bounce: the reader becomes ``bounced`` (if active), and the send's ledger row is
  marked ``bounced``;
- **soft** bounce: counted; ``soft_bounce_limit`` of them within ``soft_bounce_days`` and the
  reader becomes ``bounced`` (if active);
- **complaint**: the reader becomes ``complained``, whatever they were: never mailed again;
- **unsubscribe**: as the tracker's RFC 8058 one-click POST does (the same event, the same
  status change);
- **auto_reply**, **unmatched**: nothing but the record that the message was handled.

Every message is recorded by a hash of its Message-ID (``InboundMessageRow``), in the same
transaction as what it changed: handling it again changes nothing (``"duplicate"``).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import db
from mailer.config import Settings
from mailer.db.models import BounceEventRow, DeliveryRow, InboundMessageRow, SubscriberRow, utcnow
from mailer.errors import translated
from mailer.inbound.verdict import Ours, Verdict, judge
from mailer.subscribers.manage import change_status
from mailer.subscribers.model import lookup_key
from mailer.tokens import Signer, Token
from mailer.tracking.ingest import Entry, Event, write_events
from mailer.vocabulary import BounceKind, InboundOutcome

__all__ = ["Ours", "Policy", "Result", "Tally", "handle"]

Result = InboundOutcome | Literal["duplicate"]


@dataclass(frozen=True)
class Policy:
    ours: Ours
    soft_bounce_limit: int
    soft_bounce_days: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        ours = Ours(
            Signer(settings.secret_keys),
            domain=settings.from_email.rpartition("@")[2].lower(),
            feedback=settings.feedback_address.lower(),
        )
        return cls(ours, settings.soft_bounce_limit, settings.soft_bounce_days)


@dataclass(frozen=True)
class Tally:
    """Messages by what they were; ``processed`` counts them all, handled before or not."""

    processed: int = 0
    hard: int = 0
    soft: int = 0
    complaints: int = 0
    unsubscribes: int = 0
    auto_replies: int = 0
    unmatched: int = 0

    @classmethod
    def of(cls, results: Iterable[Result]) -> Tally:
        counted = Counter(results)
        return cls(
            processed=sum(counted.values()),
            hard=counted["hard"],
            soft=counted["soft"],
            complaints=counted["complaint"],
            unsubscribes=counted["unsubscribe"],
            auto_replies=counted["auto_reply"],
            unmatched=counted["unmatched"],
        )


def handle(
    engine: Engine,
    raw: bytes,
    policy: Policy,
    recipients: Sequence[str] = (),
    *,
    now: dt.datetime | None = None,
) -> Result:
    """Read one message back into the database; what it was, or "duplicate" if it was
    handled before. ``recipients``: the SMTP envelope's; without them the message's own
    headers say where it was delivered. Raises ``DatabaseError``: nothing was changed."""
    verdict = judge(raw, policy.ours, recipients)
    try:
        with db.session(engine) as session:
            return _apply(session, verdict, policy, now or utcnow())
    except SQLAlchemyError as exc:
        # The same message, handled by another process at this very moment.
        if isinstance(exc, IntegrityError) and _handled(engine, verdict.key):
            return "duplicate"
        raise translated(exc, f"cannot record inbound mail in {db.shown(engine.url)}") from exc


def _handled(engine: Engine, key: str) -> bool:
    with db.session(engine) as session:
        return session.get(InboundMessageRow, key) is not None


@dataclass(frozen=True)
class _Target:
    subscriber_id: int
    send_id: int | None  # None when the ledger has no row of this reader for the send
    outcome: InboundOutcome
    token: Token | None = None  # the token that named the reader, if one did


def _apply(session: Session, verdict: Verdict, policy: Policy, now: dt.datetime) -> Result:
    if session.get(InboundMessageRow, verdict.key) is not None:
        return "duplicate"
    outcome = verdict.outcome
    if outcome in ("hard", "soft", "complaint", "unsubscribe"):
        targets = _targets(session, verdict)
        for target in targets:
            _act(session, target, verdict, policy, now)
        kinds = {target.outcome for target in targets}
        outcome = "unmatched" if not targets else "hard" if "hard" in kinds else kinds.pop()
    session.add(InboundMessageRow(key=verdict.key, outcome=outcome, received_at=now))
    session.flush()  # a twin being handled at the same time fails here, before any commit
    return outcome


def _targets(session: Session, verdict: Verdict) -> list[_Target]:
    """The readers the message is about: the first token naming a reader still here, else
    the readers with the addresses it reports."""
    for token in verdict.tokens:
        if session.get(SubscriberRow, token.subscriber_id) is None:
            continue  # erased since
        in_ledger = session.scalar(
            select(DeliveryRow.id).where(
                DeliveryRow.send_id == token.send_id,
                DeliveryRow.subscriber_id == token.subscriber_id,
            )
        )
        send_id = token.send_id if in_ledger is not None else None
        return [_Target(token.subscriber_id, send_id, verdict.outcome, token)]
    if verdict.outcome == "unsubscribe":
        return []  # only the token says whom: anyone can write to the address
    keys = {lookup_key(address): outcome for address, outcome in verdict.addresses}
    readers = session.execute(
        select(SubscriberRow.email_key, SubscriberRow.id).where(SubscriberRow.email_key.in_(keys))
    ).all()
    return [
        _Target(reader, _send_of(session, reader, verdict), keys[key]) for key, reader in readers
    ]


def _send_of(session: Session, subscriber_id: int, verdict: Verdict) -> int | None:
    """The send whose message to this reader the bounce returns, by its Message-ID."""
    if not verdict.message_ids:
        return None
    ids = {form for mid in verdict.message_ids for form in (mid, f"<{mid.strip('<>')}>")}
    return session.scalar(
        select(DeliveryRow.send_id)
        .where(DeliveryRow.subscriber_id == subscriber_id, DeliveryRow.message_id.in_(ids))
        .limit(1)
    )


def _act(
    session: Session, target: _Target, verdict: Verdict, policy: Policy, now: dt.datetime
) -> None:
    reader, send = target.subscriber_id, target.send_id
    if target.outcome == "unsubscribe":
        assert target.token is not None  # only a token names whom to unsubscribe
        event = Event(
            "unsubscribe", target.token.send_id, reader, now.timestamp(), pending_unsubscribe=True
        )
        write_events(session, [Entry(f"mail-{verdict.key}", (event,))])
        return
    kind: BounceKind = (
        "complaint"
        if target.outcome == "complaint"
        else ("hard" if target.outcome == "hard" else "soft")
    )
    session.add(
        BounceEventRow(
            kind=kind,
            subscriber_id=reader,
            send_id=send,
            message_key=verdict.key,
            status=verdict.status[:64] or None,
            at=now,
        )
    )
    session.flush()
    conn = session.connection()
    if kind == "complaint":
        change_status(
            conn,
            reader,
            "complained",
            sources=("active", "unsubscribed", "bounced"),
            send_id=send,
            at=now,
        )
        return
    if kind == "hard":
        if send is not None:
            session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.send_id == send, DeliveryRow.subscriber_id == reader)
                .values(bounced=True)
            )
    elif _soft_bounces(session, reader, now - dt.timedelta(days=policy.soft_bounce_days)) < (
        policy.soft_bounce_limit
    ):
        return
    change_status(conn, reader, "bounced", sources=("active",), send_id=send, at=now)


def _soft_bounces(session: Session, subscriber_id: int, since: dt.datetime) -> int:
    return (
        session.scalar(
            select(func.count()).where(
                BounceEventRow.subscriber_id == subscriber_id,
                BounceEventRow.kind == "soft",
                BounceEventRow.at >= since,
            )
        )
        or 0
    )

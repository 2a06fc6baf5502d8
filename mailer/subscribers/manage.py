"""One reader at a time: add, look up, change tier or status, erase.

Callers pass a ``Session`` (``mailer.db.session``) and get frozen dataclasses back; every tier
and status change, creation included, is written as a ``SubscriberEventRow`` in the same
transaction as the change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from types import MappingProxyType

from sqlalchemy import Connection, delete, exists, insert, select, update
from sqlalchemy.orm import Session

from mailer.db.models import (
    SubscriberEventRow,
    SubscriberRow,
    SubscriberTagRow,
    SuppressionRow,
    TrackingEventRow,
    utcnow,
)
from mailer.errors import InputError, NotFoundError
from mailer.subscribers.model import (
    Subscriber,
    SubscriberEvent,
    clean_name,
    email_hash,
    lookup_key,
    normalise_email,
    parse_status,
    parse_tags,
    parse_tier,
)
from mailer.vocabulary import SubscriberStatus, Tier

TIER_CHANGED = "tier_changed"
STATUS_CHANGED = "status_changed"
ERASED = "erased"  # SuppressionRow.reason


def add(
    session: Session,
    email: str,
    *,
    name: str | None = None,
    tier: Tier = "free",
    tags: Iterable[str] = (),
    source: str = "cli",
    check_dns: bool = False,
) -> Subscriber:
    """Add a new, active reader; refuses one already there and an erased address."""
    address = normalise_email(email, check_dns=check_dns)
    tier = parse_tier(tier)
    cleaned_tags = parse_tags(tags)
    if is_erased(session, address.key):
        raise InputError(
            f"{address.email} was erased at the reader's request and cannot be added again"
        )
    if session.scalar(select(exists().where(SubscriberRow.email_key == address.key))):
        raise InputError(f"{address.email} is already a subscriber; see `mailer subscribers show`")
    now = utcnow()
    row = SubscriberRow(
        email=address.email,
        email_key=address.key,
        domain=address.domain,
        name=clean_name(name or ""),
        tier=tier,
        status="active",
        source=source,
        attributes={},
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    session.add_all(SubscriberTagRow(subscriber_id=row.id, tag=tag) for tag in cleaned_tags)
    _record(session, row.id, TIER_CHANGED, None, tier, now)
    _record(session, row.id, STATUS_CHANGED, None, "active", now)
    session.flush()
    return _to_subscriber(session, row)


def get(session: Session, email: str) -> Subscriber:
    """The reader with address ``email`` (any case), or ``NotFoundError``."""
    return _to_subscriber(session, _row(session, email))


def history(session: Session, email: str, limit: int = 20) -> tuple[SubscriberEvent, ...]:
    """The reader's latest events, newest first."""
    row = _row(session, email)
    query = (
        select(SubscriberEventRow)
        .where(SubscriberEventRow.subscriber_id == row.id)
        .order_by(SubscriberEventRow.at.desc(), SubscriberEventRow.id.desc())
        .limit(limit)
    )
    return tuple(SubscriberEvent(e.kind, e.old, e.new, e.at) for e in session.scalars(query))


def set_tier(
    session: Session,
    email: str,
    tier: Tier,
    *,
    trial_ends_at: dt.datetime | None = None,
    at: dt.datetime | None = None,
) -> Subscriber:
    """Move a reader to ``tier``; ``trial_ends_at`` only goes with the trial tier.

    ``at`` (default now) dates the event: a billing webhook dates it and its milestone alike.
    """
    tier = parse_tier(tier)
    if trial_ends_at is not None and tier != "trial":
        raise InputError(f"a trial end date only goes with tier trial, not {tier}")
    row = _row(session, email)
    now = at or utcnow()
    if row.tier != tier:
        _record(session, row.id, TIER_CHANGED, row.tier, tier, now)
        row.tier = tier
    if trial_ends_at is not None:
        row.trial_ends_at = trial_ends_at
    session.flush()
    return _to_subscriber(session, row)


def set_status(session: Session, email: str, status: SubscriberStatus) -> Subscriber:
    """Set a reader's status (unsubscribed, bounced, …); no event when it does not change."""
    row = _row(session, email)
    _change_status(session, row, parse_status(status))
    return _to_subscriber(session, row)


def unsubscribe(session: Session, email: str) -> Subscriber:
    return set_status(session, email, "unsubscribed")


def unsubscribe_by_id(session: Session, subscriber_id: int) -> bool:
    """Unsubscribe a reader named by id (a tracker's token); False if they were erased."""
    row = session.get(SubscriberRow, subscriber_id)
    if row is None:
        return False
    _change_status(session, row, "unsubscribed")
    return True


def _change_status(session: Session, row: SubscriberRow, status: SubscriberStatus) -> None:
    """Set ``row``'s status with ``change_status``, as the ledger and inbound mail do; no
    event when it does not change."""
    if row.status != status:
        session.flush()  # the ORM's pending changes first: the change is a statement of its own
        change_status(
            session.connection(), row.id, status, sources=(row.status,), send_id=None, at=utcnow()
        )
        session.expire(row, ["status", "updated_at"])


def change_status(
    conn: Connection,
    subscriber_id: int,
    status: SubscriberStatus,
    *,
    sources: Iterable[SubscriberStatus],
    send_id: int | None,
    at: dt.datetime,
) -> bool:
    """Move a reader named by id to ``status`` if they are in one of ``sources``, recording the
    change (naming ``send_id``, the send it came from) in the caller's transaction.

    Each try is a compare-and-set on the status, so two processes never record one change
    twice. For the delivery ledger (a bounce at send time) and inbound mail (a bounce or a
    complaint coming back). False when the reader was in none of ``sources``.
    """
    for old in sources:
        changed = conn.execute(
            update(SubscriberRow)
            .where(SubscriberRow.id == subscriber_id, SubscriberRow.status == old)
            .values(status=status, updated_at=at)
        ).rowcount
        if changed:
            conn.execute(
                insert(SubscriberEventRow).values(
                    subscriber_id=subscriber_id,
                    kind=STATUS_CHANGED,
                    old=old,
                    new=status,
                    at=at,
                    send_id=send_id,
                )
            )
            return True
    return False


def erase(session: Session, email: str) -> bool:
    """Delete the reader and their personal data, and suppress the address for good.

    The row goes with its tags, events and ledger rows (foreign keys cascade); tracking
    events keep only the anonymous id (their IP and user agent are cleared). What remains
    of the address is the SHA-256 of its key in ``suppressions``, which ``add`` and the
    importer refuse. False when the address had been erased already.
    """
    key = lookup_key(email)
    subscriber_id = session.scalar(select(SubscriberRow.id).where(SubscriberRow.email_key == key))
    if subscriber_id is None:
        if is_erased(session, key):
            return False
        raise NotFoundError(f"no subscriber with address {email.strip()!r}")
    session.execute(
        update(TrackingEventRow)
        .where(TrackingEventRow.subscriber_id == subscriber_id)
        .values(ip=None, user_agent=None)
    )
    session.execute(delete(SubscriberRow).where(SubscriberRow.id == subscriber_id))
    if not is_erased(session, key):
        session.add(SuppressionRow(email_hash=email_hash(key), reason=ERASED))
    session.flush()
    return True


def is_erased(session: Session, key: str) -> bool:
    return bool(
        session.scalar(select(exists().where(SuppressionRow.email_hash == email_hash(key))))
    )


def _row(session: Session, email: str) -> SubscriberRow:
    key = lookup_key(email)
    row = session.scalars(select(SubscriberRow).where(SubscriberRow.email_key == key)).one_or_none()
    if row is None:
        raise NotFoundError(f"no subscriber with address {email.strip()!r}")
    return row


def _record(
    session: Session, subscriber_id: int, kind: str, old: str | None, new: str, at: dt.datetime
) -> None:
    session.add(SubscriberEventRow(subscriber_id=subscriber_id, kind=kind, old=old, new=new, at=at))


def _to_subscriber(session: Session, row: SubscriberRow) -> Subscriber:
    tags = session.scalars(
        select(SubscriberTagRow.tag)
        .where(SubscriberTagRow.subscriber_id == row.id)
        .order_by(SubscriberTagRow.tag)
    )
    return Subscriber(
        id=row.id,
        email=row.email,
        email_key=row.email_key,
        domain=row.domain,
        name=row.name,
        tier=row.tier,
        status=row.status,
        trial_ends_at=row.trial_ends_at,
        tags=tuple(tags),
        attributes=MappingProxyType(dict(row.attributes)),
        source=row.source,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )

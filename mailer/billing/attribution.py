"""Which send earned a trial start, conversion or cancellation, and recording it.

A billing milestone is credited to the send whose link the reader last clicked (a human
click) within the attribution window, else to the send a person last opened in it. Machine
opens (mail privacy proxies, scanners) never earn credit. Each milestone becomes a
``tracking_events`` row naming that send, so stats count them like opens and clicks.
Both the billing webhook and ``mailer subscribers set-tier`` go through ``change_tier``.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer.db.models import TrackingEventRow, utcnow
from mailer.subscribers import Subscriber, get, set_tier
from mailer.vocabulary import Tier, TrackingKind

# Tier moves that are billing milestones; comped readers are the author's gift, not a sale.
MILESTONES: dict[tuple[Tier, Tier], TrackingKind] = {
    ("free", "trial"): "trial_started",
    ("free", "paid"): "converted",
    ("trial", "paid"): "converted",
    ("trial", "free"): "canceled",
    ("paid", "free"): "canceled",
}


def attribute(session: Session, subscriber_id: int, at: dt.datetime, days: int) -> int | None:
    """The send last clicked by the reader within ``days`` before ``at``, else last opened.

    Only human-classified clicks and opens count, and trials already credited to a send.
    Each lookup is a range scan of the (subscriber_id, kind, at) index.
    """
    since = at - dt.timedelta(days=days)
    human = TrackingEventRow.classification == "human"
    for evidence in (
        # A trial credited to a send means the reader came in through it: as good as a click
        # (when the trial came by a reference, there may be no click event at all).
        ((TrackingEventRow.kind == "click") & human) | (TrackingEventRow.kind == "trial_started"),
        (TrackingEventRow.kind == "open") & human,
    ):
        send_id = session.scalar(
            select(TrackingEventRow.send_id)
            .where(
                TrackingEventRow.subscriber_id == subscriber_id,
                evidence,
                TrackingEventRow.at >= since,
                TrackingEventRow.at <= at,
                TrackingEventRow.send_id.is_not(None),
            )
            .order_by(TrackingEventRow.at.desc(), TrackingEventRow.id.desc())
            .limit(1)
        )
        if send_id is not None:
            return send_id
    return None


def record_milestone(
    session: Session,
    subscriber_id: int,
    old: Tier,
    new: Tier,
    *,
    at: dt.datetime,
    days: int,
    ref_send_id: int | None = None,
) -> TrackingKind | None:
    """Write the milestone the move ``old → new`` is, if any, credited to its send.

    ``ref_send_id`` is the send named by a signed reference that came with the payment: the
    reader came through that send's button, which counts as a click at ``at``, the latest.
    """
    kind = MILESTONES.get((old, new))
    if kind is None:
        return None
    send_id = ref_send_id
    if send_id is None:
        send_id = attribute(session, subscriber_id, at, days)
    session.add(TrackingEventRow(kind=kind, send_id=send_id, subscriber_id=subscriber_id, at=at))
    session.flush()
    return kind


def change_tier(
    session: Session,
    email: str,
    tier: Tier,
    *,
    attribution_days: int,
    trial_ends_at: dt.datetime | None = None,
    at: dt.datetime | None = None,
    ref_send_id: int | None = None,
) -> Subscriber:
    """``subscribers.set_tier`` (the same ``tier_changed`` event), plus its billing milestone."""
    when = at or utcnow()
    old = get(session, email).tier
    reader = set_tier(session, email, tier, trial_ends_at=trial_ends_at, at=when)
    record_milestone(
        session,
        reader.id,
        old,
        reader.tier,
        at=when,
        days=attribution_days,
        ref_send_id=ref_send_id,
    )
    return reader

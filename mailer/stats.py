"""What a send did: delivery, opens, clicks, unsubscribes and billing milestones, per variant.

Every number is a count of readers, from a few grouped queries over the ledger
(``deliveries``) and ``tracking_events``, never a loop over readers. Opens are split by the
tracker's classification: a mail privacy proxy or scanner fetching the pixel is a *machine*
open, which says nothing about a person reading. A human click implies a human open (images
may be off), so ``human_opens`` counts readers with either.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.orm import Session

from mailer.db import dialect
from mailer.db.models import (
    BounceEventRow,
    DeliveryRow,
    PostRow,
    SendRow,
    SendVariantRow,
    TrackingEventRow,
)
from mailer.errors import NotFoundError
from mailer.sends import with_post
from mailer.vocabulary import VARIANTS, SendStatus, Variant

TIMELINE_HOURS = 7 * 24  # the chart's span: nearly all opens come in the first days
# Gmail's limit on the share of a sender's mail reported as spam: above it, mail is refused.
COMPLAINT_LIMIT = 0.003


@dataclass(frozen=True)
class Counts:
    """Readers per outcome: the same keys overall and for each variant."""

    recipients: int = 0  # ledger rows
    sent: int = 0
    failed: int = 0
    bounced: int = 0  # a hard bounce: refused at send time (a 5xx to RCPT or DATA), or later
    soft_bounces: int = 0  # readers whose message came back with a soft (4.x.x) bounce
    complaints: int = 0  # readers who reported it as spam (an ARF report)
    unique_opens: int = 0  # any open, machine or human, or a human click
    human_opens: int = 0  # a human open or a human click
    machine_opens: int = 0  # machine opens only: nobody is known to have read it
    unique_clicks: int = 0  # a human click
    unsubscribes: int = 0
    trial_starts: int = 0
    conversions: int = 0

    @property
    def open_rate(self) -> float:
        return _rate(self.human_opens, self.sent)

    @property
    def click_rate(self) -> float:
        return _rate(self.unique_clicks, self.sent)

    @property
    def conversion_rate(self) -> float:
        return _rate(self.conversions, self.sent)

    @property
    def complaint_rate(self) -> float:
        # Six digits: the limit that matters is 0.3%, and one complaint in 30,000 shows.
        return _rate(self.complaints, self.sent, 6)

    @property
    def complaints_over_limit(self) -> bool:
        return self.complaints > COMPLAINT_LIMIT * self.sent

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_json(self) -> dict[str, int | float]:
        return {
            **asdict(self),
            "open_rate": self.open_rate,
            "click_rate": self.click_rate,
            "conversion_rate": self.conversion_rate,
            "complaint_rate": self.complaint_rate,
        }


@dataclass(frozen=True)
class SendStats:
    send_id: int
    slug: str
    title: str
    subject: str
    status: SendStatus
    started_at: dt.datetime | None
    by_variant: dict[Variant, Counts]
    # Each variant's HTML part for a typical reader: Gmail clips it above 102 KB.
    html_bytes: dict[Variant, int] = field(default_factory=dict)

    @property
    def total(self) -> Counts:
        return sum(self.by_variant.values(), Counts())

    def as_json(self) -> dict[str, Any]:
        return {
            "send_id": self.send_id,
            "slug": self.slug,
            "title": self.title,
            "subject": self.subject,
            "status": self.status,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            **self.total.as_json(),
            "by_variant": {v: c.as_json() for v, c in self.by_variant.items()},
        }

    def rows(self) -> list[tuple[str, ...]]:
        """The numbers as text for a table: (name, free, paid, total); rates in percent."""
        documents = [c.as_json() for c in (*self.by_variant.values(), self.total)]
        return [
            (name.replace("_", " "), *(_shown(d[name]) for d in documents)) for name in documents[0]
        ]


def _shown(value: int | float) -> str:
    return percent(value) if isinstance(value, float) else f"{value:,}"


def percent(rate: float) -> str:
    """A rate for people: 0.03% rather than 0.0% for the small ones conversions are."""
    return f"{rate * 100:.2f}%" if 0 < rate < 0.01 else f"{rate * 100:.1f}%"


@dataclass(frozen=True)
class Hour:
    """Readers active in one hour after the send started."""

    hour: int  # 0: the first hour
    human_opens: int = 0
    machine_opens: int = 0
    clicks: int = 0  # human clicks


def _rate(part: int, whole: int, digits: int = 4) -> float:
    return round(part / whole, digits) if whole else 0.0


def resolve(session: Session, ref: str) -> int:
    """The send ``ref`` names: a send id, or a post's slug (its latest send that is no test)."""
    text = ref.strip()
    if text.isdigit() and session.get(SendRow, int(text)) is not None:
        return int(text)
    post_id = session.scalar(select(PostRow.id).where(PostRow.slug == text))
    if post_id is None:
        raise NotFoundError(f"no send with id or post with slug {ref!r}")
    send_id = session.scalar(
        select(SendRow.id).where(SendRow.post_id == post_id).order_by(SendRow.id.desc()).limit(1)
    )
    if send_id is None:
        raise NotFoundError(f"post {ref!r} has not been sent yet (test sends do not count)")
    return send_id


def send_stats(session: Session, send_id: int) -> SendStats:
    """The numbers of one send, overall (``total``) and per variant."""
    send, slug, title = with_post(session, send_id)
    composed = session.execute(
        select(SendVariantRow.variant, SendVariantRow.subject, SendVariantRow.html_size).where(
            SendVariantRow.send_id == send_id
        )
    ).all()
    subjects = {variant: subject for variant, subject, _ in composed}
    numbers: dict[Variant, dict[str, int]] = {v: {} for v in VARIANTS}
    for variant, *values in session.execute(_ledger(send_id)):
        numbers[variant].update(zip(_LEDGER, map(int, values), strict=True))
    for variant, *values in session.execute(_engagement(send_id)):
        numbers[variant].update(zip(_ENGAGEMENT, (int(v or 0) for v in values), strict=True))
    for variant, *values in session.execute(_came_back(send_id)):
        numbers[variant].update(zip(_CAME_BACK, (int(v or 0) for v in values), strict=True))
    return SendStats(
        send_id=send.id,
        slug=slug,
        title=title,
        subject=subjects.get("free") or subjects.get("paid") or title,
        status=send.status,
        started_at=send.started_at,
        by_variant={v: Counts(**numbers[v]) for v in VARIANTS},
        html_bytes={variant: size for variant, _, size in composed},
    )


_LEDGER = ("recipients", "sent", "failed", "bounced")
_CAME_BACK = ("soft_bounces", "complaints")
_ENGAGEMENT = (
    "unique_opens",
    "human_opens",
    "machine_opens",
    "unique_clicks",
    "unsubscribes",
    "trial_starts",
    "conversions",
)


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.sum(case((condition, 1), else_=0))


def _ledger(send_id: int) -> Any:
    d = DeliveryRow
    return (
        select(
            d.variant,
            func.count(),
            _count_if(d.state == "sent"),
            _count_if(d.state == "failed"),
            _count_if(d.bounced.is_(True)),  # at send time (failed) or since (a bounce came back)
        )
        .where(d.send_id == send_id)
        .group_by(d.variant)
    )


def _engagement(send_id: int) -> Any:
    """Per variant, readers by what they did: one row per reader first, then summed."""
    e = TrackingEventRow

    def did(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.max(case((condition, 1), else_=0))

    human = e.classification == "human"
    per_reader = (
        select(
            e.subscriber_id.label("reader"),
            did(e.kind == "open").label("opened"),
            did(and_(e.kind == "open", human)).label("human_open"),
            did(and_(e.kind == "open", e.classification == "machine")).label("machine_open"),
            did(and_(e.kind == "click", human)).label("clicked"),
            did(e.kind == "unsubscribe").label("unsubscribed"),
            did(e.kind == "trial_started").label("trial"),
            did(e.kind == "converted").label("converted"),
        )
        .where(e.send_id == send_id)
        .group_by(e.subscriber_id)
        .subquery()
    )
    r = per_reader.c
    read_by_person = or_(r.human_open == 1, r.clicked == 1)
    # The join to the ledger gives each reader's variant and drops events of readers who are
    # not in it (erased since, or a forged id).
    return (
        select(
            DeliveryRow.variant,
            _count_if(or_(r.opened == 1, r.clicked == 1)),
            _count_if(read_by_person),
            _count_if(and_(r.machine_open == 1, not_(read_by_person))),
            func.sum(r.clicked),
            func.sum(r.unsubscribed),
            func.sum(r.trial),
            func.sum(r.converted),
        )
        .join(
            DeliveryRow,
            and_(DeliveryRow.send_id == send_id, DeliveryRow.subscriber_id == r.reader),
        )
        .group_by(DeliveryRow.variant)
    )


def _came_back(send_id: int) -> Any:
    """Per variant, readers whose message came back as a soft bounce or a complaint."""
    b = BounceEventRow

    def readers(kind: str) -> ColumnElement[int]:
        return func.count(func.distinct(case((b.kind == kind, b.subscriber_id))))

    return (
        select(DeliveryRow.variant, readers("soft"), readers("complaint"))
        .join(
            DeliveryRow,
            and_(DeliveryRow.send_id == send_id, DeliveryRow.subscriber_id == b.subscriber_id),
        )
        .where(b.send_id == send_id, b.kind.in_(("soft", "complaint")))
        .group_by(DeliveryRow.variant)
    )


def timeline(session: Session, send_id: int) -> list[Hour]:
    """Readers opening (human, machine) and clicking per hour since the send started (or was
    created, if it never started), for its first week.

    Hours without activity are included, so the list can be charted as it is.
    """
    start = session.scalar(
        select(func.coalesce(SendRow.started_at, SendRow.created_at)).where(SendRow.id == send_id)
    )
    if start is None:
        raise NotFoundError(f"no send with id {send_id}")
    e = TrackingEventRow
    hour = ((dialect.epoch(session, e.at) - int(start.timestamp())) // 3600).label("hour")
    human = e.classification == "human"

    def readers(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.count(func.distinct(case((condition, e.subscriber_id))))

    rows = session.execute(
        select(
            hour,
            readers(and_(e.kind == "open", human)),
            readers(and_(e.kind == "open", e.classification == "machine")),
            readers(and_(e.kind == "click", human)),
        )
        # Only ledger readers, as in ``send_stats``.
        .join(
            DeliveryRow,
            and_(DeliveryRow.send_id == send_id, DeliveryRow.subscriber_id == e.subscriber_id),
        )
        .where(
            e.send_id == send_id,
            e.kind.in_(("open", "click")),
            e.at >= start,
            e.at < start + dt.timedelta(hours=TIMELINE_HOURS),
        )
        .group_by(hour)
    ).all()
    found = {int(h): Hour(int(h), int(o), int(m), int(c)) for h, o, m, c in rows}
    last = max(found, default=0)
    return [found.get(h, Hour(h)) for h in range(max(last + 1, 24))]

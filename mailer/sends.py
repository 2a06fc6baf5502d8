"""Sends: plan one, snapshot its recipients into the ledger, and move it through its states.

Planning is two steps with the author's word between them: ``draft`` reads who the send
reaches and composes it (it writes nothing), ``plan`` writes it and starts it. The batches
``plan`` returns go to ``delivery.dispatch``. ``send_test`` mails both variants to one address,
outside the ledger.

A send's status: ``scheduled → sending → done``, with ``paused``, ``cancelled``, ``failed``
(a configuration problem such as refused SMTP credentials stopped it) and ``missed`` (a
scheduled send that no scheduler started in time). Every change is a compare-and-set on the
row, so two commands racing cannot, say, resume a cancelled send.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, cast, get_args

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    case,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.orm import Session

from mailer import segments
from mailer.compose import Composition, Publication, compose
from mailer.config import Settings
from mailer.db.models import (
    DeliveryRow,
    LinkRow,
    PostRow,
    SendBatchRow,
    SendRow,
    SendVariantRow,
    SubscriberRow,
    utcnow,
)
from mailer.delivery.ledger import MOVES, due, moved, unheld
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.delivery.smtp import Outcome, SmtpPool
from mailer.errors import InputError, NotFoundError
from mailer.posts import Post
from mailer.tokens import PREVIEW_SEND_ID, Signer
from mailer.vocabulary import VARIANTS, DeliveryState, SendStatus, Variant

log = logging.getLogger(__name__)

STATES: tuple[DeliveryState, ...] = get_args(DeliveryState)
LATE_AFTER = dt.timedelta(minutes=1)  # a send started later than this after its time is logged
UNFINISHED: tuple[DeliveryState, ...] = ("queued", "sending", "deferred")


@dataclass(frozen=True)
class Audience:
    """How many readers a segment reaches, per variant, before anything is written."""

    free: int
    paid: int

    @property
    def total(self) -> int:
        return self.free + self.paid


@dataclass(frozen=True)
class SendInfo:
    id: int
    slug: str
    title: str
    segment: str
    status: SendStatus
    created_at: dt.datetime
    scheduled_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    counts: dict[DeliveryState, int] = field(default_factory=dict)  # every state, 0 included
    by_variant: dict[str, int] = field(default_factory=dict)

    @property
    def recipients(self) -> int:
        return sum(self.counts.values())

    def as_json(self) -> dict[str, object]:
        def iso(t: dt.datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "id": self.id,
            "slug": self.slug,
            "title": self.title,
            "segment": self.segment,
            "status": self.status,
            "recipients": self.recipients,
            "counts": self.counts,
            "by_variant": self.by_variant,
            "created_at": iso(self.created_at),
            "scheduled_at": iso(self.scheduled_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "error": self.error,
        }


def _variant_of_tier() -> ColumnElement[str]:
    # Free readers get the paywalled variant; trial, paid and comped readers the whole post.
    return case((SubscriberRow.tier == "free", "free"), else_="paid")


def audience(session: Session, segment: str) -> Audience:
    """Readers ``segment`` reaches now, per variant (only active readers count)."""
    ids = segments.select_active(session, segment).subquery()
    by_tier = dict(
        session.execute(
            select(SubscriberRow.tier, func.count())
            .where(SubscriberRow.id.in_(select(ids)))
            .group_by(SubscriberRow.tier)
        ).all()
    )
    free = by_tier.pop("free", 0)
    return Audience(free=free, paid=sum(by_tier.values()))


@dataclass(frozen=True)
class Draft:
    """A send before anything is written: what the author is asked to confirm."""

    post: Post
    segment: str
    audience: Audience
    composition: Composition
    scheduled_at: dt.datetime | None = None

    @property
    def clipped(self) -> bool:
        """Gmail would clip one of the variants."""
        return any(self.composition.variant(v).clipped for v in VARIANTS)


@dataclass(frozen=True)
class Planned:
    send_id: int
    batches: tuple[int, ...]  # to dispatch now; none for a scheduled send


def draft(
    session: Session,
    post: Post,
    segment: str,
    publication: Publication,
    *,
    scheduled_at: dt.datetime | None = None,
) -> Draft:
    """Who a send of ``post`` (a saved post) to ``segment`` reaches, and its composed variants.

    Writes nothing. ``InputError`` when the segment selects no active reader.
    """
    reach = audience(session, segment)
    if reach.total == 0:
        raise InputError(f"--segment {segment!r} selects no active readers; nothing to send")
    return Draft(post, segment, reach, compose(post, publication), scheduled_at)


def plan(session: Session, draft: Draft, *, batch_size: int) -> Planned:
    """Write the send (``create``) and start it unless it is scheduled for later."""
    send_id = create(
        session,
        draft.post.slug,
        draft.segment,
        draft.composition,
        batch_size=batch_size,
        scheduled_at=draft.scheduled_at,
    )
    batches = () if draft.scheduled_at else tuple(start(session, send_id))
    return Planned(send_id, batches)


@dataclass(frozen=True)
class SentTest:
    outcomes: dict[Variant, Outcome]
    warnings: list[str]  # the composition's, as for a real send

    @property
    def ok(self) -> bool:
        return all(o.state == "sent" for o in self.outcomes.values())


def send_test(settings: Settings, post: Post, address: str) -> SentTest:
    """Both variants to ``address``, subjects marked "[Test]", outside the ledger."""
    composition = compose(post, Publication.from_settings(settings), subject_prefix="[Test] ")
    from mailer.delivery.dkim import signer_from_settings  # cryptography: only where it signs

    signer = Signer(settings.secret_keys)
    dkim = signer_from_settings(settings)
    recipient = Recipient(subscriber_id=0, email=address, name=None)

    async def deliver() -> dict[Variant, Outcome]:
        outcomes: dict[Variant, Outcome] = {}
        async with SmtpPool.from_settings(settings, size=1) as pool:
            for variant in VARIANTS:
                personaliser = Personaliser(
                    composition.variant(variant),
                    send_id=PREVIEW_SEND_ID,
                    signer=signer,
                    tracker_url=settings.tracker_url,
                    dkim=dkim,
                )
                outcomes[variant] = await pool.send(
                    personaliser.envelope_sender(recipient),
                    address,
                    personaliser.personalise(recipient),
                )
        return outcomes

    return SentTest(asyncio.run(deliver()), composition.warnings())


def create(
    session: Session,
    slug: str,
    segment: str,
    composition: Composition,
    *,
    batch_size: int,
    scheduled_at: dt.datetime | None = None,
) -> int:
    """Create a send: its composed variants, its links, and one ledger row per recipient.

    The recipients are snapshotted by one INSERT ... SELECT, so the send reaches exactly the
    readers in the segment at this moment; later imports do not join it.
    """
    post_id = session.scalar(select(PostRow.id).where(PostRow.slug == slug))
    if post_id is None:
        raise NotFoundError(f"no post with slug {slug!r}; add it with `mailer posts add FILE`")
    send = SendRow(
        post_id=post_id,
        segment=segment,
        status="scheduled",
        scheduled_at=scheduled_at,
    )
    session.add(send)
    session.flush()
    for name in VARIANTS:
        template = composition.variant(name)
        session.add(
            SendVariantRow(
                send_id=send.id,
                variant=name,
                subject=template.subject,
                nonce=template.nonce,
                template=template.mime,
                html_size=template.html_bytes,
            )
        )
    session.add_all(
        LinkRow(send_id=send.id, link_no=n, url=url) for n, url in enumerate(composition.links)
    )
    ids = segments.select_active(session, segment).subquery()
    position = func.row_number().over(order_by=SubscriberRow.id) - 1
    session.execute(
        insert(DeliveryRow).from_select(
            ["send_id", "subscriber_id", "variant", "batch_no", "state"],
            select(
                literal(send.id),
                SubscriberRow.id,
                _variant_of_tier(),
                position // batch_size,
                literal("queued"),
            ).where(SubscriberRow.id.in_(select(ids))),
        )
    )
    session.execute(
        insert(SendBatchRow).from_select(
            ["send_id", "batch_no"],
            select(DeliveryRow.send_id, DeliveryRow.batch_no)
            .where(DeliveryRow.send_id == send.id)
            .distinct(),
        )
    )
    return send.id


def start(session: Session, send_id: int) -> list[int]:
    """Send a scheduled (or missed) send now: ``sending``; the batches to enqueue."""
    return _to_sending(session, send_id, ("scheduled", "missed"), finished_at=None)


def resume(session: Session, send_id: int) -> list[int]:
    """Carry on a paused or failed send, or one left ``sending`` by a process that died (as a
    send delivered without a broker is: no reconciler carries it on); the batches to enqueue.
    Resuming a send still being delivered is harmless: a batch's lease makes a second run of it
    wait (with workers, their reconciler carries on a stuck send without it)."""
    return _to_sending(session, send_id, ("paused", "failed", "sending"))


def _to_sending(
    session: Session, send_id: int, allowed: tuple[SendStatus, ...], **values: object
) -> list[int]:
    _transition(session, send_id, allowed, "sending", **values)
    session.execute(
        update(SendRow)
        .where(SendRow.id == send_id, SendRow.started_at.is_(None))
        .values(started_at=utcnow())
    )
    return unfinished_batches(session, send_id)


def reschedule(session: Session, send_id: int, at: dt.datetime) -> None:
    """Move a send that has not started (scheduled, or missed) to ``at``."""
    allowed: tuple[SendStatus, ...] = ("scheduled", "missed")
    _transition(session, send_id, allowed, "scheduled", scheduled_at=at, finished_at=None)


def pause(session: Session, send_id: int) -> None:
    _transition(session, send_id, ("sending",), "paused")


def pause_if_sending(session: Session, send_id: int) -> bool:
    """Pause the send unless it has ended (or was paused) meanwhile; True if it was paused."""
    return _try_status(session, send_id, "sending", "paused")


def cancel(session: Session, send_id: int) -> None:
    """Stop for good: readers not yet mailed are marked ``skipped``."""
    allowed: tuple[SendStatus, ...] = ("scheduled", "missed", "sending", "paused", "failed")
    _transition(session, send_id, allowed, "cancelled")
    session.execute(
        update(DeliveryRow)
        .where(DeliveryRow.send_id == send_id, moved("cancelled"))
        .values(state=MOVES["cancelled"].target, last_reply="send cancelled")
    )
    session.execute(update(SendRow).where(SendRow.id == send_id).values(finished_at=utcnow()))


def retry_unknown(session: Session, send_id: int) -> tuple[int, list[int]]:
    """Queue again the readers whose message was in flight when a worker died.

    Some of them may get the message twice: that is why it takes the author's word.
    """
    info = show(session, send_id)
    if info.status in ("cancelled", "scheduled", "missed"):
        raise InputError(f"send {send_id} is {info.status}; only a started send can retry")
    count = _rowcount(
        session.execute(
            update(DeliveryRow)
            .where(DeliveryRow.send_id == send_id, moved("retried"))
            .values(state=MOVES["retried"].target, last_reply="queued again by retry-unknown")
        )
    )
    if count and info.status in ("done", "paused", "failed"):
        _set_status(session, send_id, info.status, "sending", finished_at=None)
    return count, unfinished_batches(session, send_id)


def fail(session: Session, send_id: int, error: str) -> None:
    """A configuration problem stops the send; fix it and ``resume``."""
    if _try_status(session, send_id, "sending", "failed", error=error):
        log.warning("%s failed: %s", _named(session, send_id), error, extra={"send_id": send_id})


def give_up_if_too_old(session: Session, send_id: int, max_age: float, error: str) -> bool:
    """Fail a sending send started more than ``max_age`` seconds ago; True if it failed now.

    For a batch that keeps being interrupted (the SMTP server or the database stays away):
    retried until then, and afterwards the send says why it stopped.
    """
    cutoff = utcnow() - dt.timedelta(seconds=max_age)
    error = f"delivery kept failing for {max_age:g}s: {error}"
    failed = session.execute(
        update(SendRow)
        .where(SendRow.id == send_id, SendRow.status == "sending", SendRow.started_at < cutoff)
        .values(status="failed", error=error)
    )
    if _rowcount(failed) != 1:
        return False
    log.warning("%s failed: %s", _named(session, send_id), error, extra={"send_id": send_id})
    return True


def expect_run(session: Session, send_id: int, batch_no: int, *, within: dt.timedelta) -> None:
    """Note that a batch no live run holds runs again within ``within``: if no run holds it by
    then, ``stalled_batches`` counts it stalled. A task held for later (a countdown) lives only
    in the worker that holds it, so a worker killed outright takes it along until the broker's
    visibility timeout (hours); the reconciler enqueues the batch again instead, and notes it
    here so that it is not enqueued again at every tick while the queue is long.

    An expired lease (its worker died) is released on the way: the next run takes the batch at
    once, and still finds the dead run's rows in flight (they are marked by state, not owner).
    """
    now = utcnow()
    session.execute(
        update(SendBatchRow)
        .where(
            SendBatchRow.send_id == send_id,
            SendBatchRow.batch_no == batch_no,
            unheld(now),  # a live run's own lease says when it is stalled
        )
        .values(lease_owner=None, lease_until=now + within)
    )


def finish_if_done(session: Session, send_id: int) -> bool:
    """Mark a sending send ``done`` once no reader is left to try; True if it is done now."""
    pending = session.scalar(
        select(DeliveryRow.id)
        .where(DeliveryRow.send_id == send_id, DeliveryRow.state.in_(UNFINISHED))
        .limit(1)
    )
    if pending is not None:
        return False
    if _try_status(session, send_id, "sending", "done", finished_at=utcnow()):
        info = show(session, send_id)
        shown = ", ".join(f"{n} {state}" for state, n in info.counts.items() if n)
        log.info("send %s (%s) done: %s", send_id, info.slug, shown, extra={"send_id": send_id})
    return True


def finish_all_done(session: Session) -> list[int]:
    """``finish_if_done`` for every sending send: the worker that ran a send's last batch may
    have died before it could mark the send done, and no batch is left to run and do it."""
    pending = (
        select(DeliveryRow.id)
        .where(DeliveryRow.send_id == SendRow.id, DeliveryRow.state.in_(UNFINISHED))
        .exists()
    )
    finished = session.scalars(select(SendRow.id).where(SendRow.status == "sending", ~pending))
    return [send_id for send_id in list(finished) if finish_if_done(session, send_id)]


def _named(session: Session, send_id: int) -> str:
    """How logs name a send: its id and its post's slug."""
    _, slug, _ = with_post(session, send_id)
    return f"send {send_id} ({slug})"


def slug_and_batch_count(session: Session, send_id: int) -> tuple[str, int]:
    """The send's post's slug and how many batches the send has."""
    _, slug, _ = with_post(session, send_id)
    count = session.scalar(
        select(func.count()).select_from(SendBatchRow).where(SendBatchRow.send_id == send_id)
    )
    return slug, count or 0


def unfinished_batches(session: Session, send_id: int) -> list[int]:
    return list(
        session.scalars(
            select(DeliveryRow.batch_no)
            .where(DeliveryRow.send_id == send_id, DeliveryRow.state.in_(UNFINISHED))
            .distinct()
            .order_by(DeliveryRow.batch_no)
        )
    )


def start_due(session: Session, *, grace: dt.timedelta) -> dict[int, list[int]]:
    """Start scheduled sends whose time has come: {send: batches to enqueue}.

    One found more than ``grace`` late (no scheduler was running) becomes ``missed`` instead:
    a post mailed hours after its moment may do more harm than good. Each change is a
    compare-and-set, so a second scheduler finds the send taken and leaves it.
    """
    now = utcnow()
    started: dict[int, list[int]] = {}
    due = session.execute(
        select(SendRow.id, PostRow.slug, SendRow.scheduled_at)
        .join(PostRow, PostRow.id == SendRow.post_id)
        .where(SendRow.status == "scheduled", SendRow.scheduled_at <= now)
        .order_by(SendRow.scheduled_at)
    ).all()
    for send_id, slug, at in due:
        assert at is not None  # selected by scheduled_at <= now
        late = now - at
        if late > grace:
            error = f"scheduled for {at.isoformat()}; no scheduler started it in time"
            if _try_status(session, send_id, "scheduled", "missed", finished_at=now, error=error):
                log.warning(
                    "send %s (%s) missed: found %s late, past MAILER_SCHEDULE_GRACE (%s)",
                    send_id,
                    slug,
                    _span(late),
                    _span(grace),
                    extra={"send_id": send_id},
                )
            continue
        if not _try_status(session, send_id, "scheduled", "sending", started_at=now):
            log.info(
                "send %s (%s) was started by another scheduler",
                send_id,
                slug,
                extra={"send_id": send_id},
            )
            continue
        if late > LATE_AFTER:
            log.warning(
                "send %s (%s) started %s late",
                send_id,
                slug,
                _span(late),
                extra={"send_id": send_id},
            )
        else:
            log.info("send %s (%s) started", send_id, slug, extra={"send_id": send_id})
        started[send_id] = unfinished_batches(session, send_id)
    return started


def _span(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def stalled_batches(session: Session, *, never_run: bool = False) -> list[tuple[int, int]]:
    """(send, batch) pairs of sending sends that no live run holds and no next run is noted for.

    A ``lease_until`` passed with readers left: a lease that expired unreleased (its worker
    died), or a released batch whose next run is overdue (``expect_run``: its countdown task
    died with the worker that held it). With ``never_run``, also every batch that never ran
    with readers due: the caller leaves out those the broker holds a task for.
    """
    now = utcnow()

    def rows_where(*condition: ColumnElement[bool]) -> ColumnElement[bool]:
        return (
            select(DeliveryRow.id)
            .where(
                DeliveryRow.send_id == SendBatchRow.send_id,
                DeliveryRow.batch_no == SendBatchRow.batch_no,
                *condition,
            )
            .exists()
        )

    stalled = (SendBatchRow.lease_until < now) & rows_where(DeliveryRow.state.in_(UNFINISHED))
    if never_run:
        stalled |= SendBatchRow.lease_until.is_(None) & rows_where(due(now))
    found = session.execute(
        select(SendBatchRow.send_id, SendBatchRow.batch_no)
        .join(SendRow, SendRow.id == SendBatchRow.send_id)
        .where(SendRow.status == "sending", stalled)
        .order_by(SendBatchRow.send_id, SendBatchRow.batch_no)
    )
    return [(send_id, batch_no) for send_id, batch_no in found]


def status(session: Session, send_id: int) -> SendStatus:
    found = session.scalar(select(SendRow.status).where(SendRow.id == send_id))
    if found is None:
        raise NotFoundError(f"no send with id {send_id}")
    return found


def with_post(session: Session, send_id: int) -> tuple[SendRow, str, str]:
    """The send, its post's slug and its post's title; ``NotFoundError`` if there is none."""
    row = session.execute(
        select(SendRow, PostRow.slug, PostRow.title)
        .join(PostRow, PostRow.id == SendRow.post_id)
        .where(SendRow.id == send_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"no send with id {send_id}")
    send, slug, title = row
    return send, slug, title


def show(session: Session, send_id: int) -> SendInfo:
    send, slug, title = with_post(session, send_id)
    counts = dict.fromkeys(STATES, 0)
    by_variant = {"free": 0, "paid": 0}
    for variant, state, n in session.execute(
        select(DeliveryRow.variant, DeliveryRow.state, func.count())
        .where(DeliveryRow.send_id == send_id)
        .group_by(DeliveryRow.variant, DeliveryRow.state)
    ):
        counts[state] += n
        by_variant[variant] += n
    return SendInfo(
        id=send.id,
        slug=slug,
        title=title,
        segment=send.segment,
        status=send.status,
        created_at=send.created_at,
        scheduled_at=send.scheduled_at,
        started_at=send.started_at,
        finished_at=send.finished_at,
        error=send.error,
        counts=counts,
        by_variant=by_variant,
    )


def list_sends(session: Session, limit: int = 50) -> list[SendInfo]:
    ids = session.scalars(select(SendRow.id).order_by(SendRow.id.desc()).limit(limit))
    return [show(session, send_id) for send_id in ids]


def _transition(
    session: Session,
    send_id: int,
    allowed: tuple[SendStatus, ...],
    new: SendStatus,
    **values: object,
) -> None:
    current = status(session, send_id)
    if current not in allowed:
        when = f"{', '.join(allowed[:-1])} or {allowed[-1]}" if allowed[1:] else allowed[0]
        raise InputError(f"send {send_id} is {current}; it can become {new} only when {when}")
    _set_status(session, send_id, current, new, **values)


def _set_status(
    session: Session, send_id: int, old: SendStatus, new: SendStatus, **values: object
) -> None:
    if not _try_status(session, send_id, old, new, **values):
        raise InputError(f"send {send_id} changed while we looked; try again")


def _try_status(
    session: Session, send_id: int, old: SendStatus, new: SendStatus, **values: object
) -> bool:
    """Move the send from ``old`` to ``new`` (compare-and-set); False if it was not ``old``."""
    changed = session.execute(
        update(SendRow)
        .where(SendRow.id == send_id, SendRow.status == old)
        .values(**{"status": new, "error": None, **values})
    )
    return _rowcount(changed) == 1


def _rowcount(result: object) -> int:
    # Session.execute is typed as returning Result; an UPDATE's is a CursorResult.
    return cast(CursorResult[Any], result).rowcount

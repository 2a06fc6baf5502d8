"""The tables of every stage: posts, subscribers, segments, sends, the delivery ledger, tracking.

Designed up front for the whole pipeline, so later features add tables and columns rather
than reshape these. The library's stages query them directly, each its own tables: posts
(``mailer.posts.store``); subscribers, tags, events and suppressions (``mailer.subscribers``);
segments (``mailer.segments``); sends, variants, batches, deliveries and links
(``mailer.sends``, ``mailer.delivery.ledger``); tracking events (``mailer.tracking``, and the
billing milestones ``mailer.billing`` credits); billing's own (``mailer.billing``); inbound
mail's (``mailer.inbound``, which also marks a bounced delivery). ``mailer.stats``,
``mailer.metrics`` and the tracker read across them. Rows stay inside the module that
queried them: stages hand each other frozen dataclasses, so compose, personalise, SMTP and
the CLI never see one. Every timestamp is an aware UTC datetime (see ``UtcDateTime``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from mailer.vocabulary import (
    AUDIENCES,
    BOUNCE_KINDS,
    CLASSIFICATIONS,
    DELIVERY_STATES,
    INBOUND_OUTCOMES,
    SEND_STATUSES,
    SUBSCRIBER_STATUSES,
    TIERS,
    TRACKING_KINDS,
    VARIANTS,
    Audience,
    BounceKind,
    Classification,
    DeliveryState,
    InboundOutcome,
    SendStatus,
    SubscriberStatus,
    Tier,
    TrackingKind,
    Variant,
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that only takes aware datetimes and always returns UTC.

    SQLite keeps no offset, so values are converted to UTC before they are stored (which also
    keeps its text comparisons correct) and marked UTC again when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")


class JsonDocument(TypeDecorator[Any]):
    """JSON; JSONB on PostgreSQL, so segments can use containment (tags @> '["x"]') and GIN
    indexes. The PostgreSQL dialect is imported only there: a SQLite command then starts
    ~30 ms sooner."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


Json = JsonDocument()


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=column)


def _created() -> Mapped[dt.datetime]:
    # The server default also covers rows written by bulk paths that bypass the ORM (COPY).
    return mapped_column(UtcDateTime(), default=utcnow, server_default=func.current_timestamp())


def _updated() -> Mapped[dt.datetime]:
    return mapped_column(
        UtcDateTime(), default=utcnow, onupdate=utcnow, server_default=func.current_timestamp()
    )


class Base(DeclarativeBase):
    # Stable constraint names: Alembic needs them to alter or drop constraints later,
    # and SQLite batch migrations need them to recreate tables.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class PostRow(Base):
    __tablename__ = "posts"
    __table_args__ = (_one_of("audience", AUDIENCES),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    slug: Mapped[str] = mapped_column(Text, unique=True)
    title: Mapped[str] = mapped_column(Text)
    subtitle: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(Text)
    date: Mapped[dt.date | None] = mapped_column(Date)
    audience: Mapped[Audience] = mapped_column(String(16))
    preheader: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    free_body: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)  # the file it was added from
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class SubscriberRow(Base):
    __tablename__ = "subscribers"
    __table_args__ = (
        _one_of("tier", TIERS),
        _one_of("status", SUBSCRIBER_STATUSES),
        # Segment counts filter on status first (only active readers are mailed).
        Index(None, "status", "tier"),
        Index(None, "status", "created_at"),
        Index(None, "domain", "status"),
        # SQLite would give an erased reader's id (and their tracking events) to the next one.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))  # as given (normalised by email-validator)
    # Lower-cased address: uniqueness regardless of case, and the lookup key.
    email_key: Mapped[str] = mapped_column(String(320), unique=True)
    domain: Mapped[str] = mapped_column(String(255))  # domain of email_key: segments, throttling
    name: Mapped[str | None] = mapped_column(Text)
    tier: Mapped[Tier] = mapped_column(String(16), default="free", server_default="free")
    trial_ends_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    status: Mapped[SubscriberStatus] = mapped_column(
        String(16), default="active", server_default="active"
    )
    source: Mapped[str | None] = mapped_column(Text)
    # JSON: assign a new dict to change it; in-place edits are not tracked.
    attributes: Mapped[dict[str, Any]] = mapped_column(
        Json, default=dict, server_default=text("'{}'")
    )
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class SubscriberTagRow(Base):
    """One row per (reader, tag): `tag:` segments are an indexed lookup, not a JSON scan."""

    __tablename__ = "subscriber_tags"
    __table_args__ = (Index(None, "tag", "subscriber_id"),)

    subscriber_id: Mapped[int] = mapped_column(
        Id, ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)


class SubscriberEventRow(Base):
    """Every tier and status change, with its time: conversions are counted from these."""

    __tablename__ = "subscriber_events"
    __table_args__ = (
        Index(None, "subscriber_id", "at"),
        Index(None, "kind", "at"),
        Index(None, "send_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(Id, ForeignKey("subscribers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))  # open vocabulary: tier_changed, status_changed…
    old: Mapped[str | None] = mapped_column(Text)
    new: Mapped[str | None] = mapped_column(Text)
    at: Mapped[dt.datetime] = _created()
    send_id: Mapped[int | None] = mapped_column(Id, ForeignKey("sends.id", ondelete="SET NULL"))
    meta: Mapped[dict[str, Any] | None] = mapped_column(Json)


class SuppressionRow(Base):
    """Erased addresses, kept only as a hash so they are never mailed again."""

    __tablename__ = "suppressions"

    email_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of email_key
    reason: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = _created()


class SegmentRow(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    expression: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _updated()


class SendRow(Base):
    """One send of a post to a segment. Counts live in the ledger, never here."""

    __tablename__ = "sends"
    __table_args__ = (
        _one_of("status", SEND_STATUSES),
        Index(None, "status", "scheduled_at"),
        Index(None, "post_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    post_id: Mapped[int] = mapped_column(Id, ForeignKey("posts.id"))
    segment: Mapped[str] = mapped_column(Text)  # the expression as planned
    status: Mapped[SendStatus] = mapped_column(
        String(16), default="scheduled", server_default="scheduled"
    )
    error: Mapped[str | None] = mapped_column(Text)  # why it failed or was missed
    scheduled_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[dt.datetime] = _created()
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())


class SendVariantRow(Base):
    """A variant composed once per send: MIME bytes with per-recipient tokens left in."""

    __tablename__ = "send_variants"
    __table_args__ = (_one_of("variant", VARIANTS),)

    send_id: Mapped[int] = mapped_column(
        Id, ForeignKey("sends.id", ondelete="CASCADE"), primary_key=True
    )
    variant: Mapped[Variant] = mapped_column(String(16), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)
    nonce: Mapped[str] = mapped_column(String(32))  # the template's marker nonce
    template: Mapped[bytes] = mapped_column(LargeBinary)
    html_size: Mapped[int] = mapped_column(Integer)  # bytes of HTML a typical reader gets


class SendBatchRow(Base):
    """A batch of a send's ledger, leased to one worker at a time.

    The lease makes a second copy of the same batch task (redelivered, or enqueued again by
    resume or the reconciler) wait instead of racing; a lease left by a killed worker expires,
    and its rows still marked ``sending`` were in flight: they become ``unknown``.
    """

    __tablename__ = "send_batches"

    send_id: Mapped[int] = mapped_column(
        Id, ForeignKey("sends.id", ondelete="CASCADE"), primary_key=True
    )
    batch_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    # When the reconciler may take the batch for stalled: while a run holds it, when that
    # run's lease expires; once released with a next run scheduled, when that run is overdue.
    lease_until: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())


class DeliveryRow(Base):
    """The ledger: one row per recipient of a send, moved through its states by compare-and-set."""

    __tablename__ = "deliveries"
    __table_args__ = (
        _one_of("variant", VARIANTS),
        _one_of("state", DELIVERY_STATES),
        UniqueConstraint("send_id", "subscriber_id"),
        Index(None, "send_id", "batch_no", "state"),
        Index(None, "subscriber_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    send_id: Mapped[int] = mapped_column(Id, ForeignKey("sends.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(Id, ForeignKey("subscribers.id", ondelete="CASCADE"))
    variant: Mapped[Variant] = mapped_column(String(16))
    batch_no: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(
        String(16), default="queued", server_default="queued"
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    message_id: Mapped[str | None] = mapped_column(Text)
    last_reply: Mapped[str | None] = mapped_column(Text)  # the SMTP server's last answer
    # Failed because of the address or the message (a 5xx to RCPT or DATA), not of our sender.
    bounced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())  # when the server said 250
    updated_at: Mapped[dt.datetime] = _updated()


class LinkRow(Base):
    """The links of a composed send: clicks only ever redirect to one of these."""

    __tablename__ = "links"

    send_id: Mapped[int] = mapped_column(
        Id, ForeignKey("sends.id", ondelete="CASCADE"), primary_key=True
    )
    link_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)


class TrackingEventRow(Base):
    """Opens, clicks, unsubscribes and billing milestones.

    No foreign keys on purpose: events are written in batches from a buffer, and one event
    for a reader erased meanwhile must not make the whole batch fail.
    """

    __tablename__ = "tracking_events"
    __table_args__ = (
        _one_of("kind", TRACKING_KINDS),
        _one_of("classification", CLASSIFICATIONS),
        # Unique opens and clicks per send come from the index alone.
        Index(None, "send_id", "kind", "subscriber_id"),
        # Attribution: a reader's last click or open before a trial or conversion.
        Index(None, "subscriber_id", "kind", "at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[TrackingKind] = mapped_column(String(16))
    send_id: Mapped[int | None] = mapped_column(Id)
    subscriber_id: Mapped[int | None] = mapped_column(Id)
    link_no: Mapped[int | None] = mapped_column(Integer)
    classification: Mapped[Classification | None] = mapped_column(String(16))
    user_agent: Mapped[str | None] = mapped_column(Text)
    ip: Mapped[str | None] = mapped_column(String(45))
    at: Mapped[dt.datetime] = _created()
    # The buffer's id for the event (e.g. a Redis stream id): re-flushing after a crash
    # between insert and acknowledgement inserts nothing twice.
    ingest_key: Mapped[str | None] = mapped_column(String(64), unique=True)


class BillingEventRow(Base):
    """Webhook events already handled: a replayed event id does nothing."""

    __tablename__ = "billing_events"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[dt.datetime] = _created()


class BillingCustomerRow(Base):
    """A billing provider's customer id and its reader.

    Webhooks after the first (a conversion, a cancellation) name only the customer id, not
    an address or our reference, so the reader found the first time is remembered here.
    """

    __tablename__ = "billing_customers"
    __table_args__ = (Index(None, "subscriber_id"),)  # erasing a reader cascades through it

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(Id, ForeignKey("subscribers.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = _created()


class InboundMessageRow(Base):
    """Every inbound message handled, by a hash of its Message-ID: the second time, nothing."""

    __tablename__ = "inbound_messages"
    __table_args__ = (_one_of("outcome", INBOUND_OUTCOMES),)

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    outcome: Mapped[InboundOutcome] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = _created()


class BounceEventRow(Base):
    """A bounce or complaint that came back about a reader (and the send, when known).

    Soft ones are counted against ``MAILER_SOFT_BOUNCE_LIMIT``; stats count readers per send.
    """

    __tablename__ = "bounce_events"
    __table_args__ = (
        _one_of("kind", BOUNCE_KINDS),
        Index(None, "subscriber_id", "kind", "at"),
        Index(None, "send_id", "kind"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[BounceKind] = mapped_column(String(16))
    subscriber_id: Mapped[int] = mapped_column(Id, ForeignKey("subscribers.id", ondelete="CASCADE"))
    send_id: Mapped[int | None] = mapped_column(Id, ForeignKey("sends.id", ondelete="SET NULL"))
    message_key: Mapped[str] = mapped_column(String(32))  # the inbound message it came in
    status: Mapped[str | None] = mapped_column(String(64))  # 5.1.1, 4.2.0, abuse ...
    at: Mapped[dt.datetime] = _created()

"""Stripe webhooks, attribution and billing milestones, on both backends.

Payloads are signed with the stripe library's own signing function, in the header format
Stripe sends, so verification is tested against the real thing.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import add_post, add_send
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from mailer import db, subscribers
from mailer.billing import testing as stripe_events
from mailer.billing.attribution import attribute, change_tier
from mailer.billing.webhook import handle_stripe
from mailer.cli import app
from mailer.db.models import (
    BillingCustomerRow,
    BillingEventRow,
    SubscriberEventRow,
    TrackingEventRow,
)
from mailer.tokens import Kind, Signer, Token
from mailer.vocabulary import Classification, TrackingKind

SECRET = "whsec_test_0123456789abcdef"
SIGNER = Signer(["tests-only-secret-key-0123456789"])
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
DAYS = 30
TRIAL_END = int(dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC).timestamp())


def signed(event: dict[str, Any], *, secret: str = SECRET, age: int = 0) -> tuple[bytes, str]:
    """The body and a ``Stripe-Signature`` header for it, ``age`` seconds old."""
    return stripe_events.signed(event, secret, at=int(time.time()) - age)


def subscription_event(
    event_id: str,
    event_type: str,
    status: str,
    *,
    customer: str | dict[str, Any] = "cus_1",
    metadata: dict[str, str] | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """About subscription sub_1 of ``customer``, whose trial ends at TRIAL_END if trialing."""
    subscription = {
        "id": "sub_1",
        "customer": customer,
        "status": status,
        "metadata": metadata or {},
        "trial_end": TRIAL_END if status == "trialing" else None,
    }
    return stripe_events.subscription_event(event_id, event_type, subscription, previous=previous)


@dataclass
class World:
    engine: Engine
    ann: int
    bob: int
    send_a: int
    send_b: int

    def deliver(self, event: dict[str, Any], **kwargs: Any) -> int:
        payload, header = signed(event, **kwargs)
        return self.post(payload, header)

    def post(self, payload: bytes, header: str | None, secret: str = SECRET) -> int:
        return handle_stripe(
            self.engine,
            payload,
            header,
            secret=secret,
            signer=SIGNER,
            attribution_days=DAYS,
            now=NOW,
        )

    def track(
        self,
        kind: TrackingKind,
        send_id: int,
        reader: int,
        ago: dt.timedelta,
        classification: Classification | None = "human",
    ) -> None:
        with db.session(self.engine) as s:
            s.add(
                TrackingEventRow(
                    kind=kind,
                    send_id=send_id,
                    subscriber_id=reader,
                    classification=classification,
                    at=NOW - ago,
                )
            )

    def milestones(self) -> list[tuple[str, int | None, int | None]]:
        with db.session(self.engine) as s:
            rows = s.execute(
                select(
                    TrackingEventRow.kind, TrackingEventRow.send_id, TrackingEventRow.subscriber_id
                )
                .where(TrackingEventRow.kind.in_(("trial_started", "converted", "canceled")))
                .order_by(TrackingEventRow.id)
            ).all()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def tier(self, email: str) -> str:
        with db.session(self.engine) as s:
            return subscribers.get(s, email).tier

    def tier_events(self, reader: int) -> list[tuple[str | None, str | None]]:
        with db.session(self.engine) as s:
            return [
                (e.old, e.new)
                for e in s.scalars(
                    select(SubscriberEventRow)
                    .where(
                        SubscriberEventRow.subscriber_id == reader,
                        SubscriberEventRow.kind == "tier_changed",
                        SubscriberEventRow.old.is_not(None),
                    )
                    .order_by(SubscriberEventRow.id)
                )
            ]

    def count(self, model: type[Any]) -> int:
        with db.session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def world(engine: Engine) -> World:
    with db.session(engine) as s:
        post = add_post(s)
        send_a, send_b = add_send(s, post), add_send(s, post)
        ann = subscribers.add(s, "ann@example.com")
        bob = subscribers.add(s, "bob@example.com")
        s.flush()
        return World(engine, ann.id, bob.id, send_a.id, send_b.id)


def ref(world: World, send_id: int, reader: int) -> str:
    return SIGNER.sign(Token(Kind.REF, send_id, reader))


def test_trial_then_conversion_credited_to_the_clicked_send(world: World) -> None:
    world.track("click", world.send_a, world.ann, dt.timedelta(days=2))
    world.track("open", world.send_b, world.ann, dt.timedelta(days=1))  # later, but only an open
    created = subscription_event(
        "evt_1",
        "customer.subscription.created",
        "trialing",
        customer={"id": "cus_1", "object": "customer", "email": "Ann@Example.com"},
    )
    assert world.deliver(created) == 200
    with db.session(world.engine) as s:
        ann = subscribers.get(s, "ann@example.com")
        mapped = s.scalar(select(BillingCustomerRow.subscriber_id))
    assert ann.tier == "trial"
    assert ann.trial_ends_at == dt.datetime.fromtimestamp(TRIAL_END, dt.UTC)
    assert mapped == world.ann  # later events name only cus_1
    assert world.milestones() == [("trial_started", world.send_a, world.ann)]

    # The update names the customer by id only: the remembered mapping finds Ann.
    updated = subscription_event(
        "evt_2", "customer.subscription.updated", "active", previous={"status": "trialing"}
    )
    assert world.deliver(updated) == 200
    assert world.tier("ann@example.com") == "paid"
    assert world.milestones()[1:] == [("converted", world.send_a, world.ann)]
    assert world.tier_events(world.ann) == [("free", "trial"), ("trial", "paid")]

    assert world.deliver(updated) == 200  # a replay of the same event id
    assert world.deliver(created) == 200
    assert len(world.milestones()) == 2
    assert world.tier_events(world.ann) == [("free", "trial"), ("trial", "paid")]
    assert world.count(BillingEventRow) == 2

    deleted = subscription_event("evt_3", "customer.subscription.deleted", "canceled")
    assert world.deliver(deleted) == 200
    assert world.tier("ann@example.com") == "free"
    assert world.milestones()[2] == ("canceled", world.send_a, world.ann)


def test_reader_found_by_mailer_ref_which_counts_as_the_latest_click(world: World) -> None:
    world.track("click", world.send_a, world.ann, dt.timedelta(hours=1))
    event = subscription_event(
        "evt_ref",
        "customer.subscription.created",
        "trialing",
        customer="cus_9",
        metadata={"mailer_ref": ref(world, world.send_b, world.ann)},
    )
    assert world.deliver(event) == 200
    assert world.tier("ann@example.com") == "trial"
    assert world.milestones() == [("trial_started", world.send_b, world.ann)]


@pytest.mark.parametrize(
    "where",
    [
        {"metadata": {"email": "bob@example.com"}},
        {"metadata": {"customer_email": "BOB@example.com"}},
        {"customer": {"id": "cus_2", "email": "bob@example.com"}},
    ],
    ids=["metadata.email", "metadata.customer_email", "expanded customer"],
)
def test_reader_found_by_address(world: World, where: dict[str, Any]) -> None:
    event = subscription_event("evt_b", "customer.subscription.created", "active", **where)
    assert world.deliver(event) == 200
    assert world.tier("bob@example.com") == "paid"  # straight to paid: a conversion
    assert world.milestones() == [("converted", None, world.bob)]  # nothing to credit


def test_a_forwarded_reference_credits_the_send_but_the_address_that_pays(world: World) -> None:
    event = subscription_event(
        "evt_fwd",
        "customer.subscription.created",
        "trialing",
        customer={"id": "cus_3", "email": "bob@example.com"},
        metadata={"mailer_ref": ref(world, world.send_a, world.ann)},
    )
    assert world.deliver(event) == 200
    assert (world.tier("ann@example.com"), world.tier("bob@example.com")) == ("free", "trial")
    assert world.milestones() == [("trial_started", world.send_a, world.bob)]


def test_unknown_reader_and_forged_reference_are_ignored(world: World) -> None:
    forged = Signer(["someone-elses-secret-key-000000"]).sign(Token(Kind.REF, 1, world.ann))
    click = SIGNER.sign(Token(Kind.CLICK, world.send_a, world.ann))  # not a REF token
    for n, value in enumerate((forged, click)):
        event = subscription_event(
            f"evt_u{n}",
            "customer.subscription.created",
            "trialing",
            customer={"id": "cus_4", "email": "nobody@example.com"},
            metadata={"mailer_ref": value},
        )
        assert world.deliver(event) == 200
    assert world.tier("ann@example.com") == "free"
    assert world.milestones() == []
    assert world.count(BillingCustomerRow) == 0


def test_bad_signatures_are_refused_and_record_nothing(world: World) -> None:
    event = subscription_event(
        "evt_x", "customer.subscription.created", "active", metadata={"email": "ann@example.com"}
    )
    payload, header = signed(event)
    _, wrong = signed(event, secret="whsec_not_ours")
    tampered = payload.replace(b"active", b"trialing")
    assert world.post(payload, wrong) == 400
    assert world.post(tampered, header) == 400
    assert world.post(payload, None) == 400
    assert world.post(payload, "garbage") == 400
    assert world.post(payload, header, secret="") == 400  # no secret configured: refuse all
    assert world.deliver(event, age=301) == 400  # stale: beyond the 300 s tolerance
    assert world.post(b"\xff not json", header) == 400
    assert world.tier("ann@example.com") == "free"
    assert world.count(BillingEventRow) == 0
    assert world.milestones() == []
    assert world.post(payload, header) == 200  # the genuine one, still fresh, goes through
    assert world.tier("ann@example.com") == "paid"


def test_unknown_types_and_status_less_updates_are_ignored(world: World) -> None:
    invoice = {
        "id": "evt_inv",
        "object": "event",
        "type": "invoice.paid",
        "data": {"object": {"id": "in_1", "customer_email": "ann@example.com"}},
    }
    assert world.deliver(invoice) == 200
    card_change = subscription_event(
        "evt_card",
        "customer.subscription.updated",
        "active",
        metadata={"email": "ann@example.com"},
        previous={"default_payment_method": "pm_1"},
    )
    assert world.deliver(card_change) == 200
    assert world.tier("ann@example.com") == "free"
    assert world.count(BillingEventRow) == 0
    assert world.milestones() == []


def test_comped_readers_keep_their_tier(world: World) -> None:
    with db.session(world.engine) as s:
        subscribers.set_tier(s, "ann@example.com", "comped")
    event = subscription_event(
        "evt_c", "customer.subscription.deleted", "canceled", metadata={"email": "ann@example.com"}
    )
    assert world.deliver(event) == 200
    assert world.tier("ann@example.com") == "comped"
    assert world.milestones() == []


def test_attribution_window_clicks_then_human_opens_never_machines(world: World) -> None:
    def credited() -> int | None:
        with db.session(world.engine) as s:
            return attribute(s, world.ann, NOW, DAYS)

    world.track("open", world.send_a, world.ann, dt.timedelta(hours=1), "machine")
    world.track("click", world.send_a, world.ann, dt.timedelta(hours=2), "machine")
    world.track("click", world.send_a, world.ann, dt.timedelta(days=DAYS, seconds=1))  # too old
    world.track("open", world.send_b, world.bob, dt.timedelta(hours=1))  # someone else's
    assert credited() is None
    world.track("open", world.send_b, world.ann, dt.timedelta(days=3))
    assert credited() == world.send_b  # no click in the window: the last human open
    world.track("click", world.send_a, world.ann, dt.timedelta(days=10))
    assert credited() == world.send_a  # a click in the window beats a later open
    world.track("click", world.send_b, world.ann, -dt.timedelta(hours=1))  # after the milestone
    assert credited() == world.send_a


def test_tier_changes_by_hand_are_milestones_too(world: World) -> None:
    world.track("click", world.send_b, world.ann, dt.timedelta(days=1))
    steps = [("trial", "trial_started"), ("paid", "converted"), ("free", "canceled")]
    for tier, _ in steps:
        with db.session(world.engine) as s:
            change_tier(s, "ann@example.com", tier, attribution_days=DAYS, at=NOW)  # type: ignore[arg-type]
    with db.session(world.engine) as s:
        change_tier(s, "ann@example.com", "comped", attribution_days=DAYS, at=NOW)
        change_tier(s, "ann@example.com", "comped", attribution_days=DAYS, at=NOW)
    assert world.milestones() == [(kind, world.send_b, world.ann) for _, kind in steps]
    assert world.tier_events(world.ann) == [
        ("free", "trial"),
        ("trial", "paid"),
        ("paid", "free"),
        ("free", "comped"),
    ]


def test_set_tier_command_records_milestones(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.upgrade(db_url)
    engine = db.connect(db_url)
    try:
        with db.session(engine) as s:
            bob = subscribers.add(s, "bob@example.com").id
            s.add(
                TrackingEventRow(kind="open", send_id=7, subscriber_id=bob, classification="human")
            )
        monkeypatch.chdir(tmp_path)  # no developer's .env
        runner = CliRunner()
        env = {"MAILER_DATABASE_URL": db_url, "MAILER_ATTRIBUTION_DAYS": "2"}
        for tier in ("trial", "paid"):
            result = runner.invoke(
                app, ["subscribers", "set-tier", "bob@example.com", tier], env=env
            )
            assert result.exit_code == 0, result.output
        with db.session(engine) as s:
            found = s.execute(
                select(TrackingEventRow.kind, TrackingEventRow.send_id)
                .where(TrackingEventRow.kind != "open")
                .order_by(TrackingEventRow.id)
            ).all()
        assert [tuple(r) for r in found] == [("trial_started", 7), ("converted", 7)]
    finally:
        engine.dispose()

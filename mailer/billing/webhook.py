"""Stripe webhooks: trial starts, conversions and cancellations change a reader's tier.

``handle_stripe`` verifies the signature with the stripe library, then handles each event id
once: the id is inserted into ``billing_events`` in the same transaction as its effects, so a
replay (Stripe retries, or an attacker resending a captured body) changes nothing. It returns
the HTTP status for the tracker to answer; only a 5xx makes Stripe deliver the event again,
so nothing a signed payload holds (a list, a huge number, a NUL) may raise: anything
malformed is a 400 or ignored.

The reader is found by the ``mailer_ref`` in the subscription's metadata (a ``Kind.REF`` token
the tracker adds to the paywall link on click), else by the customer id remembered from an
earlier event, else by the customer's address (an expanded ``customer.email``, or
``metadata.email`` / ``metadata.customer_email``). When the reference and the address name two
different readers, the email was forwarded: the address is who pays, the reference's send
still earns the credit. Comped readers are left alone: their tier is the author's gift.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import stripe
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import db
from mailer.billing.attribution import change_tier
from mailer.db import dialect
from mailer.db.models import BillingCustomerRow, BillingEventRow, SubscriberRow, utcnow
from mailer.subscribers.model import lookup_key
from mailer.tokens import Kind, Signer
from mailer.vocabulary import Tier

log = logging.getLogger(__name__)

PROVIDER = "stripe"
TOLERANCE = 300  # seconds a signed webhook stays valid: older ones may be replays, and
# a signature dated further ahead was made with a stolen secret to outlive the tolerance
MAX_ID = 255  # the id columns' length
REF_KEY = "mailer_ref"
OK, BAD_REQUEST, SERVER_ERROR = 200, 400, 500

# Subscription statuses and the tier each means; others (past_due, incomplete, paused) are
# a payment in trouble, which Stripe resolves into one of these later.
_TIER_OF_STATUS: dict[str, Tier] = {
    "trialing": "trial",
    "active": "paid",
    "canceled": "free",
    "unpaid": "free",
    "incomplete_expired": "free",
}


@dataclass(frozen=True)
class _Change:
    tier: Tier
    trial_ends_at: dt.datetime | None


def handle_stripe(
    engine: Engine,
    payload: bytes,
    signature: str | None,
    *,
    secret: str,
    signer: Signer,
    attribution_days: int,
    now: dt.datetime | None = None,
) -> int:
    """Handle one Stripe webhook delivery; the HTTP status to answer."""
    if not secret:
        log.warning("stripe webhook refused: MAILER_STRIPE_WEBHOOK_SECRET is not set")
        return BAD_REQUEST
    try:
        stripe.WebhookSignature.verify_header(payload, signature, secret, tolerance=TOLERANCE)
        data = json.loads(payload)
    # ValueError: not UTF-8 or not JSON; RecursionError: JSON nested thousands deep
    except (stripe.SignatureVerificationError, ValueError, RecursionError) as exc:
        log.info("stripe webhook refused: %s", exc)
        return BAD_REQUEST
    signed_at = _timestamp(signature or "")
    if signed_at > time.time() + TOLERANCE:
        log.info("stripe webhook refused: signed %d s in the future", signed_at - time.time())
        return BAD_REQUEST
    if not isinstance(data, dict):
        log.info("stripe webhook refused: the payload is not an object")
        return BAD_REQUEST
    event_id, event_type = _plain(data.get("id")), str(data.get("type")).replace("\0", "")
    body = data.get("data")
    if event_id is None or not isinstance(body, dict):
        log.info("stripe webhook refused: no event id or data")
        return BAD_REQUEST
    subscription, previous = body.get("object"), body.get("previous_attributes")
    subscription = subscription if isinstance(subscription, dict) else {}
    change = _change(event_type, subscription, previous if isinstance(previous, dict) else {})
    if change is None:
        log.debug("stripe event %s (%s) ignored", event_id, event_type)
        return OK
    try:
        with db.session(engine) as session:
            if not _first_time(session, event_id, event_type):
                log.info("stripe event %s already handled", event_id)
                return OK
            _apply(session, subscription, change, signer, attribution_days, now or utcnow())
    except SQLAlchemyError:
        log.exception("stripe event %s not recorded; Stripe will retry", event_id)
        return SERVER_ERROR
    return OK


def _timestamp(signature: str) -> int:
    """The ``t=`` of a header that verified, read as the stripe library reads it."""
    for item in signature.split(","):
        parts = item.split("=", 2)
        if parts[0] == "t":
            return int(parts[1])  # it verified: it is a number
    return 0


def _plain(value: Any) -> str | None:
    """``value`` if it is a string that fits an id column (and PostgreSQL, which takes no NUL)."""
    if isinstance(value, str) and value and len(value) <= MAX_ID and "\0" not in value:
        return value
    return None


def _change(
    event_type: str, subscription: Mapping[str, Any], previous: Mapping[str, Any]
) -> _Change | None:
    """The tier an event moves its reader to, or None when it changes nothing we track."""
    status = subscription.get("status")
    if event_type == "customer.subscription.deleted":
        return _Change("free", None)
    # An update that leaves the status alone (a card, a plan, metadata) is not a milestone,
    # nor a reason to undo a tier the author set by hand since.
    if event_type == "customer.subscription.updated" and "status" not in previous:
        return None
    if event_type not in ("customer.subscription.created", "customer.subscription.updated"):
        return None
    tier = _TIER_OF_STATUS.get(str(status))
    if tier is None:
        return None
    trial_end = subscription.get("trial_end")
    ends = None
    if tier == "trial" and isinstance(trial_end, int):
        try:
            ends = dt.datetime.fromtimestamp(trial_end, dt.UTC)
        except (OverflowError, OSError, ValueError):  # no real date: the trial's end unknown
            ends = None
    return _Change(tier, ends)


def _first_time(session: Session, event_id: str, event_type: str) -> bool:
    """Insert the event id; False if it was there already (a replay)."""
    inserted = session.execute(
        dialect.insert(session, BillingEventRow)
        .values(provider=PROVIDER, event_id=event_id, type=event_type[:100], received_at=utcnow())
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(BillingEventRow.event_id)
    ).first()
    return inserted is not None


def _apply(
    session: Session,
    subscription: Mapping[str, Any],
    change: _Change,
    signer: Signer,
    attribution_days: int,
    at: dt.datetime,
) -> None:
    customer = subscription.get("customer")
    customer_id = _plain(customer.get("id") if isinstance(customer, dict) else customer)
    ref_reader, ref_send = _reference(subscription, signer)
    referred = None if ref_reader is None else session.get(SubscriberRow, ref_reader)
    by_address = _by_address(session, subscription)
    if referred is not None and by_address is not None:
        # A forwarded email carries its first reader's reference: the address that pays wins
        # (and the send still gets the credit).
        referred = by_address
    reader = (
        referred
        or (_remembered(session, customer_id) if customer_id is not None else None)
        or by_address
    )
    if reader is None:
        log.info("stripe subscription %s names no known reader; ignored", subscription.get("id"))
        return
    if customer_id is not None:
        _remember(session, customer_id, reader.id)
    if reader.tier == "comped":
        log.info("reader %s is comped; their tier is left to the author", reader.id)
        return
    change_tier(
        session,
        reader.email_key,
        change.tier,
        attribution_days=attribution_days,
        trial_ends_at=change.trial_ends_at,
        at=at,
        ref_send_id=ref_send,
    )


def _reference(subscription: Mapping[str, Any], signer: Signer) -> tuple[int | None, int | None]:
    """(reader, send) named by a valid ``mailer_ref`` in the metadata, else (None, None)."""
    metadata = subscription.get("metadata")
    ref = metadata.get(REF_KEY) if isinstance(metadata, dict) else None
    token = signer.verify(ref) if isinstance(ref, str) else None
    if token is None or token.kind != Kind.REF:
        return None, None
    return token.subscriber_id, token.send_id


def _remembered(session: Session, customer_id: str) -> SubscriberRow | None:
    return session.scalar(
        select(SubscriberRow)
        .join(BillingCustomerRow, BillingCustomerRow.subscriber_id == SubscriberRow.id)
        .where(
            BillingCustomerRow.provider == PROVIDER, BillingCustomerRow.customer_id == customer_id
        )
    )


def _by_address(session: Session, subscription: Mapping[str, Any]) -> SubscriberRow | None:
    """The reader whose address the subscription carries, if any."""
    customer = subscription.get("customer")
    metadata = subscription.get("metadata")
    candidates = (
        customer.get("email") if isinstance(customer, dict) else None,
        metadata.get("email") if isinstance(metadata, dict) else None,
        metadata.get("customer_email") if isinstance(metadata, dict) else None,
        subscription.get("customer_email"),
    )
    for address in map(_plain, candidates):
        if address is not None and address.strip():
            return session.scalar(
                select(SubscriberRow).where(SubscriberRow.email_key == lookup_key(address))
            )
    return None


def _remember(session: Session, customer_id: str, subscriber_id: int) -> None:
    session.execute(
        dialect.insert(session, BillingCustomerRow)
        .values(provider=PROVIDER, customer_id=customer_id, subscriber_id=subscriber_id)
        .on_conflict_do_update(
            index_elements=["provider", "customer_id"], set_={"subscriber_id": subscriber_id}
        )
    )

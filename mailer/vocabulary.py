"""The words every stage shares, each defined once: tiers, statuses, variants, ledger states.

Each is a ``Literal`` for the type checker and, where code lists or checks its values, a tuple
of them in the same order (``get_args``). The ORM's CHECK constraints, the CLI's choices, the
parsers and the pure stages all import them from here; this module imports nothing of the
library (nor SQLAlchemy), so any module can.
"""

from __future__ import annotations

from typing import Literal, get_args

# A reader's tier: which variant they get, and what billing milestones move between.
Tier = Literal["free", "trial", "paid", "comped"]
TIERS: tuple[Tier, ...] = get_args(Tier)

# Only active readers are mailed; the others are never made active again by an import.
SubscriberStatus = Literal["active", "unsubscribed", "bounced", "complained"]
SUBSCRIBER_STATUSES: tuple[SubscriberStatus, ...] = get_args(SubscriberStatus)

# Who a post is for (front matter ``audience``): a paid post has a paywall marker.
Audience = Literal["everyone", "paid"]
AUDIENCES: tuple[Audience, ...] = get_args(Audience)

# The two renderings of a post: free readers' (cut at the paywall) and paid readers'.
Variant = Literal["free", "paid"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)

# A send's state machine (``mailer.sends``).
SendStatus = Literal["scheduled", "sending", "paused", "done", "cancelled", "failed", "missed"]
SEND_STATUSES: tuple[SendStatus, ...] = get_args(SendStatus)

# A ledger row's state (``mailer.delivery.ledger``): *sent* is the server's 250, not delivery.
DeliveryState = Literal["queued", "sending", "sent", "deferred", "failed", "unknown", "skipped"]
DELIVERY_STATES: tuple[DeliveryState, ...] = get_args(DeliveryState)

# What the tracker records: the reader's own events, then billing milestones.
TrackingKind = Literal["open", "click", "unsubscribe", "trial_started", "converted", "canceled"]
TRACKING_KINDS: tuple[TrackingKind, ...] = get_args(TrackingKind)

# Who fetched a tracking URL: a person, or a privacy proxy or scanner.
Classification = Literal["human", "machine"]
CLASSIFICATIONS: tuple[Classification, ...] = get_args(Classification)

# What an inbound message (to the VERP path, the unsubscribe or the feedback address) was.
InboundOutcome = Literal["hard", "soft", "complaint", "unsubscribe", "auto_reply", "unmatched"]
INBOUND_OUTCOMES: tuple[InboundOutcome, ...] = get_args(InboundOutcome)

BounceKind = Literal["hard", "soft", "complaint"]
BOUNCE_KINDS: tuple[BounceKind, ...] = get_args(BounceKind)

# The subscriber CSV: what ``subscribers export`` writes, in order, and ``import`` reads back.
SUBSCRIBER_COLUMNS = (
    "email",
    "name",
    "tier",
    "tags",
    "trial_ends_at",
    "status",
    "created_at",
    "attributes",
)

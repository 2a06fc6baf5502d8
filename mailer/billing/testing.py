"""Stripe's webhook events as Stripe sends them, signed by the stripe library's own code: what
the tests and the demo (``examples/demo_track.py``) post to ``/webhooks/stripe``.

    event = subscription_event("evt_1", "customer.subscription.created",
                               {"id": "sub_1", "customer": "cus_1", "status": "trialing"})
    payload, header = signed(event, secret)      # the body, and its Stripe-Signature header
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import stripe


def subscription_event(
    event_id: str,
    event_type: str,
    subscription: Mapping[str, Any],
    *,
    previous: Mapping[str, Any] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """An event about a subscription: ``subscription`` holds the object's fields (``id``,
    ``customer``, ``status``, ``metadata``, ``trial_end``...), ``previous`` the
    ``previous_attributes`` of an update; ``created`` is now unless given."""
    data: dict[str, Any] = {"object": {"object": "subscription", **subscription}}
    if previous is not None:
        data["previous_attributes"] = dict(previous)
    return {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": int(time.time()) if created is None else created,
        "data": data,
    }


def signature(payload: str | bytes, secret: str, *, at: int | None = None) -> str:
    """The ``Stripe-Signature`` header for ``payload`` as it is, signed at ``at`` (now)."""
    timestamp = int(time.time()) if at is None else at
    text = payload.decode() if isinstance(payload, bytes) else payload
    mac = stripe.WebhookSignature._compute_signature(f"{timestamp}.{text}", secret)
    return f"t={timestamp},v1={mac}"


def signed(event: Mapping[str, Any], secret: str, *, at: int | None = None) -> tuple[bytes, str]:
    """``event`` as a JSON body, and its ``Stripe-Signature`` header."""
    payload = json.dumps(event)
    return payload.encode(), signature(payload, secret, at=at)

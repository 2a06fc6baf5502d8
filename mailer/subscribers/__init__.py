"""Subscribers: import, export, tiers and status.

Values come out as frozen dataclasses (``Subscriber``, ``SubscriberEvent``, ``ImportResult``),
never ORM rows. Every tier and status change, creation included, is recorded as an event.
Nothing here reads the environment.
"""

from mailer.subscribers.export import export_csv
from mailer.subscribers.importer import ImportResult, default_rejects_path, import_csv
from mailer.subscribers.manage import (
    add,
    erase,
    get,
    history,
    is_erased,
    set_status,
    set_tier,
    unsubscribe,
    unsubscribe_by_id,
)
from mailer.subscribers.model import (
    Address,
    Subscriber,
    SubscriberEvent,
    email_hash,
    normalise_email,
    parse_tier,
    parse_when,
)

__all__ = [
    "Address",
    "ImportResult",
    "Subscriber",
    "SubscriberEvent",
    "add",
    "default_rejects_path",
    "email_hash",
    "erase",
    "export_csv",
    "get",
    "history",
    "import_csv",
    "is_erased",
    "normalise_email",
    "parse_tier",
    "parse_when",
    "set_status",
    "set_tier",
    "unsubscribe",
    "unsubscribe_by_id",
]

"""``export_csv``: readers as CSV, streamed, in the columns ``import_csv`` reads back."""

from __future__ import annotations

import datetime as dt
import json
from typing import TextIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import segments
from mailer.db.models import SubscriberRow, SubscriberTagRow
from mailer.subscribers.csvfile import SafeWriter
from mailer.vocabulary import SUBSCRIBER_COLUMNS

BATCH = 2000  # rows fetched at a time from a server-side cursor


def export_csv(session: Session, out: TextIO, *, segment: str | None = None) -> int:
    """Write every reader (any status), or those in ``segment``, to ``out``; how many."""
    tags = (
        select(func.aggregate_strings(SubscriberTagRow.tag, ";"))
        .where(SubscriberTagRow.subscriber_id == SubscriberRow.id)
        .scalar_subquery()
    )
    query = select(
        SubscriberRow.email,
        SubscriberRow.name,
        SubscriberRow.tier,
        tags,
        SubscriberRow.trial_ends_at,
        SubscriberRow.status,
        SubscriberRow.created_at,
        SubscriberRow.attributes,
    ).order_by(SubscriberRow.id)
    if segment is not None:
        query = query.where(segments.where(session, segment))
    writer = SafeWriter(out)  # cells a spreadsheet would run as formulas get a ' before them
    writer.writerow(SUBSCRIBER_COLUMNS)
    count = 0
    for email, name, tier, tag_list, trial, status, created, attributes in session.execute(
        query, execution_options={"yield_per": BATCH}
    ):
        writer.writerow(
            [
                email,
                name or "",
                tier,
                ";".join(sorted(tag_list.split(";"))) if tag_list else "",
                _iso(trial),
                status,
                _iso(created),
                json.dumps(attributes, ensure_ascii=False, sort_keys=True),
            ]
        )
        count += 1
    return count


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat() if value else ""

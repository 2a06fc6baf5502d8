"""Saved segments: named expressions, checked when saved and resolved each time they are used."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer.db.models import SegmentRow
from mailer.errors import InputError, NotFoundError
from mailer.segments.compiler import Compiler
from mailer.segments.parser import parse
from mailer.segments.syntax import NAME

_NAME_MAX = 100  # SegmentRow.name


@dataclass(frozen=True)
class SavedSegment:
    name: str
    expression: str
    updated_at: dt.datetime


def save(session: Session, name: str, expr: str) -> SavedSegment:
    """Save ``expr`` as ``name``, or replace the one saved under it.

    Refused (nothing is written) when the name is malformed, or the expression does not parse,
    refers to an unknown saved segment, or refers back to ``name`` itself, directly or not.
    """
    if not NAME.fullmatch(name) or len(name) > _NAME_MAX:
        raise InputError(
            f"segment name {name!r}: use a-z, 0-9, _ and -, starting with a letter or digit,"
            f" at most {_NAME_MAX} characters"
        )
    # Parsed as given, so error columns match what the user typed.
    Compiler(session, {name: expr}).compile(parse(expr), (name,))
    row = session.scalars(select(SegmentRow).where(SegmentRow.name == name)).one_or_none()
    if row is None:
        row = SegmentRow(name=name)
        session.add(row)
    row.expression = expr.strip()
    session.flush()
    return _to_saved(row)


def list_saved(session: Session) -> list[SavedSegment]:
    """Every saved segment, by name."""
    return [_to_saved(row) for row in session.scalars(select(SegmentRow).order_by(SegmentRow.name))]


def get_saved(session: Session, name: str) -> SavedSegment:
    row = session.scalars(select(SegmentRow).where(SegmentRow.name == name)).one_or_none()
    if row is None:
        raise NotFoundError(f"no saved segment named {name!r}; see `mailer segments list`")
    return _to_saved(row)


def _to_saved(row: SegmentRow) -> SavedSegment:
    return SavedSegment(name=row.name, expression=row.expression, updated_at=row.updated_at)

"""A segment's tree as one SQLAlchemy condition on subscribers, saved segments expanded."""

from __future__ import annotations

import datetime as dt
from typing import assert_never

from sqlalchemy import ColumnElement, Select, and_, false, func, not_, or_, select, true
from sqlalchemy.orm import Session

from mailer.db import dialect
from mailer.db.models import SegmentRow, SubscriberRow, SubscriberTagRow
from mailer.errors import SegmentError
from mailer.segments.parser import parse
from mailer.segments.syntax import (
    MAX_REF_DEPTH,
    And,
    DomainIn,
    Everyone,
    Joined,
    Not,
    Or,
    SavedRef,
    Segment,
    Size,
    TagIn,
    TierIn,
    error,
)


def where(session: Session, expr: str) -> ColumnElement[bool]:
    """``expr`` as one condition on ``SubscriberRow``, saved segments resolved.

    It does not filter on status: ``select_active`` and ``count`` add that.
    """
    return Compiler(session).compile(parse(expr))


def select_active(session: Session, expr: str) -> Select[int]:
    """The ids of the active subscribers in ``expr``."""
    return select(SubscriberRow.id).where(SubscriberRow.status == "active", where(session, expr))


def count(session: Session, expr: str) -> int:
    """How many active subscribers ``expr`` selects."""
    query = (
        select(func.count())
        .select_from(SubscriberRow)
        .where(SubscriberRow.status == "active", where(session, expr))
    )
    return session.execute(query).scalar_one()


def sample(session: Session, expr: str, limit: int = 10) -> list[str]:
    """The addresses of up to ``limit`` active subscribers in ``expr``, oldest first."""
    query = (
        select(SubscriberRow.email)
        .where(SubscriberRow.status == "active", where(session, expr))
        .order_by(SubscriberRow.id)
        .limit(limit)
    )
    return list(session.scalars(query))


class Compiler:
    def __init__(self, session: Session, pending: dict[str, str] | None = None) -> None:
        self.session = session
        self.pending = pending or {}  # a definition being saved, taking the stored one's place
        self.saved: dict[str, str] | None = None  # loaded at the first @name
        self.size = Size()  # with saved segments expanded

    def compile(
        self, node: Segment, chain: tuple[str, ...] = (), at: int | None = None
    ) -> ColumnElement[bool]:
        """``chain``: the saved segments being expanded; ``at``: column of the outermost @name."""
        match node:
            case Everyone():
                self._count(0, at)
                return true()
            case TierIn(tiers):
                self._count(len(tiers), at)
                return SubscriberRow.tier.in_(tiers)
            case TagIn(tags):
                self._count(len(tags), at)
                return dialect.has_any(
                    self.session,
                    SubscriberRow.id,
                    SubscriberTagRow.subscriber_id,
                    SubscriberTagRow.tag.in_(tags),
                )
            case DomainIn(domains):
                self._count(len(domains), at)
                return SubscriberRow.domain.in_(domains)
            case Joined():
                self._count(1, at)
                return _joined_clause(node)
            case SavedRef():
                return self._saved(node, chain, node.column if at is None else at)
            case Not(operand):
                return not_(self.compile(operand, chain, at))
            case And(operands):
                return and_(*(self.compile(o, chain, at) for o in operands))
            case Or(operands):
                return or_(*(self.compile(o, chain, at) for o in operands))
            case _:
                assert_never(node)

    def _count(self, values: int, at: int | None) -> None:
        # Without a saved segment the parser counted the same: only an expansion can go over.
        self.size.add(values, at or 1, " with saved segments expanded")

    def _saved(self, ref: SavedRef, chain: tuple[str, ...], at: int) -> ColumnElement[bool]:
        if ref.name in chain:
            cycle = " -> ".join(f"@{n}" for n in (*chain[chain.index(ref.name) :], ref.name))
            raise error(f"cycle in saved segments: {cycle}", at)
        if len(chain) >= MAX_REF_DEPTH:
            raise error(f"saved segments nested more than {MAX_REF_DEPTH} deep", at)
        if self.saved is None:
            rows = self.session.execute(select(SegmentRow.name, SegmentRow.expression))
            self.saved = {name: expression for name, expression in rows}
        expression = self.pending.get(ref.name, self.saved.get(ref.name))
        if expression is None:
            raise error(f"unknown saved segment '@{ref.name}'", at, "see `mailer segments list`")
        try:
            node = parse(expression)
        except SegmentError as exc:  # stored by hand, or by a version with another grammar
            raise error(f"saved segment '@{ref.name}' is invalid: {exc}", at) from None
        return self.compile(node, (*chain, ref.name), at)


def _joined_clause(node: Joined) -> ColumnElement[bool]:
    # On calendar days: ">D" is "on or after D+1", "<=D" is "before D+1".
    try:
        day = node.date if node.op in (">=", "<") else node.date + dt.timedelta(days=1)
    except OverflowError:  # D is the last representable day: nobody joined after it
        return false() if node.op == ">" else true()
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    return (
        SubscriberRow.created_at >= start if node.op[0] == ">" else SubscriberRow.created_at < start
    )

"""The segment language's tree, the bounds on its size, and how its errors read."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from mailer.errors import SegmentError
from mailer.vocabulary import Tier

Comparison = Literal[">", ">=", "<", "<="]

# Bounds that keep the parser's and SQLAlchemy's recursion far from Python's limit, and the
# SQL far from SQLite's (1,000 terms deep, which ~1,000 ORs reach) and from minutes of work.
MAX_DEPTH = 20  # nested parentheses and NOTs in one expression
MAX_REF_DEPTH = 10  # saved segments referring to saved segments
MAX_LENGTH = 10_000  # characters of one expression
MAX_TERMS = 100  # filters, `all` and @names, saved segments counted where they are used
MAX_VALUES = 1_000  # comma-separated values of all the filters, counted likewise

NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # a saved segment's name, as @name refers to it
EXAMPLE = {
    "tier": "tier:free",
    "tag": "tag:politics",
    "domain": "domain:gmail.com",
    "joined": "joined:>2026-01-01",
}
EXAMPLES = f"filters look like {', '.join(EXAMPLE.values())}"


# The AST. Equality ignores source positions, so tests can compare trees.


@dataclass(frozen=True)
class Everyone:
    """``all``: every subscriber."""


@dataclass(frozen=True)
class TierIn:
    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class TagIn:
    tags: tuple[str, ...]


@dataclass(frozen=True)
class DomainIn:
    domains: tuple[str, ...]  # lower-cased, like SubscriberRow.domain


@dataclass(frozen=True)
class Joined:
    op: Comparison
    date: dt.date


@dataclass(frozen=True)
class SavedRef:
    name: str
    column: int = field(default=1, compare=False)  # where unknown names and cycles are reported


@dataclass(frozen=True)
class Not:
    operand: Segment


@dataclass(frozen=True)
class And:
    operands: tuple[Segment, ...]  # two or more


@dataclass(frozen=True)
class Or:
    operands: tuple[Segment, ...]  # two or more


Segment: TypeAlias = Everyone | TierIn | TagIn | DomainIn | Joined | SavedRef | Not | And | Or


def error(what: str, column: int, hint: str | None = None) -> SegmentError:
    suffix = f" ({hint})" if hint else ""
    return SegmentError(f"segment: {what} at column {column}{suffix}", column)


class Size:
    """Counts the terms and values of an expression as it is read, within the bounds."""

    def __init__(self) -> None:
        self.terms = 0
        self.values = 0

    def add(self, values: int, column: int, where: str = "") -> None:
        self.terms += 1
        self.values += values
        if self.terms > MAX_TERMS:
            raise error(f"more than {MAX_TERMS} terms{where}", column, "save fewer, broader ones")
        if self.values > MAX_VALUES:
            raise error(f"more than {MAX_VALUES:,} values{where}", column)

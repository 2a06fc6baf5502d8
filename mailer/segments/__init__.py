"""Segments: a small expression language over subscribers, compiled to one SQL condition.

``tier:paid,comped AND NOT (tag:politics OR domain:example.com) AND joined:>=2026-01-01``;
``all``; ``@name`` for a saved segment. ``AND``, ``OR``, ``NOT`` and ``all`` are
case-insensitive, and bind as usual: NOT, then AND, then OR. A comma lists alternatives
(any of). Tier names, fields and domains are case-insensitive; tags are matched exactly, and
a tag with spaces or commas is written in double quotes: ``tag:"local news"``.

``joined`` compares the UTC calendar day of ``created_at``: ``joined:>2026-01-01`` starts
with readers who joined on 2 January, and ``joined:<=D`` is exactly ``NOT joined:>D``.

Text is tokenized keeping 1-based columns (``lexer``), parsed by recursive descent
(``parser``) into the frozen dataclasses of ``syntax``, and compiled into one SQLAlchemy
boolean expression (``compiler``); nothing is filtered in Python. ``saved`` keeps named
expressions. Every error is a ``SegmentError`` that says what is wrong and at which column.
"""

from mailer.segments.compiler import count, sample, select_active, where
from mailer.segments.parser import parse
from mailer.segments.saved import SavedSegment, get_saved, list_saved, save
from mailer.segments.syntax import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_REF_DEPTH,
    MAX_TERMS,
    MAX_VALUES,
    And,
    DomainIn,
    Everyone,
    Joined,
    Not,
    Or,
    SavedRef,
    Segment,
    TagIn,
    TierIn,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_REF_DEPTH",
    "MAX_TERMS",
    "MAX_VALUES",
    "And",
    "DomainIn",
    "Everyone",
    "Joined",
    "Not",
    "Or",
    "SavedRef",
    "SavedSegment",
    "Segment",
    "TagIn",
    "TierIn",
    "count",
    "get_saved",
    "list_saved",
    "parse",
    "sample",
    "save",
    "select_active",
    "where",
]

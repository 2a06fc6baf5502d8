"""The segment language's tokens, each with the 1-based column it starts at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from mailer.segments.syntax import EXAMPLES, error

TokenKind = Literal["(", ")", "and", "or", "not", "all", "ref", "filter", "word", "end"]
_KEYWORDS: dict[str, TokenKind] = {"and": "and", "or": "or", "not": "not", "all": "all"}


@dataclass(frozen=True)
class Item:
    """One value of a filter's comma-separated list."""

    text: str
    column: int


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    text: str  # as written, for messages
    column: int
    items: tuple[Item, ...] = ()  # a filter's values


def tokenize(text: str) -> list[Token]:
    for i, ch in enumerate(text):
        if not ch.isprintable() and not ch.isspace():
            raise error(f"unprintable character {ch!r}", i + 1)
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "()":
            tokens.append(Token(cast(TokenKind, ch), ch, i + 1))
            i += 1
            continue
        start = i
        while i < n and not _ends_word(text[i]) and text[i] not in ':",':
            i += 1
        if i == start:
            raise error(f"unexpected {ch!r}", i + 1, EXAMPLES)
        word = text[start:i]
        if i < n and text[i] == ":":
            items, i = _items(text, i + 1)
            tokens.append(Token("filter", text[start:i], start + 1, items))
        elif word.startswith("@"):
            tokens.append(Token("ref", word, start + 1))
        else:
            tokens.append(Token(_KEYWORDS.get(word.lower(), "word"), word, start + 1))
    tokens.append(Token("end", "", n + 1))
    return tokens


def _ends_word(ch: str) -> bool:
    return ch.isspace() or ch in "()"


def _items(text: str, i: int) -> tuple[tuple[Item, ...], int]:
    """The comma-separated values starting at ``text[i]``; empty ones are kept for the parser."""
    n = len(text)
    items: list[Item] = []
    while True:
        start = i
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise error("unclosed quote", i + 1)
            items.append(Item(text[i + 1 : end], i + 1))
            i = end + 1
        else:
            while i < n and not _ends_word(text[i]) and text[i] not in ',"':
                i += 1
            items.append(Item(text[start:i], start + 1))
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and not _ends_word(text[i]):
            raise error(f"unexpected {text[i]!r}", i + 1, "separate values with commas")
        return tuple(items), i

"""Segment text into its tree, by recursive descent, within the bounds of ``syntax``."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from typing import cast

from mailer.segments.lexer import Item, Token, TokenKind, tokenize
from mailer.segments.syntax import (
    EXAMPLE,
    EXAMPLES,
    MAX_DEPTH,
    MAX_LENGTH,
    NAME,
    And,
    Comparison,
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
from mailer.vocabulary import TIERS, Tier

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_COMPARISON = re.compile(r"(>=|<=|>|<)")


# expression := or; or := and (OR and)*; and := not (AND not)*; not := NOT not | atom;
# atom := '(' or ')' | all | @name | field:values


def parse(expr: str) -> Segment:
    """The AST of ``expr``; raise ``SegmentError`` pointing at the column of the first problem."""
    if len(expr) > MAX_LENGTH:
        raise error(f"longer than {MAX_LENGTH:,} characters", MAX_LENGTH + 1)
    return _Parser(expr).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.pos = 0
        self.depth = 0
        self.size = Size()

    def parse(self) -> Segment:
        if self._peek().kind == "end":
            raise error("empty expression", 1, "`all` selects everyone")
        node = self._or()
        token = self._peek()
        if token.kind == ")":
            raise error("unbalanced ')'", token.column, "no '(' before it")
        if token.kind != "end":
            raise error(
                f"expected AND, OR or the end of the expression, found {token.text!r}",
                token.column,
            )
        return node

    def _peek(self) -> Token:
        return self.tokens[self.pos]

    def _next(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _chain(
        self,
        keyword: TokenKind,
        node: Callable[[tuple[Segment, ...]], Segment],
        operand: Callable[[], Segment],
    ) -> Segment:
        operands = [operand()]
        while self._peek().kind == keyword:
            self._next()
            operands.append(operand())
        return operands[0] if len(operands) == 1 else node(tuple(operands))

    def _or(self) -> Segment:
        return self._chain("or", Or, self._and)

    def _and(self) -> Segment:
        return self._chain("and", And, self._not)

    def _not(self) -> Segment:
        if self._peek().kind != "not":
            return self._atom()
        self._descend(self._next())
        operand = self._not()
        self.depth -= 1
        return Not(operand)

    def _descend(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise error(f"more than {MAX_DEPTH} nested parentheses and NOTs", token.column)

    def _atom(self) -> Segment:
        token = self._next()
        if token.kind in ("all", "ref", "filter"):
            self.size.add(len(token.items), token.column)
        match token.kind:
            case "(":
                self._descend(token)
                node = self._or()
                self.depth -= 1
                close = self._next()
                if close.kind == "end":
                    raise error("unclosed '('", token.column, "no ')' after it")
                if close.kind != ")":
                    raise error(
                        f"expected AND, OR or ')', found {close.text!r}",
                        close.column,
                    )
                return node
            case "all":
                return Everyone()
            case "ref":
                name = token.text[1:]
                if not NAME.fullmatch(name):
                    raise error(
                        f"bad segment name {token.text!r}",
                        token.column,
                        "names use a-z, 0-9, _ and -",
                    )
                return SavedRef(name, token.column)
            case "filter":
                return _filter(token)
            case "word":
                raise error(f"unknown word {token.text!r}", token.column, EXAMPLES)
            case "end":
                raise error("expression ends too early", token.column, EXAMPLES)
            case _:
                raise error(
                    f"expected a filter, all, @name, NOT or '(', found {token.text!r}",
                    token.column,
                )


def _filter(token: Token) -> Segment:
    written = token.text.partition(":")[0]
    name = written.lower()
    if name not in _VALUES:
        raise error(f"unknown field {written!r}", token.column, f"fields: {', '.join(_VALUES)}")
    for item in token.items:
        if not item.text.strip():
            raise error(f"empty value for {name}", item.column, f"e.g. {EXAMPLE[name]}")
    return _VALUES[name](token.items)


def _tier(items: Sequence[Item]) -> Segment:
    for item in items:
        if item.text.lower() not in TIERS:
            raise error(f"unknown tier {item.text!r}", item.column, f"tiers: {', '.join(TIERS)}")
    return TierIn(tuple(cast(Tier, item.text.lower()) for item in items))


def _tag(items: Sequence[Item]) -> Segment:
    # Spaces inside a tag are collapsed as on import, so "local  news" finds "local news".
    return TagIn(tuple(" ".join(item.text.split()) for item in items))


def _domain(items: Sequence[Item]) -> Segment:
    for item in items:
        if "@" in item.text:
            raise error(f"bad domain {item.text!r}", item.column, "a domain such as gmail.com")
    return DomainIn(tuple(item.text.lower() for item in items))


def _joined(items: Sequence[Item]) -> Segment:
    if len(items) > 1:
        raise error("joined takes one date", items[1].column, "combine dates with OR")
    item = items[0]
    comparison = _COMPARISON.match(item.text)
    if comparison is None:
        raise error(
            f"joined needs >, >=, < or <= before the date, found {item.text!r}",
            item.column,
            f"e.g. {EXAMPLE['joined']}",
        )
    op = cast(Comparison, comparison.group())
    value, column = item.text[comparison.end() :], item.column + comparison.end()
    try:
        if not _DATE.fullmatch(value):
            raise ValueError(value)
        date = dt.date.fromisoformat(value)
    except ValueError:
        raise error(f"bad date {value!r}", column, "use YYYY-MM-DD") from None
    return Joined(op, date)


_VALUES: dict[str, Callable[[Sequence[Item]], Segment]] = {
    "tier": _tier,
    "tag": _tag,
    "domain": _domain,
    "joined": _joined,
}

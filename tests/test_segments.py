"""Segments: the parser and its errors, the SQL it compiles to on SQLite and PostgreSQL, saved
segments, the CLI, and two properties (hypothesis): any text parses or raises SegmentError, and
SQL selects exactly what a plain Python predicate over the same readers selects.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from mailer import db, segments
from mailer.cli import app
from mailer.db.models import SubscriberRow, SubscriberTagRow
from mailer.errors import InputError, NotFoundError, SegmentError
from mailer.segments import (
    And,
    DomainIn,
    Everyone,
    Joined,
    Not,
    Or,
    SavedRef,
    SavedSegment,
    TagIn,
    TierIn,
    parse,
)
from mailer.vocabulary import SUBSCRIBER_STATUSES, TIERS

UTC = dt.UTC
NODES = (Everyone, TierIn, TagIn, DomainIn, Joined, SavedRef, Not, And, Or)


@dataclass(frozen=True)
class Reader:
    tier: str = "free"
    status: str = "active"
    domain: str = "example.com"
    tags: frozenset[str] = field(default_factory=frozenset)
    joined: dt.datetime = dt.datetime(2026, 1, 1, 12, tzinfo=UTC)


def add(session: Session, readers: Iterable[Reader]) -> None:
    """Insert readers with ids 1, 2, ... in order: the import module is not needed."""
    subscribers, tags = [], []
    for i, r in enumerate(readers, start=1):
        email = f"reader{i}@{r.domain}"
        subscribers.append(
            {
                "id": i,
                "email": email,
                "email_key": email,
                "domain": r.domain,
                "tier": r.tier,
                "status": r.status,
                "created_at": r.joined,
            }
        )
        tags += [{"subscriber_id": i, "tag": tag} for tag in r.tags]
    if subscribers:
        session.execute(insert(SubscriberRow), subscribers)
    if tags:
        session.execute(insert(SubscriberTagRow), tags)


def selected(session: Session, expr: str) -> set[int]:
    """The ids ``select_active`` gives, checked against ``count``."""
    ids = set(session.scalars(segments.select_active(session, expr)))
    assert segments.count(session, expr) == len(ids), expr
    return ids


# The parser


@pytest.mark.parametrize(
    ("expr", "tree"),
    [
        ("all", Everyone()),
        ("ALL", Everyone()),
        ("tier:free", TierIn(("free",))),
        ("Tier:PAID,comped", TierIn(("paid", "comped"))),
        ("tag:politics,sport", TagIn(("politics", "sport"))),
        ('tag:"local  news",x', TagIn(("local news", "x"))),
        ("tag:Politics", TagIn(("Politics",))),  # tags are exact
        ("domain:Gmail.COM,yahoo.com", DomainIn(("gmail.com", "yahoo.com"))),
        ("joined:>2026-01-01", Joined(">", dt.date(2026, 1, 1))),
        ("joined:>=2026-01-01", Joined(">=", dt.date(2026, 1, 1))),
        ("joined:<2026-01-01", Joined("<", dt.date(2026, 1, 1))),
        ("joined:<=2026-01-01", Joined("<=", dt.date(2026, 1, 1))),
        ("@vip-2_x", SavedRef("vip-2_x")),
        ("  (( tier:free ))  ", TierIn(("free",))),
        # NOT binds tighter than AND, AND tighter than OR.
        (
            "tier:free AND tag:a OR tag:b",
            Or((And((TierIn(("free",)), TagIn(("a",)))), TagIn(("b",)))),
        ),
        (
            "tier:free OR tag:a AND tag:b",
            Or((TierIn(("free",)), And((TagIn(("a",)), TagIn(("b",)))))),
        ),
        ("NOT tier:free AND tag:a", And((Not(TierIn(("free",))), TagIn(("a",))))),
        ("not (tier:free or tag:a)", Not(Or((TierIn(("free",)), TagIn(("a",)))))),
        ("NOT NOT all", Not(Not(Everyone()))),
        (
            "(tier:free OR tag:a) and tag:b",
            And((Or((TierIn(("free",)), TagIn(("a",)))), TagIn(("b",)))),
        ),
        ("tag:a OR tag:b oR tag:c", Or((TagIn(("a",)), TagIn(("b",)), TagIn(("c",))))),
        ("tag:a aNd tag:b AND tag:c", And((TagIn(("a",)), TagIn(("b",)), TagIn(("c",))))),
        ("tag:and OR tag:not", Or((TagIn(("and",)), TagIn(("not",))))),
    ],
)
def test_parse(expr: str, tree: segments.Segment) -> None:
    assert parse(expr) == tree


def test_tier_error_message_is_exactly_as_documented() -> None:
    with pytest.raises(SegmentError) as caught:
        parse("tier:gold")
    assert str(caught.value) == (
        "segment: unknown tier 'gold' at column 6 (tiers: free, trial, paid, comped)"
    )
    assert caught.value.column == 6


@pytest.mark.parametrize(
    ("expr", "message", "column"),
    [
        ("tiers:free", "unknown field 'tiers'", 1),
        ("tier:free AND tier:paid,gold", "unknown tier 'gold'", 25),
        ("joined:>2026-02-30", "bad date '2026-02-30'", 9),
        ("joined:>=20260101", "bad date '20260101'", 10),
        ("joined:>", "bad date ''", 9),
        ("joined:2026-01-01", "joined needs >, >=, < or <= before the date", 8),
        ("joined:>2026-01-01,<2026-02-01", "joined takes one date", 20),
        ("tag:", "empty value for tag", 5),
        ("tag: politics", "empty value for tag", 5),
        ('tag:" "', "empty value for tag", 5),
        ("tier:free AND tag:a,,b", "empty value for tag", 21),
        ("domain:@gmail.com", "bad domain '@gmail.com'", 8),
        ("(tier:free", "unclosed '('", 1),
        ("((tier:free) OR tag:a", "unclosed '('", 1),
        ("tier:free)", "unbalanced ')'", 10),
        ("(tier:free tag:a)", "expected AND, OR or ')', found 'tag:a'", 12),
        ("tier:free tag:a", "expected AND, OR or the end of the expression, found 'tag:a'", 11),
        ("all all", "expected AND, OR or the end of the expression", 5),
        ("", "empty expression", 1),
        ("   ", "empty expression", 1),
        ("tier:free AND", "expression ends too early", 14),
        ("NOT", "expression ends too early", 4),
        ("()", "expected a filter, all, @name, NOT or '(', found ')'", 2),
        ("AND tier:free", "expected a filter, all, @name, NOT or '(', found 'AND'", 1),
        ("politics", "unknown word 'politics'", 1),
        ("@VIP", "bad segment name '@VIP'", 1),
        ("@", "bad segment name '@'", 1),
        ('tag:"local news', "unclosed quote", 5),
        ('tag:"a"b', "unexpected 'b'", 8),
        (":free", "unexpected ':'", 1),
        ("tier:free\x00", "unprintable character '\\x00'", 10),
        ("(" * 21 + "all" + ")" * 21, "more than 20 nested parentheses and NOTs", 21),
        ("NOT " * 21 + "all", "more than 20 nested parentheses and NOTs", 81),
    ],
)
def test_parse_errors_say_what_and_where(expr: str, message: str, column: int) -> None:
    with pytest.raises(SegmentError) as caught:
        parse(expr)
    assert f"segment: {message}" in str(caught.value)
    assert f" at column {column}" in str(caught.value)
    assert caught.value.column == column


# Property (a): whatever the input, parse returns a tree or raises its own error.

FRAGMENTS = [
    *'()":,@<>=- \t\n',
    *("tier:", "tag:", "domain:", "joined:", "free", "paid", "gold", "politics"),
    *("AND", "or", "Not", "all", "2026-01-01", "9999-12-31", "@vip", "gmail.com"),
]
ANY_TEXT = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(FRAGMENTS)).map("".join))


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_any_text_parses_or_raises_segment_error(text: str) -> None:
    try:
        tree = parse(text)
    except SegmentError as exc:
        assert exc.column is not None and 1 <= exc.column <= len(text) + 1
        assert str(exc).startswith("segment: ")
    else:
        assert isinstance(tree, NODES)


# Selection on both backends

PEOPLE = {
    "ana": Reader(
        "free",
        domain="gmail.com",
        tags=frozenset({"politics"}),
        joined=dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC),
    ),
    "ben": Reader(
        "paid", tags=frozenset({"politics", "sport"}), joined=dt.datetime(2026, 1, 1, tzinfo=UTC)
    ),
    "cat": Reader(
        "comped",
        domain="example.org",
        joined=dt.datetime(2026, 1, 1, 23, 59, 59, 999999, tzinfo=UTC),
    ),
    "dan": Reader(
        "trial",
        domain="gmail.com",
        tags=frozenset({"local news"}),
        joined=dt.datetime(2026, 1, 2, tzinfo=UTC),
    ),
    "gus": Reader(
        "free",
        domain="yahoo.com",
        tags=frozenset({"sport"}),
        joined=dt.datetime(2026, 3, 1, tzinfo=UTC),
    ),
    # Never selected, whatever the expression.
    "eve": Reader("free", "unsubscribed", "gmail.com", frozenset({"politics"})),
    "fay": Reader("paid", "bounced", "example.com", frozenset({"sport"})),
    "hal": Reader("comped", "complained", "example.org"),
}
IDS = {name: i for i, name in enumerate(PEOPLE, start=1)}
ACTIVE = "ana ben cat dan gus"


# Expression -> the names it selects. One database per backend for all of them.
SELECTIONS = [
    ("all", ACTIVE),
    ("tier:free", "ana gus"),
    ("tier:paid,comped", "ben cat"),
    ("TIER:Paid", "ben"),
    ("tag:politics", "ana ben"),
    ("tag:politics,sport", "ana ben gus"),
    ('tag:"local news"', "dan"),
    ("tag:Politics", ""),
    ("domain:gmail.com", "ana dan"),
    ("domain:GMAIL.COM,yahoo.com", "ana dan gus"),
    ("joined:>2026-01-01", "dan gus"),
    ("joined:>=2026-01-01", "ben cat dan gus"),
    ("joined:<2026-01-01", "ana"),
    ("joined:<=2026-01-01", "ana ben cat"),
    ("joined:>9999-12-31", ""),
    ("joined:<=9999-12-31", ACTIVE),
    ("joined:<0001-01-01", ""),
    ("NOT tag:politics", "cat dan gus"),
    ("tier:free AND tag:politics", "ana"),
    ("tier:free OR tag:politics AND domain:example.com", "ana ben gus"),
    ("(tier:free OR tag:politics) AND domain:example.com", "ben"),
    ("NOT tier:free AND tag:politics", "ben"),
    ("NOT (tier:free AND tag:politics)", "ben cat dan gus"),
    ("tier:free and not tag:sport or domain:example.org", "ana cat"),
    ("all AND NOT all", ""),
    ("NOT " * 20 + "all", ACTIVE),
    ("(" * 20 + "tag:sport" + ")" * 20, "ben gus"),
]


def test_selects_only_active_readers_in_the_segment(engine: Engine) -> None:
    with db.session(engine) as s:
        add(s, PEOPLE.values())
        wrong = {
            expr: sorted(n for n, i in IDS.items() if i in got)
            for expr, names in SELECTIONS
            if (got := selected(s, expr)) != {IDS[n] for n in names.split()}
        }
    assert wrong == {}


def test_where_leaves_status_to_the_caller(engine: Engine) -> None:
    with db.session(engine) as s:
        add(s, PEOPLE.values())
        query = select(func.count()).select_from(SubscriberRow)
        assert s.scalar(query.where(segments.where(s, "all"))) == len(PEOPLE)
        assert s.scalar(query.where(segments.where(s, "tag:politics"))) == 3  # eve too
        assert segments.sample(s, "tag:politics OR tag:sport", limit=2) == [
            "reader1@gmail.com",
            "reader2@example.com",
        ]


# Saved segments


def test_saved_segments(engine: Engine) -> None:
    with db.session(engine) as s:
        add(s, PEOPLE.values())
        saved = segments.save(s, "paying", "  tier:paid,comped ")
        assert saved == SavedSegment("paying", "tier:paid,comped", saved.updated_at)
        segments.save(s, "paying-politics", "@paying AND tag:politics")
        assert selected(s, "@paying") == {IDS["ben"], IDS["cat"]}
        assert selected(s, "@paying-politics OR tier:trial") == {IDS["ben"], IDS["dan"]}

        # Replacing a segment changes those built on it: names are resolved when compiled.
        segments.save(s, "paying", "tier:comped")
        assert segments.get_saved(s, "paying").expression == "tier:comped"
        assert selected(s, "@paying-politics") == set()
        assert [g.name for g in segments.list_saved(s)] == ["paying", "paying-politics"]
        assert all(isinstance(g, SavedSegment) for g in segments.list_saved(s))

        with pytest.raises(NotFoundError, match="no saved segment named 'nope'"):
            segments.get_saved(s, "nope")


def test_unknown_names_and_cycles_are_refused(engine: Engine) -> None:
    with db.session(engine) as s:
        with pytest.raises(SegmentError, match=r"unknown saved segment '@nope' at column 15") as e:
            segments.count(s, "tier:free AND @nope")
        assert e.value.column == 15

        with pytest.raises(SegmentError, match=r"cycle in saved segments: @me -> @me at column 1"):
            segments.save(s, "me", "@me")
        segments.save(s, "a", "tier:free")
        segments.save(s, "b", "tag:x OR @a")
        segments.save(s, "c", "@b")
        with pytest.raises(SegmentError, match="@a -> @c -> @b -> @a at column 14") as e:
            segments.save(s, "a", "tier:paid OR @c")
        assert e.value.column == 14
        with pytest.raises(SegmentError, match="unknown saved segment '@nope' at column 1"):
            segments.save(s, "d", "@nope")
        with pytest.raises(SegmentError, match="unknown tier"):
            segments.save(s, "d", "tier:gold")
        for bad in ("Bad", "-a", "", "a b", "a" * 101):
            with pytest.raises(InputError, match="segment name"):
                segments.save(s, bad, "all")

        assert segments.get_saved(s, "a").expression == "tier:free"
        assert [g.name for g in segments.list_saved(s)] == ["a", "b", "c"]


# Property (b): the SQL selects exactly what a plain Python predicate selects.

TAGS = ("politics", "sport", "local news")
DOMAINS = ("gmail.com", "example.org", "bücher.example")
DAYS = (dt.date(2025, 12, 31), dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date.max)
Predicate = Callable[[Reader], bool]

readers = st.lists(
    st.builds(
        Reader,
        tier=st.sampled_from(TIERS),
        status=st.sampled_from(SUBSCRIBER_STATUSES),
        domain=st.sampled_from(DOMAINS),
        tags=st.frozensets(st.sampled_from(TAGS)),
        # The days the expressions name, mostly at either edge of the day.
        joined=st.builds(
            lambda day, time: dt.datetime.combine(day, time, UTC),
            st.sampled_from(DAYS[:3]),
            st.one_of(st.sampled_from([dt.time(), dt.time.max]), st.times()),
        ),
    ),
    min_size=4,
    max_size=16,
)
COMPARE: dict[str, Callable[[dt.date, dt.date], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}


@dataclass(frozen=True)
class Expr:
    text: str
    level: int  # 0: an OR, 1: an AND, 2: needs no parentheses anywhere
    test: Predicate


def spelled(draw: st.DrawFn, word: str) -> str:
    return draw(st.sampled_from([word.upper(), word.lower(), word.title()]))


def some(draw: st.DrawFn, values: tuple[str, ...]) -> list[str]:
    return draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))


@st.composite
def expressions(draw: st.DrawFn, depth: int = 3) -> Expr:
    # Hypothesis favours the first choices: combinations first, `all` (the dullest) last.
    kinds = (["and", "or", "not"] if depth else []) + ["joined", "tier", "tag", "domain", "all"]
    kind = draw(st.sampled_from(kinds))
    expr: Expr
    if kind == "all":
        expr = Expr(spelled(draw, "all"), 2, lambda r: True)
    elif kind == "tier":
        tiers = some(draw, TIERS)
        expr = Expr(f"tier:{','.join(tiers)}", 2, lambda r: r.tier in tiers)
    elif kind == "tag":
        tags = some(draw, TAGS)
        expr = Expr(
            "tag:" + ",".join(f'"{t}"' for t in tags), 2, lambda r: bool(r.tags & set(tags))
        )
    elif kind == "domain":
        domains = some(draw, DOMAINS)
        written = ",".join(spelled(draw, d) for d in domains)
        expr = Expr(f"domain:{written}", 2, lambda r: r.domain in domains)
    elif kind == "joined":
        op, day = draw(st.sampled_from(list(COMPARE))), draw(st.sampled_from(DAYS))
        expr = Expr(f"joined:{op}{day}", 2, lambda r: COMPARE[op](r.joined.date(), day))
    elif kind == "not":
        inner = draw(expressions(depth - 1))
        operand = inner.text if inner.level == 2 else f"({inner.text})"
        expr = Expr(f"{spelled(draw, 'not')} {operand}", 2, lambda r: not inner.test(r))
    else:
        # Parentheses only where precedence needs them, so the parser's precedence is tested.
        level = 0 if kind == "or" else 1
        parts = draw(st.lists(expressions(depth - 1), min_size=2, max_size=3))
        texts = [p.text if p.level >= level else f"({p.text})" for p in parts]
        keyword = f" {spelled(draw, kind)} "
        combine = any if kind == "or" else all
        expr = Expr(keyword.join(texts), level, lambda r: combine(p.test(r) for p in parts))
    if draw(st.booleans()) and draw(st.booleans()):  # now and then, parentheses anyway
        expr = Expr(f"({expr.text})", 2, expr.test)
    return expr


def test_sql_selects_what_python_selects(engine: Engine) -> None:
    @settings(max_examples=100, deadline=None)
    @given(readers, expressions())
    def check(people: list[Reader], expr: Expr) -> None:
        with Session(engine) as s:
            add(s, people)
            expected = {
                i for i, r in enumerate(people, start=1) if r.status == "active" and expr.test(r)
            }
            assert selected(s, expr.text) == expected, expr.text
            s.rollback()  # each example starts from an empty table, cheaply

    check()


# The command


@pytest.fixture
def run(
    db_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    monkeypatch.chdir(tmp_path)  # no developer's .env
    runner = CliRunner(env={"MAILER_DATABASE_URL": db_url})
    with db.session(engine) as s:
        add(s, PEOPLE.values())
    return lambda *args: runner.invoke(app, ["segments", *args])


def test_cli_count_save_list_show(run: Callable[..., Result]) -> None:
    result = run("count", "tier:free AND tag:politics", "--json")
    assert (result.exit_code, result.stdout, result.stderr) == (0, '{"count": 1}\n', "")
    result = run("count", "tag:politics OR tag:sport")
    assert (result.exit_code, result.stdout) == (0, "3 active readers\n")

    result = run("save", "paying", "tier:paid,comped")
    assert (result.exit_code, result.stdout) == (0, "saved @paying: 2 active readers\n")
    run("save", "sporty", "tag:sport")

    result = run("list")
    assert result.stdout == "@paying  tier:paid,comped\n@sporty  tag:sport\n"
    listed = json.loads(run("list", "--json").stdout)
    assert [(g["name"], g["expression"]) for g in listed] == [
        ("paying", "tier:paid,comped"),
        ("sporty", "tag:sport"),
    ]

    result = run("show", "sporty")
    assert result.stdout == (
        "@sporty: tag:sport\n2 active readers\nfirst 2:\n  reader2@example.com\n"
        "  reader5@yahoo.com\n"
    )
    assert json.loads(run("show", "paying", "--json").stdout) == {
        "name": "paying",
        "expression": "tier:paid,comped",
        "count": 2,
        "sample": ["reader2@example.com", "reader3@example.org"],
    }


def test_cli_errors_point_at_the_column(run: Callable[..., Result]) -> None:
    result = run("count", "tier:free AND\ttier:gold", "--json")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "error: segment: unknown tier 'gold' at column 20 (tiers: free, trial, paid, comped)",
        "  tier:free AND tier:gold",
        "  " + " " * 19 + "^",
    ]
    result = run("save", "loop", "@loop")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith("error: segment: cycle in saved segments")
    assert isinstance(run("show", "nope").exception, NotFoundError)  # main() prints it

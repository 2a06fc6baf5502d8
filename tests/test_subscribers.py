"""Subscribers one at a time (add, tiers, status, erase), addresses, and the CLI end to end."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from email_validator import EmailNotValidError, validate_email
from helpers import assert_one_error_line, mailer
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, insert, select
from typer.testing import CliRunner

from mailer import db, subscribers
from mailer.cli import app
from mailer.db.models import (
    SubscriberEventRow,
    SubscriberTagRow,
    SuppressionRow,
    TrackingEventRow,
)
from mailer.errors import InputError, NotFoundError
from mailer.subscribers import model


def events(engine: Engine, email: str) -> list[tuple[str, str | None, str | None]]:
    """Oldest first."""
    with db.session(engine) as s:
        return [(e.kind, e.old, e.new) for e in reversed(subscribers.history(s, email))]


@pytest.mark.parametrize(
    ("given_", "email", "key", "domain"),
    [
        (" Ann+x@Example.COM ", "Ann+x@example.com", "ann+x@example.com", "example.com"),
        ("Info@Example.com", "info@example.com", "info@example.com", "example.com"),  # RFC 2142
        ("zoë@bücher.de", "zoë@bücher.de", "zoë@bücher.de", "bücher.de"),
        ("x@xn--bcher-kva.de", "x@bücher.de", "x@bücher.de", "bücher.de"),  # Punycode decoded
    ],
)  # fmt: skip
def test_addresses_are_normalised(given_: str, email: str, key: str, domain: str) -> None:
    address = subscribers.normalise_email(given_)
    assert (address.email, address.key, address.domain) == (email, key, domain)
    assert address.hash == subscribers.email_hash(key) and len(address.hash) == 64


@pytest.mark.parametrize(
    "bad", ["", "ann", "ann@", "@example.com", "a@b@example.com", "ann@localhost", "a b@x.com"]
)
def test_bad_addresses_say_why(bad: str) -> None:
    with pytest.raises(InputError, match=f"^bad address {bad.strip()!r}: "):
        subscribers.normalise_email(bad)


ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"


@settings(max_examples=400, deadline=None)
@given(
    local=st.text(alphabet=ATEXT + ".", min_size=0, max_size=70),
    labels=st.lists(st.text(alphabet="abcXYZ09-", min_size=0, max_size=65), max_size=4),
    tld=st.sampled_from(["com", "COM", "de", "test", "local", "x1", "1x", "xn--p1ai", "a-b"]),
)
def test_fast_path_agrees_with_email_validator(local: str, labels: list[str], tld: str) -> None:
    """Wherever the pre-check takes an address, email-validator gives the same result."""
    text = f"{local}@{'.'.join([*labels, tld])}"
    try:
        expected = validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = model.split_address(text)[0]
    except InputError:
        got = None
    assert got == expected


def test_check_dns_asks_once_per_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def problem(ascii_domain: str, domain: str) -> str | None:
        asked.append(ascii_domain)
        return (
            "The domain name nomail.example does not accept email." if "nomail" in domain else None
        )

    monkeypatch.setattr(model, "_domain_problem", problem)
    assert subscribers.normalise_email("a@fine.example").key == "a@fine.example"
    assert asked == []  # syntax only, unless asked
    assert subscribers.normalise_email("a@fine.example", check_dns=True).domain == "fine.example"
    with pytest.raises(InputError, match="does not accept email"):
        subscribers.normalise_email("a@nomail.example", check_dns=True)
    assert asked == ["fine.example", "nomail.example"]


def test_add_records_creation_and_refuses_duplicates(engine: Engine) -> None:
    with db.session(engine) as s:
        added = subscribers.add(
            s, "Ann@Example.com", name="  Ann \n Lee ", tier="paid", tags=["b;a", "a", " c "]
        )
    assert (added.email, added.name, added.tier, added.status) == (
        "Ann@example.com", "Ann Lee", "paid", "active",
    )  # fmt: skip
    assert (added.tags, added.source, added.domain) == (("a", "b", "c"), "cli", "example.com")
    assert events(engine, "ann@example.com") == [
        ("tier_changed", None, "paid"),
        ("status_changed", None, "active"),
    ]
    with db.session(engine) as s, pytest.raises(InputError, match="already a subscriber"):
        subscribers.add(s, "ANN@example.com")
    with db.session(engine) as s, pytest.raises(InputError, match="unknown tier 'gold'"):
        subscribers.add(s, "bob@example.com", tier="gold")  # type: ignore[arg-type]
    with db.session(engine) as s, pytest.raises(InputError, match="longer than 100"):
        subscribers.add(s, "bob@example.com", tags=["x" * 101])
    with db.session(engine) as s:
        assert s.scalar(select(func.count()).select_from(SubscriberTagRow)) == 3


def test_tier_and_status_changes_are_events(engine: Engine) -> None:
    with db.session(engine) as s:
        subscribers.add(s, "ann@example.com")
    ends = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    with db.session(engine) as s:
        trial = subscribers.set_tier(s, "ANN@example.com", "trial", trial_ends_at=ends)
        assert (trial.tier, trial.trial_ends_at) == ("trial", ends)
        subscribers.set_tier(s, "ann@example.com", "trial")  # no change, no event
        subscribers.set_tier(s, "ann@example.com", "paid")
        subscribers.unsubscribe(s, "ann@example.com")
        assert subscribers.unsubscribe(s, "ann@example.com").status == "unsubscribed"
    assert events(engine, "ann@example.com")[2:] == [
        ("tier_changed", "free", "trial"),
        ("tier_changed", "trial", "paid"),
        ("status_changed", "active", "unsubscribed"),
    ]
    with db.session(engine) as s:
        assert subscribers.get(s, "ann@example.com").trial_ends_at == ends  # kept as history
        with pytest.raises(InputError, match="only goes with tier trial"):
            subscribers.set_tier(s, "ann@example.com", "paid", trial_ends_at=ends)
        with pytest.raises(InputError, match="unknown status 'gone'"):
            subscribers.set_status(s, "ann@example.com", "gone")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: subscribers.get(s, "nobody@example.com"),
        lambda s: subscribers.history(s, "nobody@example.com"),
        lambda s: subscribers.set_tier(s, "nobody@example.com", "paid"),
        lambda s: subscribers.unsubscribe(s, "nobody@example.com"),
        lambda s: subscribers.erase(s, "nobody@example.com"),
    ],
    ids=["get", "history", "set_tier", "unsubscribe", "erase"],
)
def test_unknown_address_is_not_found(engine: Engine, call: object) -> None:
    with db.session(engine) as s, pytest.raises(NotFoundError, match=r"'nobody@example\.com'"):
        call(s)  # type: ignore[operator]


def test_erase_removes_personal_data_and_blocks_re_adding(engine: Engine) -> None:
    with db.session(engine) as s:
        ann = subscribers.add(s, "ann@example.com", tags=["politics"])
        subscribers.add(s, "bob@example.com")
        s.execute(
            insert(TrackingEventRow).values(
                kind="open", subscriber_id=ann.id, ip="203.0.113.9", user_agent="Mail/1.0"
            )
        )
    with db.session(engine) as s:
        assert subscribers.erase(s, "Ann@Example.com") is True
    with db.session(engine) as s:
        assert s.scalars(select(SuppressionRow.email_hash)).all() == [
            subscribers.email_hash("ann@example.com")
        ]
        assert s.scalars(select(SubscriberTagRow.subscriber_id)).all() == []
        assert set(s.scalars(select(SubscriberEventRow.subscriber_id))) == {ann.id + 1}
        assert s.execute(select(TrackingEventRow.ip, TrackingEventRow.user_agent)).one() == (
            None,
            None,
        )
        with pytest.raises(NotFoundError):
            subscribers.get(s, "ann@example.com")
        assert subscribers.erase(s, "ann@example.com") is False  # already erased
        assert subscribers.is_erased(s, "ann@example.com")
    with db.session(engine) as s, pytest.raises(InputError, match=r"was erased .* cannot be added"):
        subscribers.add(s, "ANN@example.com")


@pytest.mark.subprocess
def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands as a user runs them, on SQLite: the library tests cover both backends.

    In-process for speed; the errors in a subprocess, as only ``main`` makes them one line.
    """
    url = f"sqlite:///{tmp_path / 'var' / 'mailer.db'}"
    db.upgrade(url)
    env = {"MAILER_DATABASE_URL": url}
    monkeypatch.chdir(tmp_path)  # no developer's .env
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["subscribers", *args], env=env)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.stdout

    Path("list.csv").write_text(
        "email,name,tier,tags\nann@example.com,Ann,paid,politics\nbad,X,free,\n", encoding="utf-8"
    )
    assert json.loads(run("import", "list.csv", "--json")) == {
        "file": "list.csv",
        "rows": 2,
        "created": 1,
        "updated": 0,
        "rejected": 1,
        "duplicates": 0,
        "suppressed": 0,
        "unchanged": 0,
        "rejects_file": "list.rejects.csv",
    }
    summary = run("import", "list.csv")
    assert summary.splitlines()[0] == (
        "list.csv: 2 rows = 0 created + 1 updated + 1 rejected + 0 duplicates"
    )
    assert "list.rejects.csv" in summary

    assert run("add", "bob@example.com", "--tier", "trial", "--tag", "a", "--tag", "b") == (
        "added bob@example.com (trial)\n"
    )
    run("set-tier", "Bob@example.com", "paid")
    run("unsubscribe", "bob@example.com")
    run("export", "--out", "out/all.csv")
    assert Path("out/all.csv").read_text(encoding="utf-8").count("@example.com") == 2
    assert run("export", "--segment", "tier:paid").count("@example.com") == 2
    assert run("erase", "ann@example.com") == "erased ann@example.com\n"
    shown = json.loads(run("show", "bob@example.com", "--json"))
    assert (shown["tier"], shown["status"], shown["tags"]) == ("paid", "unsubscribed", ["a", "b"])
    assert [e["kind"] for e in shown["events"]] == [
        "status_changed",
        "tier_changed",
        "status_changed",
        "tier_changed",
    ]
    assert "tier_changed" in run("show", "bob@example.com")

    assert_one_error_line(
        mailer(tmp_path, "subscribers", "add", "ANN@example.com", **env),
        "ANN@example.com was erased",
    )
    Path("photo.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert_one_error_line(
        mailer(tmp_path, "subscribers", "import", "photo.csv", **env), "photo.csv: not a CSV"
    )

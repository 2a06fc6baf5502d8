"""``import_csv`` on SQLite and PostgreSQL: the CSV files people really have, and the counts."""

from __future__ import annotations

import csv
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, inspect, select

from mailer import db, subscribers
from mailer.db.models import SubscriberEventRow, SubscriberRow, SubscriberTagRow
from mailer.errors import InputError
from mailer.subscribers import ImportResult, import_csv
from mailer.subscribers import importer as importer_module
from mailer.vocabulary import SUBSCRIBER_COLUMNS


def write(tmp_path: Path, content: str | bytes, name: str = "readers.csv") -> Path:
    path = tmp_path / "in" / name  # beside, not among, the test database's files
    path.parent.mkdir(exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def assert_adds_up(result: ImportResult) -> None:
    assert result.created + result.updated + result.rejected + result.duplicates == result.rows


def state(engine: Engine) -> dict[str, Any]:
    """Everything an import may touch, to compare before and after."""
    with db.session(engine) as s:
        return {
            "subscribers": s.execute(
                select(
                    SubscriberRow.email_key,
                    SubscriberRow.email,
                    SubscriberRow.name,
                    SubscriberRow.tier,
                    SubscriberRow.status,
                    SubscriberRow.trial_ends_at,
                    SubscriberRow.attributes,
                    SubscriberRow.created_at,
                    SubscriberRow.updated_at,
                ).order_by(SubscriberRow.email_key)
            ).all(),
            "tags": s.execute(
                select(SubscriberTagRow.subscriber_id, SubscriberTagRow.tag).order_by(
                    SubscriberTagRow.subscriber_id, SubscriberTagRow.tag
                )
            ).all(),
            "events": s.scalar(select(func.count()).select_from(SubscriberEventRow)),
        }


def events_of(engine: Engine, email: str) -> list[tuple[str, str | None, str | None]]:
    with db.session(engine) as s:
        return [(e.kind, e.old, e.new) for e in reversed(subscribers.history(s, email))]


def reader(engine: Engine, email: str) -> subscribers.Subscriber:
    with db.session(engine) as s:
        return subscribers.get(s, email)


def test_bom_crlf_quoted_commas_and_newlines(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\ufeff Email ,NAME,tier,Tags,trial_ends_at,City\r\n"
        'ann@example.com,"Lovelace, Ann",paid,politics;science,,"Paris, France"\r\n'
        '"bob@example.com","Bob\r\nSmith",trial,politics | sport ,2026-05-01,\r\n'
        "\r\n"
        "cy@example.com,,,,,\r\n",
    )
    result = import_csv(engine, path)
    assert result == ImportResult(
        rows=3, created=3, updated=0, rejected=0, duplicates=0, suppressed=0, unchanged=0,
        rejects_file=None,
    )  # fmt: skip
    ann = reader(engine, "ANN@example.com")
    assert (ann.name, ann.tier, ann.tags) == ("Lovelace, Ann", "paid", ("politics", "science"))
    assert dict(ann.attributes) == {"City": "Paris, France"}
    bob = reader(engine, "bob@example.com")
    assert (bob.name, bob.tags) == ("Bob Smith", ("politics", "sport"))
    assert bob.trial_ends_at == dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    cy = reader(engine, "cy@example.com")
    assert (cy.name, cy.tier, cy.status, cy.tags, dict(cy.attributes)) == (
        None, "free", "active", (), {},
    )  # fmt: skip
    assert ann.source == "import:readers.csv"
    assert not (tmp_path / "in" / "readers.rejects.csv").exists()
    assert import_csv(engine, path, encoding="utf-8").unchanged == 3  # the BOM is no header


@pytest.mark.parametrize(
    "content",
    [
        "email;name;tier\r\nann@example.com;Lovelace, Ann;paid\r\n",
        "sep=;\r\nemail;name;tier\r\nann@example.com;Lovelace, Ann;paid\r\n",  # Excel's hint
        "email\tname\ttier\nann@example.com\tLovelace, Ann\tpaid\n",
    ],
    ids=["semicolon", "sep-line", "tab"],
)
def test_excel_delimiters(engine: Engine, tmp_path: Path, content: str) -> None:
    result = import_csv(engine, write(tmp_path, content))
    assert (result.rows, result.created) == (1, 1)
    assert reader(engine, "ann@example.com").name == "Lovelace, Ann"


def test_excel_unicode_text_is_utf16(engine: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "email\tname\r\nzoe@example.com\tZoë\r\n".encode("utf-16"))
    assert import_csv(engine, path).created == 1
    assert reader(engine, "zoe@example.com").name == "Zoë"


def test_cp1252_is_refused_naming_the_line_unless_given(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path, "email,name\r\nann@example.com,Ann\r\nzoe@example.com,Zoë\r\n".encode("cp1252")
    )
    expected = rf"^{re.escape(str(path))}: line 3 is not valid UTF-8 \(byte 0xEB\)"
    with pytest.raises(InputError, match=expected):
        import_csv(engine, path)
    assert state(engine)["subscribers"] == []
    assert import_csv(engine, path, encoding="cp1252").created == 2
    assert reader(engine, "zoe@example.com").name == "Zoë"


def test_bad_bytes_deep_in_a_file_leave_nothing_written(engine: Engine, tmp_path: Path) -> None:
    rows = "".join(f"reader{n}@example.com,Reader {n}\n" for n in range(5000))  # > 64 KiB
    path = write(tmp_path, b"email,name\n" + rows.encode() + b"late@example.com,Ren\xe9e\n")
    with pytest.raises(InputError, match=r"line 5002 is not valid UTF-8"):
        import_csv(engine, path)
    assert state(engine)["subscribers"] == []
    assert list(path.parent.iterdir()) == [path]  # no rejects file, no temporary file


def test_duplicates_last_wins_and_only_its_data_counts(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,name,tier,tags\n"
        "ann@example.com,First,paid,a\n"
        "bob@example.com,Bob,free,\n"
        "ANN@Example.com,Last,comped,b\n",
    )
    result = import_csv(engine, path)
    assert (result.rows, result.created, result.duplicates) == (3, 2, 1)
    assert_adds_up(result)
    ann = reader(engine, "ann@example.com")
    assert (ann.email, ann.name, ann.tier, ann.tags) == (
        "ANN@example.com",
        "Last",
        "comped",
        ("b",),
    )
    assert events_of(engine, "ann@example.com") == [
        ("tier_changed", None, "comped"),
        ("status_changed", None, "active"),
    ]


def test_duplicates_across_chunks(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer_module, "CHUNK", 2)
    lines = [f"r{n}@example.com,{n}" for n in range(7)] + ["r1@example.com,last", "bad,x"]
    result = import_csv(engine, write(tmp_path, "email,name\n" + "\n".join(lines) + "\n"))
    assert (result.rows, result.created, result.duplicates, result.rejected) == (9, 7, 1, 1)
    assert reader(engine, "r1@example.com").name == "last"


def test_bulk_load_keeps_its_foreign_keys(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A load that at least doubles the list builds its indexes and foreign keys at the end.
    monkeypatch.setattr(importer_module, "BULK_LOAD", 2)
    lines = [f"r{n}@example.com,r{n},paid,news;local" for n in range(5)]
    result = import_csv(engine, write(tmp_path, "email,name,tier,tags\n" + "\n".join(lines)))
    assert result.created == 5
    after = state(engine)
    assert len(after["tags"]) == 10 and after["events"] == 10
    keys = {
        (table, fk["referred_table"])
        for table in ("subscriber_events", "subscriber_tags")
        for fk in inspect(engine).get_foreign_keys(table)
    }
    assert {("subscriber_events", "subscribers"), ("subscriber_tags", "subscribers")} <= keys
    for table in (SubscriberRow, SubscriberEventRow, SubscriberTagRow):
        declared = {ix.name for ix in table.__table__.indexes}  # type: ignore[attr-defined]
        assert declared <= {ix["name"] for ix in inspect(engine).get_indexes(table.__tablename__)}
    with db.session(engine) as s:  # and they still cascade
        s.execute(delete(SubscriberRow))
    assert state(engine)["events"] == 0


def test_bad_rows_go_to_the_rejects_file_with_their_lines(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,name,tier,trial_ends_at\n"
        "ok@example.com,Ok,free,\n"
        'not-an-address,"Two\nlines",free,\n'  # lines 3 and 4
        "gold@example.com,G,gold,\n"
        "late@example.com,L,trial,next week\n"
        ",No Address,paid,\n"
        "wide@example.com,W,free,,extra\n"
        "ok2@example.com,Ok,,,,\n",  # empty extra cells are fine
    )
    result = import_csv(engine, path)
    assert (result.rows, result.created, result.rejected) == (7, 2, 5)
    assert_adds_up(result)
    assert result.rejects_file == tmp_path / "in" / "readers.rejects.csv"
    with result.rejects_file.open(encoding="utf-8", newline="") as f:
        rejects = list(csv.reader(f))
    assert rejects[0] == ["line", "reason", "email", "name", "tier", "trial_ends_at"]
    assert [(r[0], r[2]) for r in rejects[1:]] == [
        ("3", "not-an-address"),
        ("5", "gold@example.com"),
        ("6", "late@example.com"),
        ("7", ""),
        ("8", "wide@example.com"),
    ]
    reasons = [r[1] for r in rejects[1:]]
    assert reasons[0].startswith("bad address 'not-an-address': ")
    assert reasons[1] == "unknown tier 'gold' (expected free, trial, paid or comped)"
    assert reasons[2].startswith("bad trial_ends_at 'next week' (expected an ISO date")
    assert reasons[3] == "missing email"
    assert reasons[4] == "5 fields but the header has 4"
    assert rejects[1][3] == "Two\nlines"  # the row as it was

    # A later clean import removes the rejects file, which would otherwise mislead.
    clean = write(tmp_path, "email\nok@example.com\n")
    assert import_csv(engine, clean, rejects=result.rejects_file).rejects_file is None
    assert not result.rejects_file.exists()


def test_huge_field_is_one_rejected_row(engine: Engine, tmp_path: Path) -> None:
    huge = "x" * 200_000
    path = write(
        tmp_path, f"email,bio\nann@example.com,short\nbob@example.com,{huge}\ncy@example.com,\n"
    )
    result = import_csv(engine, path, rejects=tmp_path / "out" / "rejects.csv")
    assert (result.rows, result.created, result.rejected) == (3, 2, 1)
    rejects = (tmp_path / "out" / "rejects.csv").read_text(encoding="utf-8").splitlines()
    assert rejects[1].startswith("3,unreadable CSV: field larger than field limit")


def test_reimport_changes_nothing(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,name,tier,tags,trial_ends_at,city,attributes\n"
        'ann@example.com,Ann,trial,a;b,2026-05-01T10:00:00+02:00,Zürich,"{""n"": 3}"\n'
        "bob@example.com,Bob,paid,,,,\n"
        "bob@example.com,Bob,paid,,,,\n",
    )
    first = import_csv(engine, path)
    before = state(engine)
    again = import_csv(engine, path)
    assert (again.created, again.updated, again.unchanged, again.duplicates) == (0, 2, 2, 1)
    assert_adds_up(again)
    assert state(engine) == before
    assert first.rows == again.rows == 3
    assert dict(reader(engine, "ann@example.com").attributes) == {"n": 3, "city": "Zürich"}


def test_reimport_updates_what_changed_and_blanks_nothing(engine: Engine, tmp_path: Path) -> None:
    import_csv(
        engine,
        write(
            tmp_path,
            "email,name,tier,tags,city\n"
            "ann@example.com,Ann,free,a,Oslo\n"
            "bob@example.com,Bob,free,x,Rome\n"
            "cy@example.com,Cy,free,,Kyiv\n",
        ),
    )
    result = import_csv(
        engine,
        write(
            tmp_path,
            "email,name,tier,tags,city\n"
            "ann@example.com,,paid,,\n"  # tier only; empty cells keep what is there
            "bob@example.com,Bob,free,a,\n"  # a tag another reader has already
            "cy@example.com,Cy,free,,Kyiv\n",
            "second.csv",
        ),
    )
    assert (result.updated, result.unchanged) == (3, 1)
    ann = reader(engine, "ann@example.com")
    assert (ann.name, ann.tier, ann.tags, dict(ann.attributes)) == (
        "Ann",
        "paid",
        ("a",),
        {"city": "Oslo"},
    )
    assert events_of(engine, "ann@example.com")[-1] == ("tier_changed", "free", "paid")
    assert ann.updated_at > ann.created_at
    bob = reader(engine, "bob@example.com")
    assert bob.tags == ("a", "x")  # tags are only ever added
    assert len(events_of(engine, "bob@example.com")) == 2  # creation only
    assert bob.source == "import:readers.csv"  # where the reader came from first


def test_import_never_makes_anyone_active(engine: Engine, tmp_path: Path) -> None:
    import_csv(engine, write(tmp_path, "email\nann@example.com\nbob@example.com\n"))
    with db.session(engine) as s:
        subscribers.set_status(s, "ann@example.com", "bounced")
    path = write(
        tmp_path,
        "email,name,status\n"
        "ann@example.com,Ann,active\n"
        "bob@example.com,Bob,Unsubscribed\n"
        "cy@example.com,Cy,complained\n"
        "dee@example.com,Dee,sleeping\n",
        "second.csv",
    )
    result = import_csv(engine, path)
    assert (result.created, result.updated, result.rejected, result.suppressed) == (1, 2, 1, 1)
    ann, bob = reader(engine, "ann@example.com"), reader(engine, "bob@example.com")
    assert (ann.status, ann.name) == ("bounced", "Ann")
    assert bob.status == "unsubscribed"
    assert events_of(engine, "bob@example.com")[-1] == ("status_changed", "active", "unsubscribed")
    assert reader(engine, "cy@example.com").status == "complained"
    assert events_of(engine, "cy@example.com") == [
        ("tier_changed", None, "free"),
        ("status_changed", None, "complained"),
    ]
    assert import_csv(engine, path).unchanged == 3  # cy is there now, complained


def test_erased_addresses_are_never_imported_again(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer_module, "CHUNK", 2)
    path = write(tmp_path, "email\nann@example.com\nbob@example.com\ncy@example.com\n")
    import_csv(engine, path)
    with db.session(engine) as s:
        subscribers.erase(s, "Bob@Example.com")
    result = import_csv(engine, path)
    assert (result.rows, result.updated, result.rejected, result.suppressed) == (3, 2, 1, 1)
    assert result.rejects_file is not None
    rejects = result.rejects_file.read_text(encoding="utf-8").splitlines()
    assert rejects[1:] == ["3,erased at the reader's request: never imported again,bob@example.com"]
    with db.session(engine) as s, pytest.raises(LookupError):
        subscribers.get(s, "bob@example.com")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV file (it holds binary data)"),
        (b"PK\x03\x04\x14\x00\x06\x00", "not a CSV file (it holds binary data)"),
        (b"", "empty file"),
        (b"\n\n", "empty file"),
        ("\n\n".encode("utf-16"), "no header line"),
        (b"ann@example.com,Ann\nbob@example.com,Bob\n", "no email column"),
        (b"name,mail\nAnn,ann@example.com\n", "no email column"),
        (b"email,name,Email\nann@example.com,Ann,x\n", "column 'Email' appears twice"),
    ],
    ids=["png", "xlsx", "empty", "blank", "utf16-blank", "no-header", "no-email", "twice"],
)
def test_not_csv_is_refused_before_anything_is_written(
    engine: Engine, tmp_path: Path, content: bytes, message: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(InputError, match="^" + re.escape(f"{path}: {message}")):
        import_csv(engine, path)
    assert state(engine) == {"subscribers": [], "tags": [], "events": 0}
    assert list(path.parent.iterdir()) == [path]


def test_missing_file_and_unknown_encoding(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: cannot read"):
        import_csv(engine, tmp_path / "nope.csv")
    path = write(tmp_path, "email\nann@example.com\n")
    with pytest.raises(InputError, match="unknown encoding 'klingon'"):
        import_csv(engine, path, encoding="klingon")
    with pytest.raises(InputError, match="must not be the file imported"):
        import_csv(engine, path, rejects=path)


def test_attributes_and_created_at_columns(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,created_at,attributes,plan\n"
        'ann@example.com,2024-02-03,"{""a"": 1, ""b"": null}",gold\n'
        'bob@example.com,,"[1, 2]",\n'
        'cy@example.com,,"{""nested"": {""x"": 1}}",\n'
        ",,,\n",  # all empty: a blank line
    )
    result = import_csv(engine, path)
    assert (result.rows, result.created, result.rejected) == (3, 1, 2)
    ann = reader(engine, "ann@example.com")
    assert dict(ann.attributes) == {"a": 1, "plan": "gold"}
    joined = dt.datetime(2024, 2, 3, tzinfo=dt.UTC)
    assert ann.created_at == joined
    with db.session(engine) as s:
        assert {e.at for e in subscribers.history(s, "ann@example.com")} == {joined}


def test_export_imports_back_unchanged(engine: Engine, tmp_path: Path) -> None:
    import_csv(
        engine,
        write(
            tmp_path,
            "email,name,tier,tags,trial_ends_at,city\n"
            'ann@example.com,"Ann, Q",trial,b;a,2026-05-01,Zürich\n'
            "bob@example.com,,paid,,,\n",
        ),
    )
    with db.session(engine) as s:
        subscribers.unsubscribe(s, "bob@example.com")
    before = state(engine)
    out = tmp_path / "export.csv"
    with db.session(engine) as s, out.open("w", encoding="utf-8", newline="") as f:
        assert subscribers.export_csv(s, f) == 2
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(SUBSCRIBER_COLUMNS)
    assert rows[0]["tags"] == "a;b" and rows[0]["attributes"] == '{"city": "Zürich"}'
    assert rows[0]["trial_ends_at"] == "2026-05-01T00:00:00+00:00"
    assert rows[1]["status"] == "unsubscribed"
    result = import_csv(engine, out)
    assert (result.updated, result.unchanged) == (2, 2)
    assert state(engine) == before


def test_export_segment(engine: Engine, tmp_path: Path) -> None:
    import_csv(engine, write(tmp_path, "email,tier\nann@example.com,paid\nbob@example.com,free\n"))
    out = tmp_path / "paid.csv"
    with db.session(engine) as s, out.open("w", encoding="utf-8", newline="") as f:
        assert subscribers.export_csv(s, f, segment="tier:paid") == 1
    assert "ann@example.com" in out.read_text(encoding="utf-8")
    assert "bob@example.com" not in out.read_text(encoding="utf-8")

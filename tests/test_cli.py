"""The real ``mailer`` command in a subprocess: output, exit codes and error lines."""

from __future__ import annotations

import email
import email.policy
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from conftest import sqlite_only
from helpers import assert_one_error_line, dev_env, mailer
from smtp_servers import serve
from sqlalchemy import Engine
from typer.testing import CliRunner

from mailer import db
from mailer.cli import app, for_command_line
from mailer.posts.store import list_posts

PAID_POST = """\
---
title: The Quiet Harbour
subtitle: Boats, mostly
author: Ada Writer
date: 2026-03-01
audience: paid
---
Above the fold.

<!-- paywall -->

Below the fold.
"""


def paths(command: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's path in ``command``'s tree, the root's () first."""
    children = getattr(command, "commands", {})
    return [prefix] + [p for n, c in children.items() for p in paths(c, (*prefix, n))]


def test_every_command_has_help_and_the_part_its_command_line_names_shows_the_same() -> None:
    """Walks the whole command tree, so commands added later are covered too. ``main`` builds
    only the group or command a command line names first: the very command of the whole app."""
    runner = CliRunner()
    all_paths = paths(typer.main.get_command(app))
    assert ("posts", "add") in all_paths and ("db", "upgrade") in all_paths
    broken = {"MAILER_NOPE": "1"}  # --help must work even when the configuration is broken
    for path in all_paths:
        result = runner.invoke(app, [*path, "--help"], env=broken)
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        if path:
            part = for_command_line(list(path))
            assert {p[0] for p in paths(typer.main.get_command(part))[1:]} == {path[0]}
            assert runner.invoke(part, [*path, "--help"], env=broken).output == result.output
    for whole_line in ([], ["--help"], ["sned", "x"]):
        assert for_command_line(whole_line) is app


@pytest.mark.subprocess
def test_upgrade_add_and_list(db_url: str, tmp_path: Path) -> None:
    post = tmp_path / "harbour.md"
    post.write_text(PAID_POST, encoding="utf-8")
    env = {"MAILER_DATABASE_URL": db_url}

    result = mailer(tmp_path, "db", "upgrade", **env)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout

    result = mailer(tmp_path, "posts", "add", str(post), **env)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "created the-quiet-harbour\n",
        "",
    )

    result = mailer(tmp_path, "posts", "add", str(post), "--json", **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"slug": "the-quiet-harbour", "created": False}

    result = mailer(tmp_path, "posts", "list", **env)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["SLUG", "TITLE", "AUDIENCE", "DATE"]
    assert row.split("  ")[0] == "the-quiet-harbour"
    assert "The Quiet Harbour" in row and "paid" in row and "2026-03-01" in row

    result = mailer(tmp_path, "posts", "list", "--json", **env)
    assert json.loads(result.stdout) == [
        {
            "slug": "the-quiet-harbour",
            "title": "The Quiet Harbour",
            "subtitle": "Boats, mostly",
            "author": "Ada Writer",
            "date": "2026-03-01",
            "audience": "paid",
        }
    ]


@pytest.mark.subprocess
@sqlite_only
def test_bad_post_is_refused_and_nothing_stored(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    bad = tmp_path / "untitled.md"
    bad.write_text("---\nsubtitle: no title here\n---\nBody.\n", encoding="utf-8")

    assert_one_error_line(mailer(tmp_path, "posts", "add", "--json", str(bad), **env), str(bad))
    assert_one_error_line(mailer(tmp_path, "posts", "add", "missing.md", **env), "missing.md")
    with db.session(engine) as s:
        assert list_posts(s) == []


@pytest.mark.subprocess
def test_unmigrated_database_says_so(db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    assert_one_error_line(
        mailer(tmp_path, "posts", "list", **env),
        "is not migrated; run `mailer db upgrade`",
    )


@pytest.mark.subprocess
def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://mailer:s3cret@127.0.0.1:1/mailer"
    result = mailer(tmp_path, "posts", "list", MAILER_DATABASE_URL=url)
    assert_one_error_line(result, "cannot connect to database at postgresql+psycopg://mailer:***@")
    assert "s3cret" not in result.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("name", "value"),
    [("MAILER_DATABSE_URL", "sqlite:///x.db"), ("MAILER_BROKER_URL", "ftp://nowhere")],
)
def test_bad_setting_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    result = mailer(tmp_path, "posts", "list", **{name: value})
    assert_one_error_line(result, f"error: {name}: ")
    assert not (tmp_path / "var").exists()  # refused before touching anything


@pytest.mark.subprocess
@sqlite_only
def test_preview_every_variant_and_format(engine: Engine, db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url, "MAILER_TRACKER_URL": "https://t.example.com"}
    (tmp_path / "post.md").write_text(PAID_POST)
    assert mailer(tmp_path, "posts", "add", "post.md", **env).returncode == 0

    free = mailer(tmp_path, "preview", "the-quiet-harbour", "--name", "Zoë Ångström", **env)
    assert free.returncode == 0, free.stderr
    assert "Above the fold." in free.stdout and "Below the fold." not in free.stdout
    assert "Keep reading with a 7-day free trial" in free.stdout
    assert 'href="https://t.example.com/c/' in free.stdout

    text = mailer(
        tmp_path, "preview", "the-quiet-harbour", "--variant", "paid", "--format", "text", **env
    )
    assert text.returncode == 0, text.stderr
    assert "Below the fold." in text.stdout and "<p" not in text.stdout

    out = tmp_path / "deep" / "dir" / "paid.eml"
    eml = mailer(
        tmp_path,
        "preview",
        "the-quiet-harbour",
        "--variant",
        "paid",
        "--format",
        "eml",
        "--out",
        str(out),
        **env,
    )
    assert eml.returncode == 0, eml.stderr
    assert eml.stdout.strip() == str(out)
    message = email.message_from_bytes(out.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "The Quiet Harbour"
    assert message["To"] == "Sample Reader <reader@example.com>"
    assert not list(out.parent.glob(".*")), "no temporary file is left behind"


@pytest.mark.subprocess
@sqlite_only
def test_preview_refuses_bad_input(engine: Engine, db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    assert_one_error_line(mailer(tmp_path, "preview", "no-such-post", **env), "no-such-post")
    bad = mailer(tmp_path, "preview", "x", "--variant", "gold", **env)
    assert bad.returncode == 2 and "--variant" in bad.stderr and bad.stdout == ""
    (tmp_path / "post.md").write_text(PAID_POST)
    assert mailer(tmp_path, "posts", "add", "post.md", **env).returncode == 0
    (tmp_path / "file").write_text("")
    blocked = mailer(tmp_path, "preview", "the-quiet-harbour", "--out", "file/x.html", **env)
    assert_one_error_line(blocked, "--out file/x.html")


RAW_HTML_POST = """\
---
title: Raw Bits
---
Some <b>bold</b> and <script>alert(1)</script> a [trap](javascript:alert(1)).
"""


def big_post() -> str:
    paragraph = "A sentence of a very long post that Gmail will clip. " * 20
    return "---\ntitle: The Long One\n---\n\n" + "\n\n".join([paragraph] * 120) + "\n"


@pytest.mark.subprocess
@sqlite_only
def test_posts_add_and_preview_warn_about_removed_html_and_clipping(
    db_url: str, tmp_path: Path
) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    assert mailer(tmp_path, "db", "upgrade", **env).returncode == 0
    (tmp_path / "raw.md").write_text(RAW_HTML_POST)
    added = mailer(tmp_path, "posts", "add", "raw.md", "--json", **env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {"slug": "raw-bits", "created": True}
    assert added.stderr == (
        "warning: removed from the post: <script>, "
        "link to 'javascript:alert(1)' (its text is kept)\n"
    )
    shown = mailer(tmp_path, "preview", "raw-bits", **env)
    assert "<b>bold</b>" in shown.stdout and "alert" not in shown.stdout
    assert "a trap." in shown.stdout

    (tmp_path / "big.md").write_text(big_post())
    added = mailer(tmp_path, "posts", "add", "big.md", **env)
    assert (added.returncode, added.stdout) == (0, "created the-long-one\n")
    assert re.fullmatch(
        r"warning: the paid variant's HTML is 1\d\d KB, over Gmail's 102 KB limit: Gmail will "
        r"clip it, hiding its end with the unsubscribe link and the open pixel\n",
        added.stderr,
    )
    preview = mailer(tmp_path, "preview", "the-long-one", "--out", "big.html", **env)
    assert preview.returncode == 0 and preview.stderr == added.stderr


@pytest.mark.subprocess
@sqlite_only
def test_send_asks_before_sending_a_post_gmail_will_clip(db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url, "MAILER_BROKER_URL": "redis://127.0.0.1:1/0"}
    assert mailer(tmp_path, "db", "upgrade", **env).returncode == 0
    (tmp_path / "big.md").write_text(big_post())
    assert mailer(tmp_path, "posts", "add", "big.md", **env).returncode == 0
    assert mailer(tmp_path, "subscribers", "add", "ana@example.com", **env).returncode == 0

    # Asked at a terminal, and answered no: nothing is sent or planned.
    leader, follower = pty.openpty()
    os.write(leader, b"n\n")  # typed ahead; the terminal keeps it for the question
    try:
        asked = subprocess.run(
            [sys.executable, "-m", "mailer", "send", "the-long-one", "--segment", "all"],
            cwd=tmp_path,
            env=dev_env(**env),
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert asked.returncode == 1
    assert "warning: the paid variant's HTML is" in asked.stderr
    assert "Gmail will clip it. Send it anyway? [y/N]" in asked.stderr
    # Without a terminal it needs --yes; with it, the send goes out.
    refused = mailer(tmp_path, "send", "the-long-one", "--segment", "all", **env)
    assert refused.returncode == 1 and "pass --yes" in refused.stderr
    assert json.loads(mailer(tmp_path, "sends", "list", "--json", **env).stdout) == []
    with serve() as smtp:
        sent = mailer(
            tmp_path,
            "send",
            "the-long-one",
            "--segment",
            "all",
            "--yes",
            "--wait",
            **env,
            MAILER_SMTP_URL=f"smtp://127.0.0.1:{smtp.settings().port}",
        )
        assert sent.returncode == 0, sent.stderr
        assert "warning: the paid variant's HTML is" in sent.stderr
        assert len(smtp.handler.messages) == 1

"""The real ``mailer`` command in a subprocess: output, exit codes and error lines."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from conftest import dev_env
from sqlalchemy import Engine
from typer.testing import CliRunner

from mailer import db
from mailer.cli import app
from mailer.db.posts_repo import list_posts

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


def mailer(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would, with only the given MAILER_* variables set.

    It runs in ``cwd`` so that no developer's .env is read.
    """
    return subprocess.run(
        [sys.executable, "-m", "mailer", *args],
        cwd=cwd,
        env=dev_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_every_command_has_help(tmp_path: Path) -> None:
    """Walks the whole command tree, so commands added later are covered too."""

    def paths(command: object, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        children = getattr(command, "commands", {})
        return [prefix] + [p for n, c in children.items() for p in paths(c, (*prefix, n))]

    runner = CliRunner()
    all_paths = paths(typer.main.get_command(app), ())
    assert ("posts", "add") in all_paths and ("db", "upgrade") in all_paths
    for path in all_paths:
        # --help must work even when the configuration is broken.
        result = runner.invoke(app, [*path, "--help"], env={"MAILER_NOPE": "1"})
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


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


def test_unmigrated_database_says_so(db_url: str, tmp_path: Path) -> None:
    env = {"MAILER_DATABASE_URL": db_url}
    assert_one_error_line(
        mailer(tmp_path, "posts", "list", **env),
        "is not migrated; run `mailer db upgrade`",
    )


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://mailer:s3cret@127.0.0.1:1/mailer"
    result = mailer(tmp_path, "posts", "list", MAILER_DATABASE_URL=url)
    assert_one_error_line(result, "cannot connect to database at postgresql+psycopg://mailer:***@")
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAILER_DATABSE_URL", "sqlite:///x.db"), ("MAILER_BROKER_URL", "ftp://nowhere")],
)
def test_bad_setting_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    result = mailer(tmp_path, "posts", "list", **{name: value})
    assert_one_error_line(result, f"error: {name}: ")
    assert not (tmp_path / "var").exists()  # refused before touching anything


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

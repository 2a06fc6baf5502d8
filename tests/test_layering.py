"""Which code may load which: the library never the workers, ``mailer --help`` never the heavy
libraries. Read from the source and from a started command, never timed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import sqlite_only
from helpers import dev_env

if TYPE_CHECKING:
    from sqlalchemy import Engine

    import worker.tasks
    from mailer.delivery.dispatch import Workers

    # mypy checks here that the module the entry point names is the Workers the library expects.
    _WORKERS: Workers = worker.tasks

LIBRARY = Path(__file__).resolve().parents[1] / "mailer"
# What a command pays for at start: pydantic (typer 0.29 coerces options through it) and
# PostgreSQL's dialect on SQLite cost ~0.1 s and ~30 ms.
HEAVY = ("sqlalchemy", "uvicorn", "premailer", "pydantic", "sqlalchemy.dialects.postgresql")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_workers_or_celery() -> None:
    found = [
        f"{path.relative_to(LIBRARY.parent)}: {name}"
        for path in sorted(LIBRARY.rglob("*.py"))
        for name in imported(path)
        if name.split(".")[0] in ("worker", "celery", "kombu")
    ]
    assert found == []


@pytest.mark.subprocess
def test_the_workers_are_found_through_their_entry_point() -> None:
    code = "from mailer.delivery.dispatch import find_workers; print(find_workers().__name__)"
    found = subprocess.run(
        [sys.executable, "-c", code], env=dev_env(), capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "worker.tasks"


def loaded_by(cwd: Path, args: list[str], **env: str) -> list[str]:
    """The heavy libraries loaded by ``mailer ARGS``, run in a fresh interpreter in ``cwd``
    (where no developer's .env is read)."""
    code = (
        "import json, sys\n"
        "from mailer.cli import main\n"
        f"sys.argv = ['mailer', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=dev_env(**env), capture_output=True, text=True
    )
    result: list[str] = json.loads(run.stderr.splitlines()[-1])
    return result


@pytest.mark.subprocess
def test_help_loads_no_database_html_or_server_library(tmp_path: Path) -> None:
    assert loaded_by(tmp_path, ["--help"]) == []
    assert loaded_by(tmp_path, ["segments", "count", "--help"]) == []


@pytest.mark.subprocess
@sqlite_only
def test_counting_a_segment_loads_the_database_library_only(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    found = loaded_by(tmp_path, ["segments", "count", "all"], MAILER_DATABASE_URL=db_url)
    assert found == ["sqlalchemy"]

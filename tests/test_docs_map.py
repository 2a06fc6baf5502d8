"""The map that opens docs/architecture.md stays true: every module it names exists, and every
table the models define has a writer named in it."""

from __future__ import annotations

import re
from pathlib import Path

from mailer.db.models import Base

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def the_map() -> str:
    text = ARCHITECTURE.read_text()
    start = text.index("## The map")
    return text[start : text.index("\n## ", start + 1)]


def test_every_module_the_map_names_exists() -> None:
    named = re.findall(r"`((?:mailer|worker)/[\w/]*(?:\.py)?)`", the_map())
    assert len(named) > 15, "the map names the modules it shows"
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md's map names modules that are gone: {missing}"


def test_every_table_has_a_writer_in_the_map() -> None:
    rows = [line for line in the_map().splitlines() if line.startswith("| `")]
    owned = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert owned == set(Base.metadata.tables), "the map's table of writers lists every table"

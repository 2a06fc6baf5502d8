"""Where mailer's own files are: the templates, in a checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# The wheel carries the top-level templates/ folder inside the package (pyproject.toml maps it);
# a checkout (and its editable install) has it at the top.
TEMPLATES = next(
    (where for where in (_HERE / "templates", _HERE.parent / "templates") if where.is_dir()),
    _HERE / "templates",
)

"""Tasks: thin wrappers that take ids, re-read state and call the library."""

from __future__ import annotations

from worker.app import app


@app.task(name="mailer.ping")  # type: ignore[untyped-decorator]
def ping() -> str:
    """Answer "pong": checks that a worker consumes from the broker."""
    return "pong"

"""What many test modules need, written once: the environment of a command, a free port, the
``mailer`` command in a subprocess, rows of a sent post (post, send, ledger), and an ASGI app
served over real HTTP (``running(app)``: uvicorn in a thread, an httpx client to it).

    result = mailer(tmp_path, "posts", "list", MAILER_DATABASE_URL=url)   # CompletedProcess
    assert_one_error_line(result, "no such post")
    out = run_mailer(env, tmp_path, "send", "slug", "--yes")       # its stdout; must succeed

    with db.session(engine) as s:
        send = add_send(s, status="done")                                 # and a post of its own
        ledger_row(s, send.id, reader_id, sent_at=now)                    # one reader's row
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from smtp_servers import wait_until
from sqlalchemy.orm import Session
from starlette.types import ASGIApp

from mailer.db.models import DeliveryRow, PostRow, SendRow
from mailer.tracking.http import HeaderLimited

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
DEV = {"MAILER_ENV": "dev"}
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0"


def dev_env(**env: str) -> dict[str, str]:
    """This process's environment without its ``MAILER_*`` settings, in development mode,
    with ``env`` added: what a command run by a test sees."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return {**clean, **DEV, **env}


def free_port() -> int:
    """A loopback port nothing listens on (connecting to it is refused), free to listen on."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cli(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``mailer *args`` with exactly ``env``, in ``cwd`` (so no developer's .env is read)."""
    return subprocess.run(
        [str(BIN / "mailer"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mailer(cwd: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would, with only the given ``MAILER_*`` settings."""
    return cli(dev_env(**settings), cwd, *args)


def run_mailer(env: dict[str, str], cwd: Path, *args: str, timeout: float = 60) -> str:
    """What ``mailer *args`` printed; it must succeed."""
    done = cli(env, cwd, *args, timeout=timeout)
    assert done.returncode == 0, f"mailer {' '.join(args)}: {done.stderr}"
    return done.stdout


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with exit code 1 and one ``error: ...`` line naming ``fragments``."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    return result.stderr


def add_post(session: Session, slug: str = "p", **fields: Any) -> PostRow:
    """A stored post (title, body and source made up unless given), flushed: it has its id."""
    values: dict[str, Any] = {"title": slug.title(), "audience": "everyone", "body": "b"}
    post = PostRow(slug=slug, **{**values, "source": f"{slug}.md", **fields})
    session.add(post)
    session.flush()
    return post


def add_send(session: Session, post: PostRow | None = None, **fields: Any) -> SendRow:
    """A send of ``post`` (a new post "p" if None) to segment "all", flushed."""
    post = post or add_post(session)
    send = SendRow(post_id=post.id, **{"segment": "all", **fields})
    session.add(send)
    session.flush()
    return send


def ledger_row(session: Session, send_id: int, subscriber_id: int, **fields: Any) -> DeliveryRow:
    """One reader's row of a send's ledger: ``sent``, free variant, batch 0 unless given."""
    values: dict[str, Any] = {"variant": "free", "batch_no": 0, "state": "sent", **fields}
    row = DeliveryRow(send_id=send_id, subscriber_id=subscriber_id, **values)
    session.add(row)
    return row


@contextlib.contextmanager
def running(app: ASGIApp) -> Iterator[httpx.Client]:
    """``app`` under uvicorn in a thread; stopping it runs the lifespan's last flush."""
    config = uvicorn.Config(
        app, port=0, log_level="warning", proxy_headers=False, http=HeaderLimited
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()

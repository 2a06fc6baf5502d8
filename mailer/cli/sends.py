"""``mailer send`` and ``mailer sends``: deliver a post to a segment, and manage sends."""

from __future__ import annotations

import datetime as dt
import functools
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from mailer.cli.common import JsonFlag, engine, print_json, settings, warn
from mailer.config import Settings
from mailer.errors import InputError
from mailer.when import parse_time

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy.orm import Session

    from mailer.posts import Post
    from mailer.sends import SendInfo

app = typer.Typer(name="sends", help="List, inspect, pause, resume and cancel sends.")
EXIT_FAILED_RECIPIENTS = 3
EXIT_INTERRUPTED = 130  # as a shell reports a command that Ctrl-C stopped
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@functools.cache
def _err() -> Console:
    """Progress and notices go to stderr; rich loads only for the commands that print them."""
    from rich.console import Console

    return Console(stderr=True)


def send(
    slug: Annotated[str, typer.Argument(help="Slug of the post to send.")],
    segment: Annotated[
        str | None, typer.Option(help="Who gets it: a segment expression, e.g. 'tier:paid'.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Send without asking.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until done.")] = False,
    at: Annotated[
        str | None,
        typer.Option(
            help="Schedule it: 'in 10m', 'in 2h', ISO 8601 with an offset, or a local time "
            "(2026-12-01 09:00) in MAILER_TIMEZONE."
        ),
    ] = None,
    test_to: Annotated[
        str | None,
        typer.Option("--test-to", help="Send both variants to this address only, as a test."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Send a post to every active reader in a segment, each exactly once."""
    import asyncio

    from mailer import db, sends
    from mailer.compose import Publication
    from mailer.delivery.dkim import signer_from_settings
    from mailer.delivery.smtp import probe
    from mailer.posts.store import get_post

    config = settings()

    signer_from_settings(config)  # a bad DKIM key stops here, before anything, not in a batch
    with db.session(engine()) as session:
        post = get_post(session, slug)
    if test_to is not None:
        _send_test(config, post, test_to, as_json)
        return
    if segment is None:
        raise InputError("--segment is required (use --segment all for every active reader)")
    scheduled_at = _when(at, config) if at is not None else None
    with db.session(engine()) as session:
        draft = sends.draft(
            session, post, segment, Publication.from_settings(config), scheduled_at=scheduled_at
        )
    reach = draft.audience
    _err().print(
        f"{post.title!r} to {segment!r}: {reach.total} readers "
        f"({reach.free} get the free variant, {reach.paid} the paid one)"
        + (f", at {scheduled_at.isoformat()}" if scheduled_at else "")
    )
    warn(draft.composition.warnings())
    _confirm("Gmail will clip it. Send it anyway?" if draft.clipped else "Send it?", yes)
    asyncio.run(probe(config.smtp, config.smtp_connect_timeout))
    with db.session(engine()) as session:
        planned = sends.plan(session, draft, batch_size=config.batch_size)
    send_id = planned.send_id
    _err().print(f"send {send_id} created")
    paused = bool(planned.batches) and _dispatch(
        config, send_id, planned.batches, show_progress=wait or not as_json
    )
    if wait and scheduled_at and not paused:
        paused = _wait_for_its_time(config, send_id, scheduled_at)
    if wait and not paused:
        _wait(send_id)
    with db.session(engine()) as session:
        info = sends.show(session, send_id)
    if as_json:
        print_json({"send_id": send_id, **info.as_json()} if wait else {"send_id": send_id})
    else:
        typer.echo(send_id)
    if paused:
        raise typer.Exit(EXIT_INTERRUPTED)
    if wait and (info.counts["failed"] or info.status == "failed"):
        raise typer.Exit(EXIT_FAILED_RECIPIENTS)


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise InputError("not sending without confirmation: pass --yes")
    if not typer.confirm(question, err=True):
        raise typer.Exit(1)


def _when(at: str, config: Settings) -> dt.datetime:
    try:
        return parse_time(at, timezone=config.timezone, now=dt.datetime.now(dt.UTC))
    except InputError as exc:
        raise InputError(f"--at: {exc}") from None


def _wait_for_its_time(config: Settings, send_id: int, at: dt.datetime) -> bool:
    """``--at`` with ``--wait``: beat starts it (with a broker); without one, this command.
    True when Ctrl-C paused it."""
    from mailer import db, sends
    from mailer.delivery.dispatch import broker_answers

    if broker_answers(config.broker_url):
        _err().print(f"send {send_id} is scheduled for {at.isoformat()}; beat will start it")
        return False
    _err().print(f"send {send_id} is scheduled for {at.isoformat()}: waiting here to send it")
    time.sleep(max((at - dt.datetime.now(dt.UTC)).total_seconds(), 0.0))
    with db.session(engine()) as session:
        batches = sends.start(session, send_id)
    return _dispatch(config, send_id, batches, show_progress=True)


def _send_test(config: Settings, post: Post, address: str, as_json: bool) -> None:
    from mailer import sends

    sent = sends.send_test(config, post, address)
    warn(sent.warnings)
    outcomes = {v: f"{o.state}: {o.code or ''} {o.reply}" for v, o in sent.outcomes.items()}
    if as_json:
        print_json({"test_to": address, "variants": outcomes})
    else:
        for variant, outcome in outcomes.items():
            typer.echo(f"{variant}: {outcome}")
    if not sent.ok:
        raise typer.Exit(EXIT_FAILED_RECIPIENTS)


def _dispatch(
    config: Settings, send_id: int, batches: Sequence[int], *, show_progress: bool
) -> bool:
    """Hand the batches to the workers, or deliver them here when there is no broker; True
    when Ctrl-C paused the send delivered here (the caller exits with ``EXIT_INTERRUPTED``)."""
    from mailer.delivery.dispatch import dispatch, find_workers

    progress = _Progress(send_id) if show_progress else None
    with _StopOnSignal() as stop:
        where = dispatch(
            config,
            send_id,
            batches,
            enqueue=lambda send_id, batches: find_workers().enqueue(engine(), send_id, batches),
            progress=progress.update if progress else lambda: None,
            notice=_err().print,
            stop_requested=stop.requested,
        )
    if where == "queued" and not find_workers().answering(timeout=1.0):
        _err().print("[yellow]no worker answered: batches wait until one starts[/]")
    elif progress:
        progress.close()
    if where == "paused":
        _err().print(f"send {send_id} paused: `mailer sends resume {send_id}` carries it on")
    return where == "paused"


class _StopOnSignal:
    """The first Ctrl-C (or SIGTERM) asks the delivery in this process to stop: the messages in
    flight finish and the send is paused. A second Ctrl-C stops at once, as usual."""

    def __init__(self) -> None:
        self.stopping = False

    def requested(self) -> bool:
        return self.stopping

    def _handle(self, signum: int, frame: object) -> None:
        self.stopping = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _err().print("stopping: the messages in flight finish first (Ctrl-C again: at once)")

    def __enter__(self) -> _StopOnSignal:
        self._before = {sig: signal.signal(sig, self._handle) for sig in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


class _Progress:
    """Sent, deferred, failed, rate and ETA on stderr, read from the ledger."""

    def __init__(self, send_id: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.send_id = send_id
        self.bar = Progress(
            TextColumn("send {task.fields[send]}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn(
                "sent {task.fields[sent]} deferred {task.fields[deferred]} "
                "failed {task.fields[failed]} · {task.fields[rate]}/s"
            ),
            TimeRemainingColumn(),
            console=_err(),
        )
        self.task = self.bar.add_task(
            "", total=None, send=send_id, sent=0, deferred=0, failed=0, rate=0
        )
        self.started = time.monotonic()

    def update(self) -> None:
        from mailer import db, sends

        self.bar.start()  # at the first count, not before: a send handed to workers has none
        with db.session(engine()) as session:
            info = sends.show(session, self.send_id)
        c = info.counts
        finished = c["sent"] + c["failed"] + c["skipped"] + c["unknown"]
        rate = round(c["sent"] / max(time.monotonic() - self.started, 1e-3))
        self.bar.update(
            self.task,
            total=info.recipients,
            completed=finished,
            sent=c["sent"],
            deferred=c["deferred"],
            failed=c["failed"],
            rate=rate,
        )

    def close(self) -> None:
        self.update()
        self.bar.stop()


_TERMINAL = ("done", "cancelled", "failed", "missed", "paused")
# The status is one row, read often so that the command ends soon after the send does; the
# bar's counts scan the send's ledger, so they are read less often.
_POLL_S = 0.1
_COUNTS_EVERY_S = 1.0


def _wait(send_id: int) -> None:
    progress = _Progress(send_id)
    # Off a terminal the bar is only drawn when it stops: no counts to read until then.
    every = _COUNTS_EVERY_S if _err().is_terminal else math.inf
    counted = time.monotonic()
    if _err().is_terminal:
        progress.update()  # the bar from the start, not after the first interval
    try:
        while _status(send_id) not in _TERMINAL:
            time.sleep(_POLL_S)
            if time.monotonic() - counted >= every:
                progress.update()
                counted = time.monotonic()
    finally:
        progress.close()


def _status(send_id: int) -> str:
    from mailer import db, sends

    with db.session(engine()) as session:
        return sends.status(session, send_id)


@app.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """The latest sends, newest first."""
    from mailer import db, sends

    with db.session(engine()) as session:
        found = sends.list_sends(session)
    if as_json:
        print_json([info.as_json() for info in found])
        return
    for info in found:
        c = info.counts
        typer.echo(
            f"{info.id:>5}  {info.status:<9}  {_moment(info):<26}  {info.slug:<30}  "
            f"{info.segment:<20}  sent {c['sent']}/{info.recipients}  failed {c['failed']}  "
            f"unknown {c['unknown']}"
        )


def _moment(info: SendInfo) -> str:
    """The time that matters for the send's status, for one column of ``sends list``."""
    if info.status in ("scheduled", "missed") and info.scheduled_at:
        return f"for {_shown(info.scheduled_at)}"
    if info.finished_at:
        return f"ended {_shown(info.finished_at)}"
    if info.started_at:
        return f"started {_shown(info.started_at)}"
    return f"created {_shown(info.created_at)}"


def _shown(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@app.command()
def show(
    send_id: Annotated[int, typer.Argument(help="Send id.")], as_json: JsonFlag = False
) -> None:
    """A send's status and its ledger counts by state and variant."""
    from mailer import db, sends

    with db.session(engine()) as session:
        info = sends.show(session, send_id)
    if as_json:
        print_json(info.as_json())
        return
    typer.echo(f"send {info.id}: {info.title!r} to {info.segment!r} — {info.status}")
    if info.error:
        typer.echo(f"error: {info.error}")
    for label, at in (
        ("scheduled", info.scheduled_at),
        ("started", info.started_at),
        ("finished", info.finished_at),
    ):
        if at is not None:
            typer.echo(f"  {label:<9} {_shown(at)}")
    for state, count in info.counts.items():
        typer.echo(f"  {state:<9} {count}")
    typer.echo(f"  free variant {info.by_variant['free']}, paid variant {info.by_variant['paid']}")


@app.command()
def pause(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Stop claiming readers; messages in flight finish. Resume sends nothing twice."""
    from mailer import db, sends

    with db.session(engine()) as session:
        sends.pause(session, send_id)
    typer.echo(f"send {send_id} paused")


@app.command()
def resume(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Carry on a paused or failed send, or one a killed process left sending, from where it
    stopped."""
    from mailer import sends

    _set_going(send_id, sends.resume, "resumed")


@app.command()
def start(
    send_id: Annotated[int, typer.Argument(help="Send id.")],
    yes: Annotated[bool, typer.Option("--yes", help="Start without asking.")] = False,
) -> None:
    """Send a scheduled or missed send now."""
    from mailer import db, sends

    with db.session(engine()) as session:
        info = sends.show(session, send_id)
    if info.status not in ("scheduled", "missed"):
        raise InputError(f"send {send_id} is {info.status}; only a scheduled or missed send starts")
    when = _shown(info.scheduled_at) if info.scheduled_at else "no time"
    _err().print(
        f"send {send_id}: {info.title!r} to {info.recipients} readers, {info.status}: {when}"
    )
    _confirm("Send it now?", yes)
    _set_going(send_id, sends.start, "started")


def _set_going(send_id: int, change: Callable[[Session, int], list[int]], done: str) -> None:
    """Move the send to ``sending`` with ``change``, then hand its batches out."""
    from mailer import db

    with db.session(engine()) as session:
        batches = change(session, send_id)
    typer.echo(f"send {send_id} {done}")
    if _dispatch(settings(), send_id, batches, show_progress=True):
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command()
def reschedule(
    send_id: Annotated[int, typer.Argument(help="Send id.")],
    at: Annotated[str, typer.Option(help="The new time: 'in 2h', ISO 8601, or a local time.")],
) -> None:
    """Move a send that has not started (scheduled, or missed) to another time."""
    from mailer import db, sends

    config = settings()
    when = _when(at, config)
    with db.session(engine()) as session:
        sends.reschedule(session, send_id, when)
    typer.echo(f"send {send_id} scheduled for {when.isoformat()}")


@app.command()
def cancel(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Stop for good; readers not yet mailed are marked skipped."""
    from mailer import db, sends

    with db.session(engine()) as session:
        sends.cancel(session, send_id)
    typer.echo(f"send {send_id} cancelled")


@app.command("retry-unknown")
def retry_unknown(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Send again to readers whose message was in flight when a worker died (may duplicate)."""
    from mailer import db, sends

    with db.session(engine()) as session:
        count, batches = sends.retry_unknown(session, send_id)
    typer.echo(f"send {send_id}: {count} readers queued again")
    if count and _dispatch(settings(), send_id, batches, show_progress=True):
        raise typer.Exit(EXIT_INTERRUPTED)

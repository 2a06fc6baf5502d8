"""``mailer send`` and ``mailer sends``: deliver a post to a segment, and manage sends."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import sys
import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy.orm import Session

from mailer import db, sends
from mailer.cli.common import JsonFlag, engine, print_json, settings, warn
from mailer.compose import Publication, compose
from mailer.config import Settings
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.delivery.smtp import SmtpPool, probe
from mailer.errors import InputError
from mailer.posts import Post
from mailer.posts.store import get_post
from mailer.tokens import PREVIEW_SEND_ID, Signer
from mailer.vocabulary import VARIANTS
from mailer.when import parse_time

app = typer.Typer(name="sends", help="List, inspect, pause, resume and cancel sends.")
EXIT_FAILED_RECIPIENTS = 3
_err = Console(stderr=True)


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
    config = settings()
    from mailer.delivery.dkim import signer_from_settings  # cryptography: only where it signs

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
        reach = sends.audience(session, segment)
    if reach.total == 0:
        raise InputError(f"--segment {segment!r} selects no active readers; nothing to send")
    _err.print(
        f"{post.title!r} to {segment!r}: {reach.total} readers "
        f"({reach.free} get the free variant, {reach.paid} the paid one)"
        + (f", at {scheduled_at.isoformat()}" if scheduled_at else "")
    )
    composition = compose(post, Publication.from_settings(config))
    warn(composition.warnings())
    clipped = any(composition.variant(v).clipped for v in VARIANTS)
    _confirm("Gmail will clip it. Send it anyway?" if clipped else "Send it?", yes)
    asyncio.run(probe(config.smtp, config.smtp_connect_timeout))
    with db.session(engine()) as session:
        send_id = sends.create(
            session,
            slug,
            segment,
            composition,
            batch_size=config.batch_size,
            scheduled_at=scheduled_at,
        )
        batches = [] if scheduled_at else sends.start(session, send_id)
    _err.print(f"send {send_id} created")
    if batches:
        _dispatch(config, send_id, batches, show_progress=wait or not as_json)
    if wait and scheduled_at:
        _wait_for_its_time(config, send_id, scheduled_at)
    if wait:
        _wait(send_id)
    with db.session(engine()) as session:
        info = sends.show(session, send_id)
    if as_json:
        print_json({"send_id": send_id, **info.as_json()} if wait else {"send_id": send_id})
    else:
        typer.echo(send_id)
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


def _wait_for_its_time(config: Settings, send_id: int, at: dt.datetime) -> None:
    """``--at`` with ``--wait``: beat starts it (with a broker); without one, this command."""
    if _broker_answers(config.broker_url):
        _err.print(f"send {send_id} is scheduled for {at.isoformat()}; beat will start it")
        return
    _err.print(f"send {send_id} is scheduled for {at.isoformat()}: waiting here to send it")
    time.sleep(max((at - dt.datetime.now(dt.UTC)).total_seconds(), 0.0))
    with db.session(engine()) as session:
        batches = sends.start(session, send_id)
    _dispatch(config, send_id, batches, show_progress=True)


def _send_test(config: Settings, post: Post, address: str, as_json: bool) -> None:
    """Both variants to one address, marked "[Test]", outside the ledger."""
    composition = compose(post, Publication.from_settings(config), subject_prefix="[Test] ")
    warn(composition.warnings())
    from mailer.delivery.dkim import signer_from_settings

    signer = Signer(config.secret_keys)
    dkim = signer_from_settings(config)
    recipient = Recipient(subscriber_id=0, email=address, name=None)

    async def deliver() -> dict[str, str]:
        outcomes: dict[str, str] = {}
        async with SmtpPool(
            config.smtp,
            size=1,
            connect_timeout=config.smtp_connect_timeout,
            command_timeout=config.smtp_command_timeout,
            data_timeout=config.smtp_data_timeout,
        ) as pool:
            for variant in VARIANTS:
                personaliser = Personaliser(
                    composition.variant(variant),
                    send_id=PREVIEW_SEND_ID,
                    signer=signer,
                    tracker_url=config.tracker_url,
                )
                message = personaliser.personalise(recipient)
                outcome = await pool.send(
                    personaliser.envelope_sender(recipient),
                    address,
                    dkim.sign(message) if dkim else message,
                )
                outcomes[variant] = f"{outcome.state}: {outcome.code or ''} {outcome.reply}"
        return outcomes

    outcomes = asyncio.run(deliver())
    if as_json:
        print_json({"test_to": address, "variants": outcomes})
    else:
        for variant, outcome in outcomes.items():
            typer.echo(f"{variant}: {outcome}")
    if any(not o.startswith("sent") for o in outcomes.values()):
        raise typer.Exit(EXIT_FAILED_RECIPIENTS)


def _broker_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _dispatch(config: Settings, send_id: int, batches: list[int], *, show_progress: bool) -> None:
    """Hand the batches to Celery workers, or deliver them here when there is no broker."""
    if _broker_answers(config.broker_url):
        from worker.app import app as celery
        from worker.tasks import enqueue

        enqueue(engine(), send_id, batches)
        _err.print(f"{len(batches)} batches queued on {db.shown(config.broker_url)}")
        if not celery.control.ping(timeout=1.0):
            _err.print("[yellow]no worker answered: batches wait until one starts[/]")
        return
    # Here, not at the top: with a broker, the command does without the delivery machinery.
    from mailer.delivery.runner import Runtime, run_inline

    _err.print(f"no broker at {db.shown(config.broker_url)}: delivering in this process")
    runtime = Runtime(config, engine=db.connect(config.database_url))
    try:
        progress = _Progress(send_id) if show_progress else None
        run_inline(runtime, send_id, progress=progress.update if progress else lambda: None)
        if progress:
            progress.close()
    finally:
        runtime.close()


class _Progress:
    """Sent, deferred, failed, rate and ETA on stderr, read from the ledger."""

    def __init__(self, send_id: int) -> None:
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
            console=_err,
        )
        self.task = self.bar.add_task(
            "", total=None, send=send_id, sent=0, deferred=0, failed=0, rate=0
        )
        self.started = time.monotonic()
        self.bar.start()

    def update(self) -> None:
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
    every = _COUNTS_EVERY_S if _err.is_terminal else math.inf
    counted = time.monotonic()
    try:
        while _status(send_id) not in _TERMINAL:
            time.sleep(_POLL_S)
            if time.monotonic() - counted >= every:
                progress.update()
                counted = time.monotonic()
    finally:
        progress.close()


def _status(send_id: int) -> str:
    with db.session(engine()) as session:
        return sends.status(session, send_id)


@app.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """The latest sends, newest first."""
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


def _moment(info: sends.SendInfo) -> str:
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
    with db.session(engine()) as session:
        sends.pause(session, send_id)
    typer.echo(f"send {send_id} paused")


@app.command()
def resume(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Carry on a paused (or failed) send from where it stopped."""
    _set_going(send_id, sends.resume, "resumed")


@app.command()
def start(
    send_id: Annotated[int, typer.Argument(help="Send id.")],
    yes: Annotated[bool, typer.Option("--yes", help="Start without asking.")] = False,
) -> None:
    """Send a scheduled or missed send now."""
    with db.session(engine()) as session:
        info = sends.show(session, send_id)
    if info.status not in ("scheduled", "missed"):
        raise InputError(f"send {send_id} is {info.status}; only a scheduled or missed send starts")
    when = _shown(info.scheduled_at) if info.scheduled_at else "no time"
    _err.print(
        f"send {send_id}: {info.title!r} to {info.recipients} readers, {info.status}: {when}"
    )
    _confirm("Send it now?", yes)
    _set_going(send_id, sends.start, "started")


def _set_going(send_id: int, change: Callable[[Session, int], list[int]], done: str) -> None:
    """Move the send to ``sending`` with ``change``, then hand its batches out."""
    with db.session(engine()) as session:
        batches = change(session, send_id)
    typer.echo(f"send {send_id} {done}")
    _dispatch(settings(), send_id, batches, show_progress=True)


@app.command()
def reschedule(
    send_id: Annotated[int, typer.Argument(help="Send id.")],
    at: Annotated[str, typer.Option(help="The new time: 'in 2h', ISO 8601, or a local time.")],
) -> None:
    """Move a send that has not started (scheduled, or missed) to another time."""
    config = settings()
    when = _when(at, config)
    with db.session(engine()) as session:
        sends.reschedule(session, send_id, when)
    typer.echo(f"send {send_id} scheduled for {when.isoformat()}")


@app.command()
def cancel(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Stop for good; readers not yet mailed are marked skipped."""
    with db.session(engine()) as session:
        sends.cancel(session, send_id)
    typer.echo(f"send {send_id} cancelled")


@app.command("retry-unknown")
def retry_unknown(send_id: Annotated[int, typer.Argument(help="Send id.")]) -> None:
    """Send again to readers whose message was in flight when a worker died (may duplicate)."""
    with db.session(engine()) as session:
        count, batches = sends.retry_unknown(session, send_id)
    typer.echo(f"send {send_id}: {count} readers queued again")
    if count:
        _dispatch(settings(), send_id, batches, show_progress=True)

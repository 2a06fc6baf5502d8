"""The ``mailer`` command: one Typer app, one module per command group.

Adding a group is one row of ``PARTS``: the name typed, its module and what in it to add.
Command modules import the library inside each command, not at their top: ``mailer --help``
then loads no SQLAlchemy, premailer or uvicorn, and starts in a fraction of the time
(tests/test_layering.py pins it). ``main`` builds only the part its command line names
(``mailer segments count`` imports and builds the segments group alone); ``app`` is the whole.
Commands stay thin (parse, call the library, print); ``main`` turns any ``MailerError``
into one ``error: ...`` line on stderr and exit status 1, and any other exception (a bug)
too: its traceback only with ``MAILER_DEBUG=1``.
"""

from __future__ import annotations

import functools
import gc
import importlib
import sys
import traceback
from collections.abc import Collection

import typer

from mailer.cli.common import remember_invocation
from mailer.config import debug_requested, masked
from mailer.errors import MailerError

# Name on the command line, module under mailer.cli, and its Typer group or command function;
# in the order --help lists them.
PARTS = (
    ("db", "db", "app"),
    ("posts", "posts", "app"),
    ("subscribers", "subscribers", "app"),
    ("segments", "segments", "app"),
    ("preview", "preview", "preview"),
    ("send", "sends", "send"),
    ("sends", "sends", "app"),
    ("stats", "stats", "stats"),
    ("tracker", "tracker", "app"),
    ("doctor", "doctor", "doctor"),
    ("dkim", "dkim", "app"),
    ("bounces", "bounces", "app"),
    ("secret", "secret", "secret"),
    ("config", "config", "config"),
)


def build(names: Collection[str] | None = None) -> typer.Typer:
    """The ``mailer`` app with the parts named (all of them for None)."""
    built = typer.Typer(
        name="mailer",
        help="Self-hosted newsletter delivery: render once, personalise cheaply, "
        "deliver exactly once.",
        no_args_is_help=True,
        add_completion=False,
        # Every failure is reported in one line by main(); MAILER_DEBUG=1 adds a bug's
        # traceback, and a plain one serves it better than a pretty one.
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    built.callback()(remember_invocation)
    for name, module, attribute in PARTS:
        if names is None or name in names:
            part = getattr(importlib.import_module(f"mailer.cli.{module}"), attribute)
            if isinstance(part, typer.Typer):
                built.add_typer(part)
            else:
                built.command()(part)
    return built


@functools.cache
def whole() -> typer.Typer:
    return build()


def __getattr__(name: str) -> typer.Typer:
    # ``from mailer.cli import app``: the whole app, built on first use.
    if name == "app":
        return whole()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def for_command_line(args: list[str]) -> typer.Typer:
    """The app for ``mailer ARGS``: the one part named first, or the whole app for --help, no
    arguments or a name that is no command (whose error lists the commands)."""
    # Typer turns every command of every group into a click command at each start, and the
    # modules' imports add up: ~50 ms of `mailer segments count`'s start.
    first = args[0] if args else ""
    return build({first}) if first in {name for name, _, _ in PARTS} else whole()


GC_THRESHOLD = 100_000  # allocations between the collector's youngest passes
UNEXPECTED_SHOWN = 200  # characters of an unexpected error's message: it may hold a whole query


def main() -> None:
    # A command's start (its imports, SQLAlchemy's above all) makes some 60,000 objects that
    # live to the end; at the default threshold of 700 the collector makes ~150 passes over
    # them during the start alone: ~10% of `mailer segments count`. Cycles are still
    # collected, in fewer passes.
    threshold = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD)
    try:
        for_command_line(sys.argv[1:])()
    except MailerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except Exception as exc:
        # A bug: the user gets one line, and the traceback when they ask for it.
        if debug_requested():
            typer.echo(masked(traceback.format_exc()).rstrip("\n"), err=True)
        text = masked(" ".join(str(exc).split()))
        shown = text[:UNEXPECTED_SHOWN] + ("..." if len(text) > UNEXPECTED_SHOWN else "")
        hint = "" if debug_requested() else "; MAILER_DEBUG=1 shows the traceback"
        typer.echo(f"error: unexpected {type(exc).__name__}: {shown}{hint}", err=True)
        raise SystemExit(1) from None
    finally:
        gc.set_threshold(*threshold)  # as it was, for a caller in the same process (tests)
        # The collector's last pass at exit walks every object of every module imported
        # (SQLAlchemy, Celery, ...): about 0.2 s per command. Freezing skips only that pass;
        # modules are still torn down and their objects released.
        gc.freeze()

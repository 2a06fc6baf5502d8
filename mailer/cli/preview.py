"""``mailer preview``: one variant of a post, personalised for a sample reader."""

from __future__ import annotations

import contextlib
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from mailer.cli.common import engine, settings, warn
from mailer.errors import InputError
from mailer.preview import SAMPLE_READER


class VariantChoice(StrEnum):
    free = "free"
    paid = "paid"


class FormatChoice(StrEnum):
    html = "html"
    text = "text"
    eml = "eml"


def preview(
    slug: Annotated[str, typer.Argument(help="Slug of a post added with `mailer posts add`.")],
    variant: Annotated[
        VariantChoice, typer.Option(help="Free readers' variant (paywall) or paid readers'.")
    ] = VariantChoice.free,
    fmt: Annotated[
        FormatChoice, typer.Option("--format", help="HTML part, text part, or the whole message.")
    ] = FormatChoice.html,
    out: Annotated[
        Path | None, typer.Option(help="Write here (parent folders are made) instead of stdout.")
    ] = None,
    name: Annotated[str, typer.Option(help="Sample reader's name.")] = SAMPLE_READER.name or "",
    to: Annotated[str, typer.Option(help="Sample reader's address.")] = SAMPLE_READER.email,
) -> None:
    """Render one variant of a post, personalised for a sample reader."""
    from mailer.compose import Publication, compose
    from mailer.db import session
    from mailer.posts.store import get_post
    from mailer.preview import render_preview
    from mailer.tokens import Signer

    config = settings()
    with session(engine()) as s:
        post = get_post(s, slug)
    composition = compose(post, Publication.from_settings(config))
    warn(composition.warnings())
    data = render_preview(
        composition,
        variant.value,
        fmt.value,
        signer=Signer(config.secret_keys),
        tracker_url=config.tracker_url,
        reader=SAMPLE_READER.__class__(SAMPLE_READER.subscriber_id, to, name or None),
    )
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    _write_atomically(out, data)
    typer.echo(str(out))


def _write_atomically(path: Path, data: bytes) -> None:
    """A preview is either the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            tmp.unlink()
        raise InputError(f"--out {path}: cannot write ({exc.strerror})") from None

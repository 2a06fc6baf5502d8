"""``mailer preview``: one variant of a post, personalised for a sample reader."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mailer.cli.common import engine, settings, warn
from mailer.preview import SAMPLE_READER, Format
from mailer.vocabulary import Variant


def preview(
    slug: Annotated[str, typer.Argument(help="Slug of a post added with `mailer posts add`.")],
    variant: Annotated[
        Variant, typer.Option(help="Free readers' variant (paywall) or paid readers'.")
    ] = "free",
    fmt: Annotated[
        Format, typer.Option("--format", help="HTML part, text part, or the whole message.")
    ] = "html",
    out: Annotated[
        Path | None, typer.Option(help="Write here (parent folders are made) instead of stdout.")
    ] = None,
    name: Annotated[str, typer.Option(help="Sample reader's name.")] = SAMPLE_READER.name or "",
    to: Annotated[str, typer.Option(help="Sample reader's address.")] = SAMPLE_READER.email,
) -> None:
    """Render one variant of a post, personalised for a sample reader."""
    from mailer.compose import Publication, compose
    from mailer.db import session
    from mailer.files import write_replacing
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
        variant,
        fmt,
        signer=Signer(config.secret_keys),
        tracker_url=config.tracker_url,
        reader=SAMPLE_READER.__class__(SAMPLE_READER.subscriber_id, to, name or None),
    )
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    write_replacing(out, "--out", data)
    typer.echo(str(out))

"""``mailer posts``: add and list posts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mailer.cli.common import JsonFlag, engine, print_json, settings, warn

app = typer.Typer(name="posts", help="Add and list posts.", no_args_is_help=True)


@app.command()
def add(
    file: Annotated[
        Path, typer.Argument(help="Markdown file with YAML front matter.", show_default=False)
    ],
    as_json: JsonFlag = False,
) -> None:
    """Add a post, or replace the post with the same slug.

    Warns about markup the raw HTML policy removes and variants Gmail would clip."""
    from mailer.compose import Publication, compose
    from mailer.db import session
    from mailer.posts import parse_post
    from mailer.posts.store import save_post

    config = settings()  # a bad setting is reported before the file
    post = parse_post(file, config.post_max_size)
    warn(compose(post, Publication.from_settings(config)).warnings())
    with session(engine()) as s:
        created = save_post(s, post, source=str(file))
    if as_json:
        print_json({"slug": post.slug, "created": created})
    else:
        typer.echo(f"{'created' if created else 'updated'} {post.slug}")


@app.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """List posts, newest first."""
    from mailer.db import session
    from mailer.posts.store import list_posts

    with session(engine()) as s:
        posts = list_posts(s)
    if as_json:
        print_json(
            [
                {
                    "slug": p.slug,
                    "title": p.title,
                    "subtitle": p.subtitle,
                    "author": p.author,
                    "date": p.date.isoformat() if p.date else None,
                    "audience": p.audience,
                }
                for p in posts
            ]
        )
        return
    if not posts:
        typer.echo("no posts yet; add one with `mailer posts add FILE`", err=True)
        return
    rows = [("SLUG", "TITLE", "AUDIENCE", "DATE")] + [
        (p.slug, p.title, p.audience, p.date.isoformat() if p.date else "-") for p in posts
    ]
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

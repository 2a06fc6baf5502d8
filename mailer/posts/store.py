"""Posts in the database; callers get and give frozen ``Post`` dataclasses, never rows."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer.db.models import PostRow
from mailer.errors import NotFoundError
from mailer.posts.parse import Post


def save_post(session: Session, post: Post, source: str) -> bool:
    """Insert ``post``, or replace the one with the same slug; True if it was created."""
    row = session.scalars(select(PostRow).where(PostRow.slug == post.slug)).one_or_none()
    created = row is None
    if row is None:
        row = PostRow(slug=post.slug)
        session.add(row)
    row.title = post.title
    row.subtitle = post.subtitle
    row.author = post.author
    row.date = post.date
    row.audience = post.audience
    row.preheader = post.preheader
    row.body = post.body
    row.free_body = post.free_body
    row.source = source
    session.flush()
    return created


def get_post(session: Session, slug: str) -> Post:
    row = session.scalars(select(PostRow).where(PostRow.slug == slug)).one_or_none()
    if row is None:
        raise NotFoundError(f"no post with slug {slug!r}; see `mailer posts list`")
    return _to_post(row)


def list_posts(session: Session) -> list[Post]:
    """All posts, newest first; undated ones last."""
    query = select(PostRow).order_by(PostRow.date.desc().nulls_last(), PostRow.slug)
    return [_to_post(row) for row in session.scalars(query)]


def _to_post(row: PostRow) -> Post:
    return Post(
        slug=row.slug,
        title=row.title,
        subtitle=row.subtitle,
        author=row.author,
        date=row.date,
        audience=row.audience,
        preheader=row.preheader,
        body=row.body,
        free_body=row.free_body,
    )

"""Posts: Markdown with YAML front matter, split at the paywall marker, and kept in the database.

``parse`` reads a post file into a frozen ``Post`` (everything it needs is re-exported here);
``store`` saves and loads them, giving and taking ``Post``, never rows. ``store`` is imported
by name, not from here: it needs the ORM (SQLAlchemy), which parsing a post does not.
"""

from mailer.posts.parse import (
    PAYWALL_MARKER,
    Post,
    parse_post,
    parse_post_text,
    slugify,
)

__all__ = [
    "PAYWALL_MARKER",
    "Post",
    "parse_post",
    "parse_post_text",
    "slugify",
]

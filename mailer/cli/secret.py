"""``mailer secret``: a new random signing key for ``MAILER_SECRET_KEY``."""

from __future__ import annotations

import secrets

import typer

KEY_BYTES = 48  # random bytes: 64 characters, well over the 32 bytes a key needs


def secret() -> None:
    """Print a new random key for MAILER_SECRET_KEY (put it first to rotate; keep the old one
    after it until the emails signed with it are old)."""
    # Needs no settings: it is how a refused configuration gets a good key.
    typer.echo(secrets.token_urlsafe(KEY_BYTES))

"""The messages in the paths ``mailer bounces process`` is given.

A path is a Maildir folder (``cur/`` and ``new/``), an mbox file (it starts with ``From ``),
or one message (an .eml file). Each message is read up to 10 MB, as much as ``bounces serve``
takes. ``read`` checks every path, and that every message in it looks like mail, before it
returns: a bad path or a file that is not mail is one ``InputError`` naming it, before anything
is handled. Messages are read again from disk when handled, so a large Maildir is never held in
memory. Files are left as they are: handling a message twice changes nothing.
"""

from __future__ import annotations

import contextlib
import mailbox
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailer.errors import InputError
from mailer.inbound.verdict import MAX_MESSAGE_BYTES

_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # a header field's name (RFC 5322) and its colon
_MBOX = b"From "


@dataclass(frozen=True)
class Item:
    where: str  # the file, or the folder or mbox with the message's key
    load: Callable[[], bytes]


@contextlib.contextmanager
def read(paths: Sequence[Path]) -> Iterator[list[Item]]:
    """Every message of ``paths``, each checked to look like mail; the mbox files stay open
    until the block ends."""
    with contextlib.ExitStack() as opened:
        yield _read(paths, opened)


def _read(paths: Sequence[Path], opened: contextlib.ExitStack) -> list[Item]:
    items: list[Item] = []
    for path in paths:
        where = str(path)
        try:
            found = _items(path, opened)
            for item in found:
                where = item.where
                _check(where, item.load())
        except InputError:
            raise
        except OSError as exc:
            raise _unreadable(where, exc) from None
        except (mailbox.Error, UnicodeError, ValueError) as exc:
            raise InputError(f"{where}: not a mailbox: {exc}") from None
        items += found
    return items


def _items(path: Path, opened: contextlib.ExitStack) -> list[Item]:
    if path.is_dir():
        if not (path / "cur").is_dir() or not (path / "new").is_dir():
            raise InputError(f"{path}: a folder, but not a Maildir (it has no cur/ and new/)")
        # A Maildir's messages are the files in new/ and cur/ (tmp/ holds those being written).
        found = sorted(
            entry for sub in ("new", "cur") for entry in (path / sub).iterdir()
            if not entry.name.startswith(".")
        )  # fmt: skip
        return [_file(entry) for entry in found]
    message = _file(path)  # a FIFO or a device would block or never end: refused unopened
    with path.open("rb") as file:
        start = file.read(len(_MBOX))
    if start == _MBOX:
        mbox = mailbox.mbox(path, factory=None, create=False)
        opened.callback(mbox.close)
        return [_item(mbox, key, f"{path}#{n + 1}") for n, key in enumerate(mbox.keys())]
    return [message]


def _file(path: Path) -> Item:
    """One message in a file of its own, read up to ``MAX_MESSAGE_BYTES`` as ``bounces serve``
    takes it: more is no bounce."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a file")

    def load() -> bytes:
        try:
            with path.open("rb") as file:
                return file.read(MAX_MESSAGE_BYTES)
        except OSError as exc:  # gone since it was checked: moved by a mail client, say
            raise _unreadable(path, exc) from None

    return Item(str(path), load)


def _unreadable(where: object, exc: OSError) -> InputError:
    return InputError(f"{where}: cannot read: {exc.strerror or exc}")


def _item(box: mailbox.mbox, key: Any, where: str) -> Item:
    """One message of an mbox, read up to ``MAX_MESSAGE_BYTES`` as a file's is."""

    def load() -> bytes:
        with box.get_file(key) as file:
            return file.read(MAX_MESSAGE_BYTES)

    return Item(where, load)


def _check(where: str, raw: bytes) -> None:
    """Refuse what is not mail: empty, binary, or not opening with a header field."""
    if not raw.strip():
        raise InputError(f"{where}: empty, not an email message")
    head = raw.lstrip(b"\r\n")
    if head.startswith(_MBOX):  # an mbox "From " line: the parser takes it
        head = head.partition(b"\n")[2]
    if b"\0" in raw[:4096] or not _FIELD.match(head):
        raise InputError(f"{where}: not an email message (it does not start with a header)")

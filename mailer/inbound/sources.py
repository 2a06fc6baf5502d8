"""The messages in the paths ``mailer bounces process`` is given.

A path is a Maildir folder (``cur/`` and ``new/``), an mbox file (it starts with ``From ``),
or one message (an .eml file). ``read`` checks every path, and that every message in it looks
like mail, before it returns: a bad path or a file that is not mail is one ``InputError``
naming it, before anything is handled. Messages are read again from disk when handled, so a
large Maildir is never held in memory. Files are left as they are: handling a message twice
changes nothing.
"""

from __future__ import annotations

import mailbox
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailer.errors import InputError

_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # a header field's name (RFC 5322) and its colon
_MBOX = b"From "


@dataclass(frozen=True)
class Item:
    where: str  # the file, or the folder or mbox with the message's key
    load: Callable[[], bytes]


def read(paths: Sequence[Path]) -> list[Item]:
    """Every message of ``paths``, each checked to look like mail."""
    items: list[Item] = []
    for path in paths:
        try:
            found = _items(path)
            for item in found:
                _check(item.where, item.load())
        except InputError:
            raise
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except (mailbox.Error, UnicodeError, ValueError) as exc:
            raise InputError(f"{path}: not a mailbox: {exc}") from None
        items += found
    return items


def _items(path: Path) -> list[Item]:
    if path.is_dir():
        if not (path / "cur").is_dir() or not (path / "new").is_dir():
            raise InputError(f"{path}: a folder, but not a Maildir (it has no cur/ and new/)")
        maildir = mailbox.Maildir(path, factory=None, create=False)
        return [_item(maildir, key, f"{path}/{key}") for key in sorted(maildir.keys())]
    with path.open("rb") as file:  # raises for a missing or unreadable path
        start = file.read(len(_MBOX))
    if start == _MBOX:
        mbox = mailbox.mbox(path, factory=None, create=False)
        return [_item(mbox, key, f"{path}#{n + 1}") for n, key in enumerate(mbox.keys())]
    return [Item(str(path), path.read_bytes)]


def _item(box: mailbox.Mailbox[Any], key: Any, where: str) -> Item:
    return Item(where, lambda: box.get_bytes(key))


def _check(where: str, raw: bytes) -> None:
    """Refuse what is not mail: empty, binary, or not opening with a header field."""
    if not raw.strip():
        raise InputError(f"{where}: empty, not an email message")
    head = raw.lstrip(b"\r\n")
    if head.startswith(_MBOX):  # an mbox "From " line: the parser takes it
        head = head.partition(b"\n")[2]
    if b"\0" in raw[:4096] or not _FIELD.match(head):
        raise InputError(f"{where}: not an email message (it does not start with a header)")

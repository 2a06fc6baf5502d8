"""CSV files as people have them: BOMs, CRLF, quoted newlines, Excel's ``;`` and ``sep=`` line.

``open_csv`` checks a file before anything is imported from it: it is text in the expected
encoding, and its first line is a header (the caller checks for the columns it needs). Records
then stream one at a time with the line they start on, so memory stays flat. A field over
the csv module's size limit rejects its record, and reading goes on at the line after it.
``SafeWriter`` writes cells a spreadsheet shows but never runs (``neutralised``), which reading
gives back (``restored``).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

from mailer.errors import InputError

SAMPLE_BYTES = 64 * 1024
DELIMITERS = (",", ";", "\t")  # in order of preference when the header does not settle it
SAVE_AS_UTF8 = 'save it as UTF-8 (Excel: "CSV UTF-8") or give its encoding, e.g. cp1252'

# A record, the line it starts on, and why it could not be read (fields are then empty).
Record = tuple[int, list[str], str | None]

# OWASP's rule against CSV injection: a cell starting with one of = + - @ tab CR is a formula to
# a spreadsheet, so it is written with a ' before it, which spreadsheets show as text. A cell
# that starts with ' before one of those gets one more, so reading can take exactly one off.
_QUOTED_FORMULA = re.compile(r"'*[=+\-@\t\r]")


def neutralised(cell: str) -> str:
    """``cell`` as a spreadsheet shows it but never runs it; ``restored`` gives it back."""
    return "'" + cell if _QUOTED_FORMULA.match(cell) else cell


def restored(cell: str) -> str:
    """The cell ``neutralised`` was given."""
    return cell[1:] if cell[:1] == "'" and _QUOTED_FORMULA.match(cell, 1) else cell


class SafeWriter:
    """``csv.writer`` whose text cells are ``neutralised``: every CSV file mailer writes."""

    def __init__(self, out: TextIO) -> None:
        self._writer = csv.writer(out)

    def writerow(self, row: Iterable[object]) -> None:
        self._writer.writerow([neutralised(c) if isinstance(c, str) else c for c in row])


class CsvSource:
    """An open CSV file whose header has been read."""

    def __init__(self, path: Path, binary: BinaryIO, encoding: str, delimiter: str) -> None:
        self.path = path
        self.encoding = encoding
        self.delimiter = delimiter
        self.size = path.stat().st_size  # bytes, for progress
        self.header: list[str] = []  # as written, trimmed
        self._binary = binary
        # Held here: a wrapper nobody holds closes ``binary`` when collected.
        self._text = io.TextIOWrapper(binary, encoding=encoding, newline="")
        self._lines = self._counted(self._text)
        self._reader = csv.reader(self._lines, delimiter=delimiter)
        self._line = 0  # the last line read
        self._quotes = 0  # quote characters in the lines of the record being read

    def _counted(self, text: Iterable[str]) -> Iterator[str]:
        for line in text:
            self._line += 1
            self._quotes += line.count('"')
            yield line

    def position(self) -> int:
        """Bytes read so far (read ahead by a buffer's worth)."""
        return self._binary.tell()

    def records(self) -> Iterator[Record]:
        """The records after the header (cells ``restored``); blank lines come as empty lists."""
        reader = self._reader
        while True:
            start = self._line + 1
            self._quotes = 0
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a field over the size limit; reading goes on
                self._skip_to_record_end()
                yield start, [], f"unreadable CSV: {exc}"
                continue
            except UnicodeError:  # also UTF-16 without a BOM
                raise _undecodable(self.path, self.encoding) from None
            # Only rows holding a ' can hold a neutralised cell: one join, not a call per cell.
            if "'" in "".join(fields):
                fields = [restored(field) for field in fields]
            yield start, fields, None

    def _skip_to_record_end(self) -> None:
        """After an error the reader starts afresh at its next line, which may be inside the
        quoted field that failed: the record ends at the line where its quotes pair up."""
        try:
            while self._quotes % 2:
                next(self._lines)
        except StopIteration:
            pass
        except UnicodeError:  # also UTF-16 without a BOM
            raise _undecodable(self.path, self.encoding) from None


@contextmanager
def open_csv(path: Path, encoding: str | None = None) -> Iterator[CsvSource]:
    """Open ``path`` as CSV, or raise ``InputError`` naming it and saying what is wrong.

    The encoding is UTF-8 (with or without BOM) or UTF-16 with a BOM unless given. Files in
    another encoding are refused rather than guessed at: a wrong guess would store garbled
    names that nobody notices until they are mailed.
    """
    try:
        binary = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    with binary:
        sample = binary.read(SAMPLE_BYTES)
        encoding = _encoding(path, sample, encoding)
        delimiter, skip = _layout(path, sample, encoding)
        binary.seek(0)
        source = CsvSource(path, binary, encoding, delimiter)
        records = source.records()
        for _ in range(skip):
            next(records, None)
        for _, fields, _ in records:
            if any(field.strip() for field in fields):
                source.header = [field.strip() for field in fields]
                break
        if not source.header:
            raise InputError(f"{path}: no header line; expected one naming the columns")
        yield source


def _encoding(path: Path, sample: bytes, encoding: str | None) -> str:
    if not sample.strip():
        raise InputError(f"{path}: empty file; expected a header line naming the columns")
    if encoding is not None:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise InputError(f"unknown encoding {encoding!r}") from None
        return "utf-8-sig" if name == "utf-8" else name  # a BOM is not part of the header
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"  # Excel's "Unicode Text"
    if b"\0" in sample:
        raise InputError(f"{path}: not a CSV file (it holds binary data)")
    return "utf-8-sig"  # also reads UTF-8 without a BOM


def _layout(path: Path, sample: bytes, encoding: str) -> tuple[str, int]:
    """The delimiter, and how many records come before the header."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        text = decoder.decode(sample, final=len(sample) < SAMPLE_BYTES)
    except UnicodeError:  # also UTF-16 without a BOM
        raise _undecodable(path, encoding) from None
    if "\0" in text:
        raise InputError(f"{path}: not a CSV file (it holds binary data)")
    first = (text.lstrip("\r\n").splitlines() or [""])[0]
    if len(first) == 5 and first.lower().startswith("sep="):  # Excel's delimiter hint
        return first[4], 1

    def score(delimiter: str) -> tuple[bool, int]:
        cells = next(csv.reader([first], delimiter=delimiter))
        return any(cell.strip().lower() == "email" for cell in cells), len(cells)

    return max(DELIMITERS, key=score), 0


def _undecodable(path: Path, encoding: str) -> InputError:
    """The error for a file that is not in ``encoding``, naming the first bad line."""
    name = "UTF-8" if encoding.startswith("utf-8") else encoding
    if encoding.startswith(("utf-16", "utf-32")):  # lines are not bytes apart: no line number
        return InputError(f"{path}: is not valid {name}; {SAVE_AS_UTF8}")
    with path.open("rb") as binary:
        for number, line in enumerate(binary, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                byte = line[exc.start]
                return InputError(
                    f"{path}: line {number} is not valid {name} (byte 0x{byte:02X}); {SAVE_AS_UTF8}"
                )
    return InputError(f"{path}: is not valid {name}; {SAVE_AS_UTF8}")

"""``import_csv``: readers from a CSV file, all or nothing, memory flat whatever the size.

The file is read once. Each row is checked in Python by the same rules as ``add``; bad rows go
to the rejects file, good ones to a temporary staging table a chunk at a time (executemany on
SQLite, COPY on PostgreSQL). The database then does the rest in one transaction of a few
set-based statements: drop earlier duplicates (the last row for an address wins), find the
readers already there, write their tier and status events, update those whose data changed,
insert the new ones with their creation events, add tags. Per row, Python only parses.

Columns (header matched case-insensitively): ``email`` (required), ``name``, ``tier``, ``tags``
(``;`` or ``|`` separated), ``trial_ends_at``, and, so that an export imports back unchanged,
``status`` (only ever makes a reader inactive), ``created_at`` (new readers only) and
``attributes`` (a JSON object). Any other column is an attribute. An empty cell means "not
given": it never blanks what a reader has, and tags and attributes are only ever added.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from sqlalchemy import (
    BindParameter,
    Column,
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    FromClause,
    Index,
    Insert,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.schema import (
    AddConstraint,
    CreateIndex,
    CreateTable,
    DropConstraint,
    DropIndex,
    DropTable,
)

from mailer.db import dialect
from mailer.db.models import (
    Id,
    Json,
    SubscriberEventRow,
    SubscriberRow,
    SubscriberTagRow,
    SuppressionRow,
    UtcDateTime,
    utcnow,
)
from mailer.errors import InputError
from mailer.files import replacing
from mailer.subscribers.csvfile import CsvSource, SafeWriter, open_csv
from mailer.subscribers.manage import STATUS_CHANGED, TIER_CHANGED
from mailer.subscribers.model import (
    clean_name,
    email_hash,
    parse_status,
    parse_tags,
    parse_tier,
    parse_when,
    split_address,
)
from mailer.vocabulary import SUBSCRIBER_COLUMNS, SubscriberStatus

CHUNK = 5000
# From this many new readers, and at least as many as there were, the readers' secondary indexes
# and foreign keys are built once at the end rather than row by row (PostgreSQL only).
BULK_LOAD = 50_000
SAVE_STEPS = 9  # for the progress bar
ERASED_REASON = "erased at the reader's request: never imported again"

# phase ("reading" or "saving"), done, total
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ImportResult:
    """What an import did. ``created + updated + rejected + duplicates == rows``.

    ``updated`` counts rows for readers already there, ``unchanged`` of them needed no
    change. ``suppressed`` is not a fifth term: it counts rows, among the updated and the
    rejected, for readers who stay unmailed (an existing unsubscribed, bounced or complained
    reader, kept so; an erased address, rejected).
    """

    rows: int
    created: int
    updated: int
    rejected: int
    duplicates: int
    suppressed: int
    unchanged: int
    rejects_file: Path | None  # None when no row was rejected

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["rejects_file"] = str(self.rejects_file) if self.rejects_file else None
        return document


def default_rejects_path(path: Path) -> Path:
    """``members.csv`` → ``members.rejects.csv``, next to it."""
    return path.with_name(f"{path.stem}.rejects.csv")


def import_csv(
    engine: Engine,
    path: Path,
    *,
    rejects: Path | None = None,
    check_dns: bool = False,
    encoding: str | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import readers from the CSV file at ``path``; see the module's docstring for the rules.

    A file that is not CSV text, or has no ``email`` column, is refused before anything is
    written. The rejects file (default: ``default_rejects_path``) is replaced on every import:
    written when rows were rejected, removed when none were.

    While the rows are saved (seconds for a million) the import holds the write lock on
    subscribers: SQLite's database lock, PostgreSQL's EXCLUSIVE table lock (reads go on).
    """
    rejects = rejects or default_rejects_path(path)
    if rejects.resolve() == path.resolve():
        raise InputError(f"rejects file {rejects}: must not be the file imported")
    with open_csv(path, encoding) as source:
        parser = _RowParser(path, source.header, engine.dialect, check_dns=check_dns)
        # The rejects file is moved into place only once the import has committed.
        with replacing(rejects, "rejects file") as out, engine.connect() as conn:
            rejected = _Rejects(out, source.header)
            try:
                counts = _Import(conn, source, parser, rejected, progress).run()
            except BaseException:
                conn.invalidate()  # its temporary tables go with it
                raise
    if not rejected.count:  # one left from an earlier import would mislead
        rejects.unlink()
    return ImportResult(**counts, rejects_file=rejects if rejected.count else None)


_staging = MetaData()
# Temporary tables, loaded without indexes: building them once afterwards is faster.
STAGE = Table(
    "import_stage",
    _staging,
    Column("line_no", Integer, nullable=False),
    Column("email_key", String, nullable=False),
    Column("email", String, nullable=False),
    Column("domain", String, nullable=False),
    Column("name", Text),
    Column("tier", String),
    Column("status", String),
    Column("trial_ends_at", UtcDateTime()),
    Column("created_at", UtcDateTime()),
    Column("attributes", Json, nullable=False),
    Column("subscriber_id", Id),  # of readers already there, filled by the merge
    Index("ix_import_stage_key", "email_key", "line_no"),
    Index("ix_import_stage_line", "line_no", unique=True),
    prefixes=["TEMPORARY"],
)
STAGE_TAGS = Table(
    "import_stage_tags",
    _staging,
    Column("line_no", Integer, nullable=False),
    Column("tag", String, nullable=False),
    Index("ix_import_stage_tags_line", "line_no"),
    prefixes=["TEMPORARY"],
)
SUBSCRIBERS = cast(Table, SubscriberRow.__table__)
TAGS = cast(Table, SubscriberTagRow.__table__)
EVENTS = cast(Table, SubscriberEventRow.__table__)

StagedRow = tuple[Any, ...]  # values of STAGE's columns up to attributes, in order


class _RowParser:
    """One CSV record → a staging row and its tags, or ``InputError`` with the reason."""

    def __init__(self, path: Path, header: list[str], dialect: Dialect, *, check_dns: bool) -> None:
        self.width = len(header)
        self.check_dns = check_dns
        # Dates go to the staging table as the dialect stores them (text on SQLite).
        self.to_db = UtcDateTime().bind_processor(dialect) or (lambda value: value)
        at: dict[str, int] = {}
        self.extras: list[tuple[int, str]] = []  # (position, attribute name)
        seen: set[str] = set()
        for position, name in enumerate(header):
            known = name.lower()
            key = known if known in SUBSCRIBER_COLUMNS else name or f"column{position + 1}"
            if key in seen:
                raise InputError(f"{path}: column {name!r} appears twice in the header")
            seen.add(key)
            if known in SUBSCRIBER_COLUMNS:
                at[known] = position
            else:
                self.extras.append((position, key))
        if "email" not in at:
            found = ", ".join(repr(name) for name in header[:6])
            raise InputError(
                f"{path}: no email column; the first line must be a header naming the "
                f"columns, e.g. email,name,tier (found {found})"
            )
        # Absent columns read the blank cell added after the last one.
        self.at = {column: at.get(column, self.width) for column in SUBSCRIBER_COLUMNS}

    def parse(self, line: int, fields: list[str]) -> tuple[StagedRow, tuple[str, ...]]:
        width = self.width
        if len(fields) > width and any(f.strip() for f in fields[width:]):
            raise InputError(f"{len(fields)} fields but the header has {width}")
        # Spreadsheets drop trailing empty cells; one more blank cell for absent columns.
        cells = fields[:width] + [""] * (width + 1 - min(len(fields), width))
        at = self.at
        address = cells[at["email"]].strip()
        if not address:
            raise InputError("missing email")
        email, key, domain = split_address(address, check_dns=self.check_dns)
        tier = cells[at["tier"]].strip()
        trial = cells[at["trial_ends_at"]].strip()
        created = cells[at["created_at"]].strip()
        tags = cells[at["tags"]]
        attributes = _attributes(cells[at["attributes"]].strip())
        attributes.update((name, value) for i, name in self.extras if (value := cells[i].strip()))
        row = (
            line,
            key,
            email,
            domain,
            clean_name(cells[at["name"]]),
            parse_tier(tier) if tier else None,
            _inactive(cells[at["status"]].strip()),
            self.to_db(parse_when(trial, "trial_ends_at")) if trial else None,
            self.to_db(parse_when(created, "created_at")) if created else None,
            json.dumps(attributes) if attributes else "{}",
        )
        return row, parse_tags((tags,)) if tags else ()


def _inactive(text: str) -> SubscriberStatus | None:
    """The ``status`` cell, which can only make a reader inactive: "active" is not given."""
    status = parse_status(text) if text else None
    return None if status == "active" else status


def _attributes(text: str) -> dict[str, Any]:
    """The ``attributes`` cell: a JSON object of plain values (null means not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or any(isinstance(v, dict | list) for v in value.values()):
        # Flat values only: merging nested ones differs between SQLite and PostgreSQL.
        raise InputError("attributes must be a JSON object of plain values")
    return {k: v for k, v in value.items() if v is not None}


class _Rejects:
    """The rejects CSV: the line a rejected row starts on, why, and the row as it was."""

    def __init__(self, out: TextIO, header: list[str]) -> None:
        self.count = 0
        self._writer = SafeWriter(out)
        self._writer.writerow(["line", "reason", *header])

    def add(self, line: int, reason: str, fields: list[str]) -> None:
        self._writer.writerow([line, reason, *fields])
        self.count += 1


Staged = tuple[list[str], StagedRow, tuple[str, ...]]  # the record, its row, its tags


class _Import:
    def __init__(
        self,
        conn: Connection,
        source: CsvSource,
        parser: _RowParser,
        rejects: _Rejects,
        progress: Progress | None,
    ) -> None:
        self.conn = conn
        self.source = source
        self.parser = parser
        self.rejects = rejects
        self.progress = progress or (lambda phase, done, total: None)
        self.erased = 0
        self.check_erased = False

    def run(self) -> dict[str, int]:
        conn = self.conn
        with conn.begin():  # holds no lock on the readers' tables
            for table in (STAGE, STAGE_TAGS):
                conn.execute(CreateTable(table))
            # Hashing every address is only worth it when some address has been erased.
            self.check_erased = conn.scalar(select(SuppressionRow.email_hash).limit(1)) is not None
            rows = self._load()
        with conn.begin():
            merged = self._merge()
            for table in (STAGE, STAGE_TAGS):
                conn.execute(DropTable(table))
        return {
            "rows": rows,
            "rejected": self.rejects.count,
            **merged,
            "suppressed": merged["suppressed"] + self.erased,
        }

    def _load(self) -> int:
        """Stage the valid rows, reject the others; the number of rows read."""
        rows = 0
        chunk: list[Staged] = []
        chunk_rejects: list[tuple[int, str, list[str]]] = []
        for line, fields, problem in self.source.records():
            if not problem and not any(fields):  # a blank line is not a row
                continue
            rows += 1
            if problem:
                chunk_rejects.append((line, problem, fields))
            else:
                try:
                    row, tags = self.parser.parse(line, fields)
                    chunk.append((fields, row, tags))
                except InputError as exc:
                    chunk_rejects.append((line, str(exc), fields))
            if len(chunk) + len(chunk_rejects) == CHUNK:  # rejects are held too
                self._flush(chunk, chunk_rejects)
                chunk, chunk_rejects = [], []
        self._flush(chunk, chunk_rejects)
        return rows

    def _flush(self, chunk: list[Staged], chunk_rejects: list[tuple[int, str, list[str]]]) -> None:
        if self.check_erased and chunk:
            hashes = [email_hash(row[1]) for _, row, _ in chunk]
            erased = set(
                self.conn.scalars(
                    select(SuppressionRow.email_hash).where(SuppressionRow.email_hash.in_(hashes))
                )
            )
            kept = []
            for staged, digest in zip(chunk, hashes, strict=True):
                if digest in erased:
                    chunk_rejects.append((staged[1][0], ERASED_REASON, staged[0]))
                else:
                    kept.append(staged)
            self.erased += len(chunk) - len(kept)
            chunk = kept
        for line, reason, fields in sorted(chunk_rejects, key=lambda r: r[0]):
            self.rejects.add(line, reason, fields)
        dialect.append(self.conn, STAGE, [row for _, row, _ in chunk])
        dialect.append(self.conn, STAGE_TAGS, [(row[0], t) for _, row, tags in chunk for t in tags])
        self.progress("reading", self.source.position(), self.source.size)

    def _merge(self) -> dict[str, int]:
        conn, i, s = self.conn, STAGE, SUBSCRIBERS
        # Nothing may change under the merge: who is new, and the ids given to them.
        dialect.lock_for_writing(conn, s)
        now = bindparam("now", utcnow(), type_=UtcDateTime())
        self.progress("saving", 0, SAVE_STEPS)
        for table in (STAGE, STAGE_TAGS):
            for index in table.indexes:
                index.create(conn)
        self._analyze()
        self.progress("saving", 1, SAVE_STEPS)

        later = STAGE.alias("later")
        duplicates = conn.execute(
            delete(i).where(
                exists().where(later.c.email_key == i.c.email_key, later.c.line_no > i.c.line_no)
            )
        ).rowcount
        self.progress("saving", 2, SAVE_STEPS)

        # A join, not a subquery per row: only rows already there are written.
        conn.execute(update(i).values(subscriber_id=s.c.id).where(s.c.email_key == i.c.email_key))
        self._analyze()
        existing = i.join(s, s.c.id == i.c.subscriber_id)
        updated = conn.scalar(select(func.count()).select_from(existing)) or 0
        inactive = select(func.count()).select_from(existing).where(s.c.status != "active")
        suppressed = conn.scalar(inactive) or 0
        self.progress("saving", 3, SAVE_STEPS)

        tier_changes = and_(i.c.tier.is_not(None), i.c.tier != s.c.tier)
        status_changes = and_(i.c.status.is_not(None), s.c.status == "active")
        conn.execute(_events(TIER_CHANGED, s.c.tier, i.c.tier, now, existing, tier_changes))
        conn.execute(_events(STATUS_CHANGED, s.c.status, i.c.status, now, existing, status_changes))
        self.progress("saving", 4, SAVE_STEPS)

        merged, attributes_changed = dialect.merge_json(conn, s.c.attributes, i.c.attributes)
        tagged = STAGE_TAGS
        has_tag = exists().where(TAGS.c.subscriber_id == s.c.id, TAGS.c.tag == tagged.c.tag)
        # Correlated by hand: ``s`` is the UPDATE's table, two levels up.
        new_tag = exists().where(tagged.c.line_no == i.c.line_no, ~has_tag.correlate_except(TAGS))
        changed = or_(
            and_(i.c.name.is_not(None), i.c.name.is_distinct_from(s.c.name)),
            tier_changes,
            status_changes,
            and_(
                i.c.trial_ends_at.is_not(None),
                i.c.trial_ends_at.is_distinct_from(s.c.trial_ends_at),
            ),
            attributes_changed,
            new_tag,
        )
        changed_rows = conn.execute(
            update(s)
            .where(s.c.id == i.c.subscriber_id, changed)
            .values(
                name=func.coalesce(i.c.name, s.c.name),
                tier=func.coalesce(i.c.tier, s.c.tier),
                status=case((status_changes, i.c.status), else_=s.c.status),
                trial_ends_at=func.coalesce(i.c.trial_ends_at, s.c.trial_ends_at),
                attributes=merged,
                updated_at=now,
            )
        ).rowcount
        self.progress("saving", 5, SAVE_STEPS)

        before = conn.scalar(select(func.coalesce(func.max(s.c.id), 0))) or 0
        new = (conn.scalar(select(func.count()).select_from(i)) or 0) - updated
        bulk = new >= BULK_LOAD and new >= (conn.scalar(select(func.count()).select_from(s)) or 0)
        with _bulk_load(conn, bulk):
            created = self._insert_new(before, now)
        if bulk:
            self._analyze(SUBSCRIBERS, TAGS, EVENTS)
        self.progress("saving", 9, SAVE_STEPS)
        return {
            "duplicates": duplicates,
            "created": created,
            "updated": updated,
            "unchanged": updated - changed_rows,
            "suppressed": suppressed,
        }

    def _insert_new(self, before: int, now: BindParameter[dt.datetime]) -> int:
        """Insert the staged readers not yet there, with their creation events and tags."""
        conn, i, s, tagged = self.conn, STAGE, SUBSCRIBERS, STAGE_TAGS
        columns = ["email", "email_key", "domain", "name", "tier", "status", "trial_ends_at"]
        created = conn.execute(
            insert(s).from_select(
                [*columns, "source", "attributes", "created_at", "updated_at"],
                select(
                    *(i.c[c] for c in columns[:4]),
                    func.coalesce(i.c.tier, "free"),
                    func.coalesce(i.c.status, "active"),
                    i.c.trial_ends_at,
                    literal(f"import:{self.source.path.name}"),
                    i.c.attributes,
                    func.coalesce(i.c.created_at, now),
                    now,
                )
                .where(i.c.subscriber_id.is_(None))
                .order_by(i.c.email_key),  # the unique index then grows at its end
            ),
            execution_options={"preserve_rowcount": True},  # else closed before it is read
        ).rowcount
        self.progress("saving", 6, SAVE_STEPS)

        # A reader's creation is their first tier and status change, dated when they joined.
        # Under the lock, the new readers are exactly those with ids above ``before``.
        for kind, column in ((TIER_CHANGED, s.c.tier), (STATUS_CHANGED, s.c.status)):
            conn.execute(_events(kind, null(), column, s.c.created_at, s, s.c.id > before))
        self.progress("saving", 7, SAVE_STEPS)

        conn.execute(
            insert(TAGS).from_select(
                ["subscriber_id", "tag"],
                select(s.c.id, tagged.c.tag)
                .select_from(
                    tagged.join(i, i.c.line_no == tagged.c.line_no).join(
                        s, s.c.email_key == i.c.email_key
                    )
                )
                .where(~exists().where(TAGS.c.subscriber_id == s.c.id, TAGS.c.tag == tagged.c.tag)),
            )
        )
        self.progress("saving", 8, SAVE_STEPS)
        return created

    def _analyze(self, *tables: Table) -> None:
        """PostgreSQL plans from statistics, which temporary tables only get so, and which a
        bulk load leaves stale until autovacuum comes by (segment counts were 3x slower)."""
        dialect.analyze(self.conn, tables or (STAGE, STAGE_TAGS))


@contextmanager
def _bulk_load(conn: Connection, bulk: bool) -> Iterator[None]:
    """PostgreSQL checks a foreign key and grows each index row by row: for millions of
    readers, events and tags that is most of an import. Its manual advises a bulk load to drop
    them and build them again after, which checks every key in one join and sorts each index
    once (1M readers: 64 s to 47 s on a loaded 2-core machine). All inside the import's
    transaction: no one ever sees the tables without them. Unique indexes stay."""
    if not bulk or not dialect.is_postgresql(conn):
        yield
        return
    keys = [
        fk
        for table in (EVENTS, TAGS)
        for fk in table.foreign_key_constraints
        if fk.referred_table is SUBSCRIBERS
    ]
    indexes = [ix for table in (SUBSCRIBERS, EVENTS, TAGS) for ix in table.indexes if not ix.unique]
    # Index builds sort in memory up to this (PostgreSQL's default is 64 MB): a few seconds less.
    conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
    for fk in keys:
        conn.execute(DropConstraint(fk))
    for ix in indexes:
        conn.execute(DropIndex(ix))
    yield
    for ix in indexes:
        conn.execute(CreateIndex(ix))
    for fk in keys:
        conn.execute(AddConstraint(fk))


def _events(
    kind: str,
    old: ColumnElement[Any],
    new: ColumnElement[Any],
    at: ColumnElement[dt.datetime],
    source: FromClause,
    where: ColumnElement[bool],
) -> Insert:
    """INSERT … SELECT of one event per reader in ``source`` matching ``where``."""
    return insert(EVENTS).from_select(
        ["subscriber_id", "kind", "old", "new", "at"],
        select(SUBSCRIBERS.c.id, literal(kind), old, new, at).select_from(source).where(where),
    )

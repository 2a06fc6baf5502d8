"""A post file read: front matter checked field by field, the body split at the paywall."""

from __future__ import annotations

import datetime as dt
import difflib
import re
import unicodedata
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from mailer.errors import PostError
from mailer.vocabulary import AUDIENCES, Audience

PAYWALL_MARKER = "<!-- paywall -->"


@dataclass(frozen=True)
class Post:
    slug: str
    title: str
    subtitle: str | None
    author: str | None
    date: dt.date | None
    audience: Audience
    preheader: str | None
    body: str  # the whole Markdown body, without the paywall marker line
    free_body: str | None  # Markdown above the marker; None when the post has no paywall

    @property
    def has_paywall(self) -> bool:
        return self.free_body is not None


MAX_BYTES = 2 * 1024 * 1024  # MAILER_POST_MAX_SIZE's default
_KNOWN_FIELDS = ("title", "subtitle", "author", "date", "slug", "audience", "preheader")
_SLUG_MAX = 80
_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def parse_post(path: Path, max_bytes: int = MAX_BYTES) -> Post:
    """Read and parse a post file; raise PostError naming the file and the field.

    A file over ``max_bytes`` is refused unread: rendering and sending it would take minutes
    and gigabytes (a 20 MB post made a 42 MB email).
    """
    source = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)  # not stat(): a pipe has no size
    except OSError as exc:
        raise PostError(f"{source}: cannot read file: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise PostError(
            f"{source}: larger than {_bytes(max_bytes)}; split it, or raise MAILER_POST_MAX_SIZE"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PostError(
            f"{source}: not UTF-8 at byte {exc.start} (0x{data[exc.start]:02x}, line {line});"
            " save the file as UTF-8"
        ) from exc
    return parse_post_text(text, source)


def _bytes(size: int) -> str:
    for unit, scale in (("MB", 1024**2), ("KB", 1024)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size:,} bytes"


def parse_post_text(text: str, source: str) -> Post:
    """Parse the text of a post; ``source`` names it in error messages."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    lines = text.split("\n")
    front, body_start = _split_front_matter(lines, source)
    meta = _load_front_matter(front, source)

    title = _string_field(meta, "title", source)
    if title is None:
        _fail(source, "front matter: 'title' is required and must not be empty")
    audience = _audience(meta, source)
    body, free_body = _split_body(lines[body_start:], body_start + 1, audience, source)

    return Post(
        slug=_slug(meta, title, source),
        title=title,
        subtitle=_string_field(meta, "subtitle", source),
        author=_string_field(meta, "author", source),
        date=_date(meta, source),
        audience=audience,
        preheader=_string_field(meta, "preheader", source),
        body=body,
        free_body=free_body,
    )


_SPELLED_OUT = str.maketrans(
    {
        "ß": "ss",
        "ø": "o",
        "Ø": "O",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ð": "d",
        "Ð": "D",
        "þ": "th",
        "Þ": "TH",
    }
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A duplicate key would silently keep the last value: 'audience' twice could unlock a post."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # a list or a mapping written as a field name
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "a field name must be a word, not a list or mapping",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def slugify(title: str) -> str:
    """ASCII, lowercase, hyphen-separated; '' when the title has no ASCII letters or digits."""
    # NFKD drops letters with no decomposition (ß, Ø, Æ...); spell those out first.
    spelled = title.translate(_SPELLED_OUT)
    ascii_title = unicodedata.normalize("NFKD", spelled).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-")
    if len(slug) > _SLUG_MAX:
        # Cut at the last hyphen that keeps it within the limit, so no word is chopped.
        cut = slug[: _SLUG_MAX + 1].rfind("-")
        slug = slug[:cut] if cut > 0 else slug[:_SLUG_MAX]
    return slug


def _fail(source: str, message: str) -> NoReturn:
    raise PostError(f"{source}: {message}")


def _split_front_matter(lines: list[str], source: str) -> tuple[str, int]:
    """Return the YAML text and the index of the first body line."""
    if lines[0].rstrip() != "---":
        _fail(source, "front matter: missing; the file must start with a line '---'")
    for index in range(1, len(lines)):
        if lines[index].rstrip() == "---":
            return "\n".join(lines[1:index]), index + 1
    _fail(source, "front matter: not closed; add a line '---' after it")


def _load_front_matter(front: str, source: str) -> dict[str, Any]:
    try:
        meta = yaml.load(front, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        mark = exc.problem_mark or exc.context_mark
        # +2: the mark is 0-based and the opening '---' is line 1 of the file.
        where = f" at line {mark.line + 2}" if mark is not None else ""
        _fail(source, f"front matter: broken YAML{where}: {problem}")
    except yaml.reader.ReaderError as exc:
        line = front.count("\n", 0, exc.position) + 2
        _fail(
            source,
            f"front matter: broken YAML at line {line}:"
            f" unacceptable character #x{exc.character:04x}",
        )
    except yaml.YAMLError as exc:
        _fail(source, f"front matter: broken YAML: {str(exc).splitlines()[0]}")
    except ValueError as exc:  # PyYAML builds unquoted dates eagerly: 2024-02-30 fails here
        _fail(source, f"front matter: invalid date or time ({exc}); check 'date'")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        _fail(source, f"front matter: must be a mapping of fields (got {type(meta).__name__})")
    # Refuse unknown keys: a typo such as 'audiance: paid' would send a paid post to everyone.
    for key in meta:
        if key not in _KNOWN_FIELDS:
            hint = difflib.get_close_matches(str(key).lower(), _KNOWN_FIELDS, n=1)
            did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
            _fail(
                source,
                f"front matter: unknown field {key!r}; {did_you_mean}"
                f"known fields: {', '.join(_KNOWN_FIELDS)}",
            )
    return meta


def _string_field(meta: dict[str, Any], name: str, source: str) -> str | None:
    value = meta.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(
            source,
            f"front matter: {name!r} must be a string (got {type(value).__name__}); quote it",
        )
    # Every string field ends up in a mail header (Subject, From name) or the preheader.
    if any(_is_control(char) for char in value):
        _fail(
            source,
            f"front matter: {name!r} must not contain CR/LF/NUL or control characters"
            " (header injection); keep it on one line",
        )
    return value.strip() or None


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" or char in "\u2028\u2029"


def _audience(meta: dict[str, Any], source: str) -> Audience:
    value = meta.get("audience")
    if value is None or value == "":
        return "everyone"
    for audience in AUDIENCES:
        if value == audience:
            return audience
    _fail(source, f"front matter: 'audience' must be 'everyone' or 'paid' (got {value!r})")


def _date(meta: dict[str, Any], source: str) -> dt.date | None:
    value = meta.get("date")
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):  # a subclass of date, so test it first
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str) and _ISO_DATE_RE.match(value.strip()):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError as exc:
            _fail(source, f"front matter: 'date' is not a real date ({value!r}: {exc})")
    _fail(source, f"front matter: 'date' must be a date like 2024-05-17 (got {value!r})")


def _slug(meta: dict[str, Any], title: str, source: str) -> str:
    value = meta.get("slug")
    if value is None or value == "":
        slug = slugify(title)
        if not slug:
            _fail(
                source,
                f"front matter: 'slug' cannot be derived from title {title!r}"
                " (no ASCII letters or digits); set 'slug' explicitly",
            )
        return slug
    if not isinstance(value, str) or not _SLUG_RE.match(value):
        _fail(
            source,
            "front matter: 'slug' must be lowercase ASCII letters and digits separated by"
            f" single hyphens, e.g. 'the-quiet-harbour' (got {value!r})",
        )
    return value


def _split_body(
    lines: list[str], first_line_no: int, audience: Audience, source: str
) -> tuple[str, str | None]:
    """Return (body, free_body); ``first_line_no`` is the file line number of ``lines[0]``."""
    markers = _marker_indexes(lines)
    body_lines = list(lines)
    for index in markers:
        # Keep an empty line in its place so the blocks either side do not merge into one.
        body_lines[index] = ""
    body = _trim_blank_lines(body_lines)
    if not body:
        _fail(source, "body: empty; write the post below the closing '---'")

    line_nos = ", ".join(str(first_line_no + index) for index in markers)
    if len(markers) > 1:
        _fail(
            source,
            f"paywall: {len(markers)} '{PAYWALL_MARKER}' markers (lines {line_nos}); keep one",
        )
    if audience == "everyone":
        if markers:
            _fail(
                source,
                f"paywall: '{PAYWALL_MARKER}' at line {line_nos} but audience is 'everyone';"
                " set audience: paid or remove the marker",
            )
        return body, None
    if not markers:
        _fail(source, f"paywall: 'audience: paid' needs a '{PAYWALL_MARKER}' line; none found")
    free_body = _trim_blank_lines(lines[: markers[0]])
    if not free_body:
        _fail(
            source,
            f"paywall: nothing above '{PAYWALL_MARKER}' (line {line_nos});"
            " free readers would get only the paywall",
        )
    return body, free_body


def _marker_indexes(lines: list[str]) -> list[int]:
    """Indexes of paywall marker lines, skipping fenced code blocks (``` or ~~~)."""
    found: list[int] = []
    fence: str | None = None  # the opening fence while inside a code block
    for index, line in enumerate(lines):
        match = _FENCE_RE.match(line)
        if fence is None:
            if match and not (match[1][0] == "`" and "`" in match[2]):
                fence = match[1]
            elif line.strip() == PAYWALL_MARKER:
                found.append(index)
        elif (
            match
            and match[1][0] == fence[0]
            and len(match[1]) >= len(fence)
            and not match[2].strip()
        ):
            fence = None
    return found


def _trim_blank_lines(lines: list[str]) -> str:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end])

"""Markdown to the HTML fragment of an email body, and that fragment to readable plain text.

The HTML is written for mail clients, once per variant:

- code blocks keep their lines with ``<br>`` and their spaces with ``&nbsp;``, not
  ``white-space: pre``, which Outlook for Windows, Windows Mail and Samsung Email ignore;
  inline code is a ``<span>``, as ``<code>`` is not styled everywhere;
- an image fills the column (a ``width`` attribute for Outlook, ``width:100%`` with a
  ``max-width`` for the rest) and its Markdown title becomes a visible caption;
- a table sits in a box that scrolls sideways where the client allows it, with a minimum width,
  so a phone does not squeeze it to one word per line; its cells never break words.

Raw HTML follows one policy (docs/architecture.md, "The email as readers see it"): the inline tags
in ``ALLOWED_TAGS`` are kept, without attributes; every other tag is removed with its markup
(its text stays, except for scripts and styles); a link or image whose URL is not http, https
or mailto becomes its text. The sanitiser is nh3 (ammonia); ``Body.removed`` names what it took
out, for ``mailer posts add`` to tell the author.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import nh3
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

ALLOWED_TAGS = frozenset({"b", "strong", "i", "em", "u", "s", "sub", "sup", "br"})
LINK_SCHEMES = frozenset({"http", "https", "mailto"})
CONTENT_WIDTH = 552  # px: the 600 px body less its 24 px margins
_TABLE_CHAR_PX = 8  # a rough average character width at the table's font size
_TABLE_CELL_PX = 22  # a cell's padding and border
_TABLE_COLUMN_CHARS = (4, 18)  # past this, a column wraps its words rather than widening
_PHONE_WIDTH = 300  # narrower tables fit a phone and need no minimum width

# Tags our renderer writes besides the inline ones. An author's raw tag with one of these
# names is renamed before sanitising, so nh3 removes it rather than taking it for ours.
_OURS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "li", "hr"}
    | {"div", "span", "a", "img", "table", "thead", "tbody", "tr", "th", "td"}
)
_RENAMED = "x-removed-"
_RAW_TAG = re.compile(r"<(/?)([a-z][a-z0-9-]*)", re.IGNORECASE)

_cleaner = nh3.Cleaner(
    tags=set(ALLOWED_TAGS | _OURS),
    # Removed with what they hold: their content is code or markup, never text for readers.
    clean_content_tags={"script", "style", "template", "noscript", "svg", "math", "title"},
    attributes={
        "a": {"href", "title"},
        "img": {"src", "alt", "width"},
        "table": {"style"},
        "th": {"style"},
        "td": {"style"},
        "ol": {"start"},
    },
    allowed_classes={  # the only class attributes kept
        "div": {"code-block", "table-wrap"},
        "span": {"code", "caption"},
        "img": {"image"},
        "table": {"table"},
    },
    filter_style_properties={"text-align", "min-width"},
    url_schemes=set(LINK_SCHEMES),
    url_relative="deny",
    link_rel=None,
    strip_comments=True,
)


@dataclass(frozen=True)
class Body:
    html: str
    removed: tuple[str, ...]  # what the raw HTML policy removed, e.g. "<script>", "link to 'x:'"


def to_html(markdown: str) -> Body:
    env: dict[str, Any] = {"removed": []}
    rendered = _md.render(markdown, env)
    removed: list[str] = env["removed"]
    return Body(_cleaner.clean(rendered), tuple(dict.fromkeys(removed)))


def _scheme_allowed(url: str) -> bool:
    return urlsplit(url.strip()).scheme.lower() in LINK_SCHEMES


def _police(state: StateCore) -> None:
    """The raw HTML and link policy, on the token stream (a markdown-it core rule)."""
    removed: list[str] = state.env["removed"]
    for block in state.tokens:
        if block.type == "html_block":
            block.content = _mark_raw(block.content, removed)
        if block.type != "inline" or not block.children:
            continue
        kept: list[Token] = []
        dropped_links: list[bool] = []  # per open link: was its link_open dropped?
        for token in block.children:
            if token.type == "html_inline":
                token.content = _mark_raw(token.content, removed)
            elif token.type == "link_open":
                href = str(token.attrGet("href") or "")
                dropped_links.append(not _scheme_allowed(href))
                if dropped_links[-1]:
                    removed.append(f"link to {_shown(href)} (its text is kept)")
                    continue
            elif token.type == "link_close" and dropped_links and dropped_links.pop():
                continue
            elif token.type == "image" and not _scheme_allowed(str(token.attrGet("src") or "")):
                removed.append(
                    f"image {_shown(str(token.attrGet('src') or ''))} (its alt text is kept)"
                )
                text = Token("text", "", 0)
                text.content = token.content
                token = text
            kept.append(token)
        block.children = kept


def _shown(url: str) -> str:
    return repr(url if len(url) <= 40 else url[:39] + "…")


def _mark_raw(markup: str, removed: list[str]) -> str:
    def rename(match: re.Match[str]) -> str:
        name = match.group(2).lower()
        if name in ALLOWED_TAGS:
            return match.group(0)
        removed.append(f"<{name}>")
        return f"<{match.group(1)}{_RENAMED}{name}" if name in _OURS else match.group(0)

    return _RAW_TAG.sub(rename, markup)


def _code_line(line: str) -> str:
    """One line of code that keeps its spaces without ``white-space``; long lines still wrap."""
    text = html.escape(line.expandtabs(4), quote=False)
    indent = len(text) - len(text.lstrip(" "))
    body = re.sub(r" {2,}", lambda m: "&nbsp;" * (len(m.group()) - 1) + " ", text[indent:])
    return "&nbsp;" * indent + body or "&nbsp;"


def _code_block(content: str) -> str:
    lines = content.rstrip("\n").split("\n")
    return f'<div class="code-block">{"<br>".join(_code_line(x) for x in lines)}</div>\n'


def _render_fence(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    return _code_block(tokens[idx].content)


def _render_code_inline(
    self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any
) -> str:
    return f'<span class="code">{_code_line(tokens[idx].content)}</span>'


def _render_image(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    src = html.escape(str(token.attrGet("src") or ""))
    alt = html.escape(self.renderInlineAsText(token.children or [], options, env))
    image = f'<img class="image" src="{src}" alt="{alt}" width="{CONTENT_WIDTH}">'
    title = str(token.attrGet("title") or "")
    return image + (f'<span class="caption">{html.escape(title)}</span>' if title else "")


def _render_table_open(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    width = _table_min_width(tokens, idx)
    style = f' style="min-width:{width}px"' if width > _PHONE_WIDTH else ""
    return f'<div class="table-wrap"><table class="table"{style}>\n'


def _render_table_close(
    self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any
) -> str:
    return "</table></div>\n"


def _table_min_width(tokens: Sequence[Token], start: int) -> int:
    """How wide the table must stay for its columns to keep short texts on one line."""
    columns: list[int] = []
    column = 0
    for token in tokens[start + 1 :]:
        if token.type == "table_close":
            break
        if token.type == "tr_open":
            column = 0
        elif token.type == "inline":
            if column == len(columns):
                columns.append(0)
            columns[column] = max(columns[column], len(token.content))
            column += 1
    low, high = _TABLE_COLUMN_CHARS
    width = sum(min(max(n, low), high) * _TABLE_CHAR_PX + _TABLE_CELL_PX for n in columns)
    return min(width, CONTENT_WIDTH)


_md = MarkdownIt("commonmark", {"html": True, "typographer": True}).enable(
    ["table", "strikethrough", "replacements", "smartquotes"]
)
# Every URL reaches ``_police``, which turns a disallowed one into its text; markdown-it's own
# check would leave such a link as Markdown source on the page.
_md.validateLink = lambda url: True  # type: ignore[method-assign]
_md.core.ruler.push("police", _police)
_md.add_render_rule("fence", _render_fence)
_md.add_render_rule("code_block", _render_fence)
_md.add_render_rule("code_inline", _render_code_inline)
_md.add_render_rule("image", _render_image)
_md.add_render_rule("table_open", _render_table_open)
_md.add_render_rule("table_close", _render_table_close)


# Plain text ------------------------------------------------------------------------------------

TEXT_WIDTH = 72  # the wrap target; with tokens filled in, lines stay within MAX_LINE
MAX_LINE = 78
_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "blockquote", "table", "hr"}
Measure = Callable[[str], int]


def wrap(
    text: str,
    width: int = TEXT_WIDTH,
    *,
    first: str = "",
    indent: str = "",
    measure: Measure = len,
) -> str:
    """Greedy word wrap; ``measure`` gives a word's final width (tokens count at their size).

    A word longer than the width (a long URL) gets a line of its own and is never broken.
    """
    lines: list[str] = []
    line, used = first, len(first)
    empty = True
    for word in text.split():
        size = measure(word)
        if not empty and used + 1 + size > width:
            lines.append(line)
            line, used, empty = indent, len(indent), True
        line += ("" if empty else " ") + word
        used += size + (0 if empty else 1)
        empty = False
    lines.append(line)
    return "\n".join(x.rstrip() for x in lines)


@dataclass
class _Block:
    text: str
    quotes: tuple[int, ...]  # the blockquotes it is in, outermost first


class _TextRenderer(HTMLParser):
    """Just enough of an HTML-to-text converter for what ``to_html`` produces."""

    def __init__(self, link: dict[str, str], measure: Measure) -> None:
        super().__init__(convert_charrefs=True)
        self.link = link
        self.measure = measure
        self.blocks: list[_Block] = []
        self.current: list[str] = []
        self.lists: list[int] = []  # next number per open list; 0 for a bulleted list
        self.bullet = ""  # the marker the next block of a list item starts with
        self.quotes: list[int] = []
        self.quote_count = 0
        self.code = False
        self.href: list[str | None] = []
        self.heading: str | None = None
        self.spans: list[str | None] = []  # the class of each open span
        self.rows: list[list[str]] | None = None  # the table being read
        self.right: set[int] = set()  # its right-aligned columns
        self.header_rows = 0
        self.in_head = False

    @property
    def prefix(self) -> str:
        return "> " * len(self.quotes)

    def add(self, text: str) -> None:
        self.blocks.append(_Block(text, tuple(self.quotes)))

    def flush(self) -> None:
        text = "".join(self.current)
        self.current = []
        if not text.strip():
            return
        if self.code:
            self.add(self.code_text(text))
            return
        text = " ".join(text.split())
        if self.heading in ("h1", "h2"):
            wrapped = wrap(text, first=self.prefix, indent=self.prefix, measure=self.measure)
            longest = max(len(x) for x in wrapped.split("\n")) - len(self.prefix)
            under = ("=" if self.heading == "h1" else "-") * min(longest, TEXT_WIDTH)
            self.add(f"{wrapped}\n{self.prefix}{under}")
            return
        indent = self.prefix + "   " * len(self.lists)
        first = indent[:-3] + self.bullet if self.bullet else indent
        self.bullet = ""
        self.add(wrap(text, first=first, indent=indent, measure=self.measure))

    def code_text(self, text: str) -> str:
        room = MAX_LINE - len(self.prefix) - 4
        lines = []
        for line in text.strip("\n").split("\n"):
            line = line.rstrip()
            # Plain text has no sideways scroll: a long line continues on the next.
            while len(line) > room:
                lines.append(line[:room])
                line = line[room:]
            lines.append(line)
        return "\n".join((self.prefix + "    " + x).rstrip() for x in lines)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if self.rows is not None:
            self.table_start(tag, attrs)
            return
        if tag in _BLOCKS or tag == "li":
            self.flush()
        if tag in ("ul", "ol"):
            self.lists.append(0 if tag == "ul" else int(attr.get("start") or 1))
        elif tag == "li" and self.lists:
            number = self.lists[-1]
            self.bullet = f"{number}. ".ljust(3) if number else "*  "
            if number:
                self.lists[-1] += 1
        elif tag == "blockquote":
            self.quote_count += 1
            self.quotes.append(self.quote_count)
        elif tag == "div" and attr.get("class") == "code-block":
            self.flush()
            self.code = True
        elif tag == "br":
            self.current.append("\n" if self.code else " ")
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = tag
        elif tag == "hr":
            self.add(self.prefix + "* * *")
        elif tag == "table":
            self.rows, self.right, self.header_rows = [], set(), 0
        elif tag == "a":
            self.href.append(attr.get("href"))
        elif tag == "img":
            if attr.get("alt"):
                self.current.append(f"[{attr['alt']}]")
        elif tag == "sup":
            self.current.append("^")  # a footnote mark stays one: "numbers^1"
        elif tag == "span":
            self.spans.append(attr.get("class"))
            if self.spans[-1] == "caption":
                self.flush()  # the image, then its caption on a line of its own

    def handle_endtag(self, tag: str) -> None:
        if self.rows is not None:
            self.table_end(tag)
            return
        if tag == "a" and self.href:
            href = self.href.pop()
            if href:
                self.current.append(f" ({self.link.get(href, href)})")
            return
        if tag in _BLOCKS or tag == "li":
            self.flush()
        if tag in ("ul", "ol") and self.lists:
            self.lists.pop()
        elif tag == "blockquote" and self.quotes:
            self.quotes.pop()
        elif tag == "div" and self.code:
            self.flush()
            self.code = False
        elif tag == self.heading:
            self.heading = None
        elif tag == "span" and self.spans and self.spans.pop() == "caption":
            self.flush()

    def handle_data(self, data: str) -> None:
        if self.rows is not None:
            if self.rows and self.rows[-1]:
                self.rows[-1][-1] += data
            return
        self.current.append(data.replace("\xa0", " ") if self.code else data)

    # Tables: read whole, then written as aligned columns, or one row per block.

    def table_start(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "thead":
            self.in_head = True
        elif tag == "tr":
            self.rows = (self.rows or []) + [[]]
            self.header_rows += self.in_head
        elif tag in ("th", "td") and self.rows:
            self.rows[-1].append("")
            if "text-align:right" in (dict(attrs).get("style") or ""):
                self.right.add(len(self.rows[-1]) - 1)
        elif tag == "a":
            self.href.append(dict(attrs).get("href"))
        elif tag == "br" and self.rows and self.rows[-1]:
            self.rows[-1][-1] += " "

    def table_end(self, tag: str) -> None:
        if tag == "a" and self.href:
            href = self.href.pop()
            if href and self.rows and self.rows[-1]:
                self.rows[-1][-1] += f" ({self.link.get(href, href)})"
        elif tag == "thead":
            self.in_head = False
        elif tag == "table":
            rows, self.rows = self.rows or [], None
            self.table_text([[" ".join(c.split()) for c in row] for row in rows])

    def table_text(self, rows: list[list[str]]) -> None:
        if not rows:
            return
        columns = max(len(row) for row in rows)
        rows = [row + [""] * (columns - len(row)) for row in rows]
        widths = [max(self.measure(row[i]) for row in rows) for i in range(columns)]
        room = MAX_LINE - len(self.prefix)
        # A token's value has another length than the token: such a table cannot be aligned.
        exact = all(self.measure(cell) == len(cell) for row in rows for cell in row)
        if exact and sum(widths) + 2 * (columns - 1) <= room:
            lines = [
                "  ".join(
                    cell.rjust(width) if i in self.right else cell.ljust(width)
                    for i, (cell, width) in enumerate(zip(row, widths, strict=True))
                )
                for row in rows
            ]
            if self.header_rows:
                lines.insert(self.header_rows, "  ".join("-" * w for w in widths))
            self.add("\n".join((self.prefix + x).rstrip() for x in lines))
            return
        # Too wide for aligned columns: each row on its own, every value named by its header.
        header = rows[0] if self.header_rows else [""] * columns
        for row in rows[1 if self.header_rows else 0 :]:
            self.add(
                "\n".join(
                    wrap(
                        f"{name}: {value}" if name else value,
                        first=self.prefix,
                        indent=self.prefix + "  ",
                        measure=self.measure,
                    )
                    for name, value in zip(header, row, strict=True)
                    if value
                )
            )


def _join(blocks: list[_Block]) -> str:
    """Blocks apart by a blank line; inside one blockquote, the blank line is quoted too."""
    out: list[str] = []
    for before, block in zip([None, *blocks], blocks, strict=False):
        if before is not None:
            shared = 0
            for a, b in zip(before.quotes, block.quotes, strict=False):
                if a != b:
                    break
                shared += 1
            out.append("\n" + ("> " * shared).rstrip() + "\n" if shared else "\n\n")
        out.append(block.text)
    return "".join(out)


def to_text(html_body: str, link: dict[str, str] | None = None, measure: Measure = len) -> str:
    """Plain text for ``html_body``; ``link`` maps an href to what the reader should see instead,
    ``measure`` a word to its width once tokens are filled in."""
    renderer = _TextRenderer(link or {}, measure)
    renderer.feed(html_body)
    renderer.close()
    renderer.flush()
    return _join(renderer.blocks).strip() + "\n"

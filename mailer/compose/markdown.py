"""Markdown to an HTML fragment, and an HTML fragment to readable plain text."""

from __future__ import annotations

import re
import textwrap
from html.parser import HTMLParser

from markdown_it import MarkdownIt

# Raw HTML is off: an author's stray tag must not break the MJML around it.
_md = MarkdownIt("commonmark", {"html": False, "typographer": True}).enable(
    ["table", "strikethrough", "replacements", "smartquotes"]
)


def to_html(markdown: str) -> str:
    return str(_md.render(markdown))


_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "pre", "blockquote", "table", "hr"}
_WIDTH = 72


class _TextRenderer(HTMLParser):
    """Just enough of an HTML-to-text converter for what ``to_html`` produces."""

    def __init__(self, link: dict[str, str]) -> None:
        super().__init__(convert_charrefs=True)
        self.link = link
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.lists: list[int] = []  # next number per open list; 0 for a bulleted list
        self.bullet = ""  # the marker the next block of a list item starts with
        self.quote = 0
        self.pre = 0
        self.href: list[str | None] = []
        self.heading: str | None = None

    def flush(self) -> None:
        text = "".join(self.current)
        self.current = []
        if not text.strip():
            return
        prefix = "> " * self.quote
        if self.pre:
            lines = text.rstrip("\n").split("\n")
            self.blocks.append("\n".join(prefix + "    " + line for line in lines))
            return
        text = " ".join(text.split())
        if self.heading in ("h1", "h2"):
            under = ("=" if self.heading == "h1" else "-") * min(len(text), _WIDTH)
            self.blocks.append(f"{prefix}{text}\n{prefix}{under}")
            return
        indent = prefix + "   " * len(self.lists)
        first = indent[:-3] + self.bullet if self.bullet else indent
        self.bullet = ""
        self.blocks.append(
            textwrap.fill(
                text,
                _WIDTH,
                initial_indent=first,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS or tag in ("li", "br", "tr"):
            self.flush()
        if tag in ("ul", "ol"):
            self.lists.append(0 if tag == "ul" else 1)
        elif tag == "li" and self.lists:
            number = self.lists[-1]
            self.bullet = f"{number}. ".ljust(3) if number else "*  "
            if number:
                self.lists[-1] += 1
        elif tag == "blockquote":
            self.quote += 1
        elif tag == "pre":
            self.pre += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = tag
        elif tag == "hr":
            self.blocks.append("* * *")
        elif tag == "a":
            self.href.append(dict(attrs).get("href"))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.current.append(f"[{alt}]")
        elif tag in ("td", "th") and self.current:
            self.current.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self.href:
            href = self.href.pop()
            if href:
                self.current.append(f" ({self.link.get(href, href)})")
            return
        if tag in _BLOCKS or tag in ("li", "tr"):
            self.flush()
        if tag in ("ul", "ol") and self.lists:
            self.lists.pop()
        elif tag == "blockquote":
            self.quote -= 1
        elif tag == "pre":
            self.pre -= 1
        elif tag == self.heading:
            self.heading = None

    def handle_data(self, data: str) -> None:
        self.current.append(data)


def to_text(html: str, link: dict[str, str] | None = None) -> str:
    """Plain text for ``html``; ``link`` maps an href to what the reader should see instead."""
    renderer = _TextRenderer(link or {})
    renderer.feed(html)
    renderer.close()
    renderer.flush()
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(renderer.blocks)).strip() + "\n"

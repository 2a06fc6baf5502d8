"""Compose: a Post and a publication in, the free and paid variants out, each rendered once.

Markdown → Jinja2 MJML → mjml-python → premailer → HTML; the same body → plain text; both → one
MIME message per variant with per-recipient tokens (``@@nonce:ctx:name@@``) that
``mailer.delivery.personalise`` fills in with a byte join. Everything a reader's copy needs
beyond its tokens (the preheader, the web version's link, the text part's line breaks) is
settled here, once per variant.
"""

from __future__ import annotations

import datetime as dt
import html as htmlmod
import logging
import re
import secrets
from dataclasses import dataclass
from email.utils import parseaddr

import jinja2
from markupsafe import Markup
from mjml import mjml2html
from premailer import Premailer

from mailer.compose import markdown, mime
from mailer.config import Settings
from mailer.paths import TEMPLATES
from mailer.posts import Post, slugify
from mailer.vocabulary import Variant

GMAIL_CLIP_BYTES = 102 * 1024  # Gmail shows a larger HTML part cut, behind "[Message clipped]"
_PREHEADER_CHARS = 140
_MERGE_TAG = re.compile(r"\{\{\s*(name|email)\s*\}\}")
_HREF = re.compile(r'(<a\b[^>]*?\bhref=")(https?://[^"]+)(")', re.IGNORECASE)
_URL_TOKENS = ("unsubscribe_url", "pixel_url", "view_url")
# How long a token's value gets, for wrapping the text part and sizing the HTML: a tracker URL
# ends in at most 34 characters (base64url of kind, send, reader and link numbers, and the MAC);
# names and addresses are a typical reader's.
_TOKEN_CHARS = 34
_TYPICAL = {"name": 24, "email": 32}


@dataclass(frozen=True)
class Publication:
    name: str
    postal_address: str
    site_url: str
    tracker_url: str
    from_address: str
    language: str = "en"  # a BCP 47 tag: the HTML's lang, for screen readers and hyphenation

    @classmethod
    def from_settings(cls, settings: Settings) -> Publication:
        return cls(
            name=settings.publication_name,
            postal_address=settings.postal_address,
            site_url=settings.site_url,
            tracker_url=settings.tracker_url,
            from_address=settings.from_address,
            language=settings.language,
        )


@dataclass(frozen=True)
class MessageTemplate:
    """One variant, complete but for the per-recipient tokens."""

    variant: Variant
    subject: str
    nonce: str  # makes the markers unguessable, so post text can never forge one
    html: str  # with markers, for previews and tests
    text: str
    mime: bytes  # the whole message, with markers, ready to personalise
    html_bytes: int  # the HTML part's size for a typical reader, tokens filled in

    @property
    def markers(self) -> re.Pattern[str]:
        return mime.marker_pattern(self.nonce)

    @property
    def clipped(self) -> bool:
        """Whether Gmail will clip this variant, hiding its end (footer, unsubscribe, pixel)."""
        return self.html_bytes > GMAIL_CLIP_BYTES


@dataclass(frozen=True)
class Composition:
    free: MessageTemplate
    paid: MessageTemplate
    links: tuple[str, ...]  # link_N in a template is links[N]; clicks redirect only here
    removed: tuple[str, ...]  # raw HTML and links the body's sanitising removed

    def variant(self, name: Variant) -> MessageTemplate:
        return self.free if name == "free" else self.paid

    def warnings(self) -> list[str]:
        """What the author should hear before sending: removed markup, clipped variants."""
        found = [f"removed from the post: {', '.join(self.removed)}"] if self.removed else []
        variants = (self.paid,) if self.free is self.paid else (self.free, self.paid)
        found += [
            f"the {t.variant} variant's HTML is {t.html_bytes / 1024:.0f} KB, over Gmail's "
            f"{GMAIL_CLIP_BYTES // 1024} KB limit: Gmail will clip it, hiding its end with the "
            "unsubscribe link and the open pixel"
            for t in variants
            if t.clipped
        ]
        return found


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(["j2"], default_for_string=False),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_text_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=False,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


@jinja2.pass_context
def _wrap_filter(context: jinja2.runtime.Context, text: str) -> str:
    """``{% filter wrap %}``: each line wrapped, tokens counted at their values' size."""
    return "\n".join(markdown.wrap(line, measure=context["measure"]) for line in text.split("\n"))


_text_env.filters["wrap"] = _wrap_filter
# cssutils reports every MJML vendor property it does not know; none of it is actionable.
logging.getLogger("CSSUTILS").setLevel(logging.CRITICAL)


class _Links:
    """Numbers every distinct URL across both variants, so one link table serves the send."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.numbers: dict[str, int] = {}

    def token(self, ctx: str, url: str) -> str:
        number = self.numbers.setdefault(url, len(self.numbers))
        return self.marker.format(ctx=ctx, name=f"link_{number}")

    def track_html(self, html: str) -> str:
        return _HREF.sub(
            lambda m: m.group(1) + self.token("m", htmlmod.unescape(m.group(2))) + m.group(3), html
        )


def compose(
    post: Post,
    publication: Publication,
    *,
    today: dt.date | None = None,
    subject_prefix: str = "",
) -> Composition:
    """Render both variants of ``post``; a post without a paywall has one, shared by both.

    ``subject_prefix`` marks test sends ("[Test] ") without touching the body.
    """
    nonce = secrets.token_hex(8)
    links = _Links(f"@@{nonce}:{{ctx}}:{{name}}@@")
    shared = _Shared(
        post,
        publication,
        post.date or today or dt.date.today(),
        subject_prefix + post.title,
        nonce,
        _measure(nonce, publication.tracker_url),
    )
    whole = markdown.to_html(post.body)
    paid = _variant(shared, links, "paid", whole.html)
    free = (
        paid
        if post.free_body is None
        else _variant(shared, links, "free", markdown.to_html(post.free_body).html)
    )
    urls = tuple(sorted(links.numbers, key=links.numbers.__getitem__))
    return Composition(free=free, paid=paid, links=urls, removed=whole.removed)


@dataclass(frozen=True)
class _Shared:
    """What both variants of one composition have in common."""

    post: Post
    pub: Publication
    day: dt.date
    subject: str
    nonce: str
    measure: markdown.Measure


def _measure(nonce: str, tracker_url: str) -> markdown.Measure:
    """A word's width once its tokens are filled in: a link's at most, a name's typically."""
    url = len(tracker_url) + len("/c/") + _TOKEN_CHARS
    markers = mime.marker_pattern(nonce)

    def measure(word: str) -> int:
        size = len(word)
        if "@@" not in word:  # most words: no token
            return size
        for found in markers.finditer(word):
            size += _TYPICAL.get(found.group(2), url) - len(found.group(0))
        return size

    return measure


def _variant(shared: _Shared, links: _Links, variant: Variant, body_html: str) -> MessageTemplate:
    post, pub, day, subject, nonce = (
        shared.post,
        shared.pub,
        shared.day,
        shared.subject,
        shared.nonce,
    )
    marker = links.marker
    paywall = variant == "free" and post.has_paywall

    def tokens(ctx: str) -> dict[str, str]:
        names = ("name", "email", *_URL_TOKENS)
        return {n: marker.format(ctx=ctx, name=n) for n in names}

    urls = {
        "site_url": pub.site_url,
        "subscribe_url": f"{pub.site_url}/subscribe",
        "sign_in_url": f"{pub.site_url}/sign-in",
        "manage_url": f"{pub.site_url}/account",
    }
    context = urls | {
        "post": post,
        "publication": pub,
        "date_text": f"{day:%b} {day.day}, {day:%Y}",
        "year": day.year,
        "paywall": paywall,
        "paid_post": post.has_paywall,
    }
    html_tokens = tokens("m")
    body = _MERGE_TAG.sub(lambda m: html_tokens[m.group(1)], body_html)
    # Escaped like the rest of the page, then each merge tag becomes the reader's value.
    preheader = _MERGE_TAG.sub(
        lambda m: html_tokens[m.group(1)],
        htmlmod.escape(post.preheader or _default_preheader(post, body_html)),
    )
    mjml = _env.get_template("post.mjml.j2").render(
        context | html_tokens, body_html=Markup(body), preheader=Markup(preheader)
    )
    compiled = mjml2html(mjml, disable_comments=True, fonts={}).replace(
        "<title></title>", f"<title>{htmlmod.escape(post.title)}</title>", 1
    )
    # premailer drops the doctype, without which clients render in quirks mode.
    html = "<!doctype html>\n" + links.track_html(_inline(compiled))

    text_tokens = tokens("t")
    link_text = {url: links.token("t", url) for url in _hrefs(body_html)}
    measure = shared.measure
    body_text = markdown.to_text(
        _MERGE_TAG.sub(lambda m: text_tokens[m.group(1)], body_html), link_text, measure
    )
    text = _text_env.get_template("post.txt.j2").render(
        context
        | text_tokens
        | {key: links.token("t", url) for key, url in urls.items()}
        | {"body_text": body_text, "measure": measure}
    )
    text = re.sub(r"\n{3,}", "\n\n", text)  # optional blocks leave blank runs

    header_token = {
        n: marker.format(ctx="h", name=n)
        for n in ("to", "date", "ids", "send", "unsubscribe_url", "unsubscribe_token")
    }
    from_domain = parseaddr(pub.from_address)[1].rpartition("@")[2]
    list_id = f"{slugify(pub.name) or 'newsletter'}.{from_domain}"
    headers = [
        mime.header("From", pub.from_address),
        f"To: {header_token['to']}\r\n",
        mime.header("Subject", subject),
        f"Date: {header_token['date']}\r\n",
        f"Message-ID: <{nonce}.{header_token['ids']}@{from_domain}>\r\n",
        mime.header("List-Id", f"{pub.name} <{list_id}>"),
        # RFC 8058 one-click (https) first; mailto for clients that only know RFC 2369.
        f"List-Unsubscribe: <{header_token['unsubscribe_url']}>,\r\n"
        f" <mailto:unsubscribe+{header_token['unsubscribe_token']}@{from_domain}>\r\n",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        # Gmail's Feedback Loop groups complaints by these fields: send, variant, type, sender.
        f"Feedback-ID: {header_token['send']}:{variant}:newsletter:{list_id}\r\n",
    ]
    markers = mime.marker_pattern(nonce)
    message = mime.build(headers, text, html, f"=_mailer_{nonce}", markers)
    return MessageTemplate(
        variant=variant,
        subject=subject,
        nonce=nonce,
        html=html,
        text=text,
        mime=message,
        html_bytes=len(html.encode())
        + sum(measure(m.group(0)) - len(m.group(0)) for m in markers.finditer(html)),
    )


def _inline(html: str) -> str:
    return str(
        Premailer(
            html,
            allow_network=False,  # rendering never fetches anything
            disable_validation=True,
            remove_classes=False,  # MJML's media queries select on them
            strip_important=False,
            # CSS sizes stay CSS: `height: auto` made an invalid attribute, and an image's
            # width attribute (for Outlook) is the composer's to set.
            disable_basic_attributes=["width", "height"],
            cssutils_logging_level=logging.CRITICAL,
        ).transform()
    )


def _hrefs(html: str) -> list[str]:
    return [htmlmod.unescape(u) for u in re.findall(r'<a href="(https?://[^"]+)"', html)]


def _default_preheader(post: Post, body_html: str) -> str:
    """The subtitle, else the start of the body as readers see it: merge tags are kept whole
    (never cut) for the caller to fill in, and count as a short word."""
    if post.subtitle:
        return post.subtitle
    text = htmlmod.unescape(re.sub(r"<[^>]+>", " ", body_html))
    words = _MERGE_TAG.sub(lambda m: "{{" + m.group(1) + "}}", text).split()
    kept: list[str] = []
    size = 0
    for word in words:
        size += len(_MERGE_TAG.sub("Reader", word)) + bool(kept)
        if size > _PREHEADER_CHARS - 1:
            return " ".join(kept) + "…"
        kept.append(word)
    return " ".join(kept)

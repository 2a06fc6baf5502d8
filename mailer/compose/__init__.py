"""Compose: a Post and a publication in, the free and paid variants out, each rendered once.

Markdown → Jinja2 MJML → mjml-python → premailer → HTML; the same body → plain text; both → one
MIME message per variant with per-recipient tokens (``@@nonce:ctx:name@@``) that
``mailer.delivery.personalise`` fills in with a byte join.
"""

from __future__ import annotations

import datetime as dt
import html as htmlmod
import logging
import re
import secrets
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Literal

import jinja2
from markupsafe import Markup
from mjml import mjml2html
from premailer import Premailer

from mailer.compose import markdown, mime
from mailer.config import Settings
from mailer.paths import TEMPLATES
from mailer.posts import Post, slugify

Variant = Literal["free", "paid"]
VARIANTS: tuple[Variant, ...] = ("free", "paid")

GMAIL_CLIP_BYTES = 102 * 1024
_PREHEADER_CHARS = 140
_MERGE_TAG = re.compile(r"\{\{\s*(name|email)\s*\}\}")
_HREF = re.compile(r'(<a\b[^>]*?\bhref=")(https?://[^"]+)(")', re.IGNORECASE)


@dataclass(frozen=True)
class Publication:
    name: str
    postal_address: str
    site_url: str
    tracker_url: str
    from_address: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Publication:
        return cls(
            name=settings.publication_name,
            postal_address=settings.postal_address,
            site_url=settings.site_url,
            tracker_url=settings.tracker_url,
            from_address=settings.from_address,
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

    @property
    def markers(self) -> re.Pattern[str]:
        return mime.marker_pattern(self.nonce)


@dataclass(frozen=True)
class Composition:
    free: MessageTemplate
    paid: MessageTemplate
    links: tuple[str, ...]  # link_N in a template is links[N]; clicks redirect only here

    def variant(self, name: Variant) -> MessageTemplate:
        return self.free if name == "free" else self.paid


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
        post, publication, post.date or today or dt.date.today(), subject_prefix + post.title, nonce
    )
    paid = _variant(shared, links, "paid")
    free = _variant(shared, links, "free") if post.has_paywall else paid
    urls = tuple(sorted(links.numbers, key=links.numbers.__getitem__))
    return Composition(free=free, paid=paid, links=urls)


@dataclass(frozen=True)
class _Shared:
    """What both variants of one composition have in common."""

    post: Post
    pub: Publication
    day: dt.date
    subject: str
    nonce: str


def _variant(shared: _Shared, links: _Links, variant: Variant) -> MessageTemplate:
    post, pub, day, subject, nonce = (
        shared.post,
        shared.pub,
        shared.day,
        shared.subject,
        shared.nonce,
    )
    marker = links.marker
    paywall = variant == "free" and post.has_paywall
    body_md = post.free_body if paywall and post.free_body is not None else post.body
    body_html = markdown.to_html(body_md)

    def tokens(ctx: str) -> dict[str, str]:
        names = ("name", "email", "unsubscribe_url", "pixel_url")
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
        "preheader": post.preheader or _default_preheader(post, body_html),
        "date_text": f"{day:%b} {day.day}, {day:%Y}",
        "year": day.year,
        "paywall": paywall,
        "paid_post": post.has_paywall,
    }
    html_tokens = tokens("m")
    body = _MERGE_TAG.sub(lambda m: html_tokens[m.group(1)], body_html)
    mjml = _env.get_template("post.mjml.j2").render(context | html_tokens, body_html=Markup(body))
    html = links.track_html(_inline(mjml2html(mjml, disable_comments=True, fonts={})))

    text_tokens = tokens("t")
    link_text = {url: links.token("t", url) for url in _hrefs(body_html)}
    body_text = _MERGE_TAG.sub(
        lambda m: text_tokens[m.group(1)], markdown.to_text(body_html, link_text)
    )
    text = _text_env.get_template("post.txt.j2").render(
        context
        | text_tokens
        | {key: links.token("t", url) for key, url in urls.items()}
        | {"body_text": body_text}
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
    message = mime.build(headers, text, html, f"=_mailer_{nonce}", mime.marker_pattern(nonce))
    return MessageTemplate(
        variant=variant, subject=subject, nonce=nonce, html=html, text=text, mime=message
    )


def _inline(html: str) -> str:
    return str(
        Premailer(
            html,
            allow_network=False,  # rendering never fetches anything
            disable_validation=True,
            remove_classes=False,  # MJML's media queries select on them
            strip_important=False,
            cssutils_logging_level=logging.CRITICAL,
        ).transform()
    )


def _hrefs(html: str) -> list[str]:
    return [htmlmod.unescape(u) for u in re.findall(r'<a href="(https?://[^"]+)"', html)]


def _default_preheader(post: Post, body_html: str) -> str:
    if post.subtitle:
        return post.subtitle
    text = " ".join(htmlmod.unescape(re.sub(r"<[^>]+>", " ", body_html)).split())
    return (
        text
        if len(text) <= _PREHEADER_CHARS
        else text[: _PREHEADER_CHARS - 1].rsplit(" ", 1)[0] + "…"
    )

"""The composer's structure, and personalised messages that decode to exactly what we expect."""

from __future__ import annotations

import datetime as dt
import email
import email.header
import email.policy
import html
import re
import socket
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.compose import GMAIL_CLIP_BYTES, Composition, MessageTemplate, Publication, compose
from mailer.delivery.dkim import DkimKey, DkimSigner, dns_record, generate_key
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.posts import Post, parse_post, parse_post_text
from mailer.tokens import Kind, Signer, Token

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "posts" / "the-quiet-harbour.md"
LONG = Path(__file__).parent / "data" / "long-post.md"
PUB = Publication(
    name="The Demo Dispatch",
    postal_address="1 Example Street, Springfield",
    site_url="https://example.com",
    tracker_url="https://t.example.com",
    from_address="The Demo Dispatch <news@example.com>",
)
SIGNER = Signer(["test-secret-key-0123456789"])
READERS = [
    Recipient(1, "ana@example.com", "Ana Lima"),
    Recipient(2, "zoe@example.com", "Zoë Ångström-Øberg"),
    Recipient(3, "kenji@example.jp", "山田 健二"),
    Recipient(4, "noname@example.com", None),
    Recipient(5, "quote@example.com", 'O\'Brien "<script>" & Sons'),
    # Names that fold the To header: before the address, and as encoded words.
    Recipient(6, "christopher.montgomery-richardson@uni.example.edu", "Christopher Montgomery"),
    Recipient(7, "many@example.com", 'Jane "JJ" Doe, PhD ' * 60),
    Recipient(8, "one@example.com", "x" * 1500),
    Recipient(9, "ctrl@example.com", "Ann\x00Lee\x1b[31m\x7f\x85"),  # controls: spaces
    Recipient(987654321, "long@example.com", "Ä" * 120),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Rendering must never fetch anything: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during rendering: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture(scope="module")
def sample() -> Post:
    return parse_post(SAMPLE)


@pytest.fixture(scope="module")
def composed(sample: Post) -> Composition:
    return compose(sample, PUB)


def visible_text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def plain(markdown: str) -> list[str]:
    """Distinctive phrases of each paragraph of ``markdown``, as they appear in the email."""
    phrases = []
    for para in markdown.split("\n\n"):
        words = re.sub(r"[^\w\s]", " ", re.sub(r"\]\([^)]*\)", "", para)).split()
        if len(words) >= 6:
            phrases.append(" ".join(words[1:6]))
    return phrases


def test_free_variant_stops_at_the_paywall(sample: Post, composed: Composition) -> None:
    assert sample.free_body is not None
    free_text = re.sub(r"[^\w\s]", " ", visible_text(composed.free.html))
    free_text = " ".join(free_text.split())
    below = sample.body[len(sample.free_body) :]
    for phrase in plain(sample.free_body):
        assert phrase in free_text
    assert plain(below), "the sample post has text below its marker"
    for phrase in plain(below):
        assert phrase not in free_text
        assert phrase not in " ".join(re.sub(r"[^\w\s]", " ", composed.free.text).split())


def test_free_variant_has_the_paywall_block(composed: Composition) -> None:
    text = visible_text(composed.free.html)
    assert "Keep reading with a 7-day free trial" in text
    assert (
        "Subscribe to The Demo Dispatch to keep reading this post and get 7 days of free access "
        "to the full post archives." in text
    )
    assert "Already a paid subscriber? Sign in" in text
    assert "Keep reading with a 7-day free trial" in composed.free.text
    # The button and the sign-in link go through click tracking to the site's pages.
    assert "https://example.com/subscribe" in composed.links
    assert "https://example.com/sign-in" in composed.links


def test_paid_variant_has_everything_and_no_paywall(sample: Post, composed: Composition) -> None:
    text = " ".join(re.sub(r"[^\w\s]", " ", visible_text(composed.paid.html)).split())
    for phrase in plain(sample.body):
        assert phrase in text
    assert "Keep reading with a 7-day free trial" not in text
    assert "Keep reading" not in composed.paid.text


@pytest.mark.parametrize("variant", ["free", "paid"])
def test_header_and_footer(sample: Post, composed: Composition, variant: str) -> None:
    template = composed.free if variant == "free" else composed.paid
    text = visible_text(template.html)
    assert sample.title in text and sample.author and sample.author in text
    assert sample.subtitle and sample.subtitle in text
    assert "May 17, 2024" in text
    for words in (
        "The Demo Dispatch",
        "1 Example Street, Springfield",
        "Unsubscribe",
        "Manage subscription",
        "© 2024",
    ):
        assert words in text
    assert sample.preheader and sample.preheader in template.html


@pytest.mark.parametrize("variant", ["free", "paid"])
def test_styles_are_inlined_and_nothing_is_remote(composed: Composition, variant: str) -> None:
    markup = composed.variant(variant).html  # type: ignore[arg-type]
    assert re.search(r'<p style="[^"]*margin', markup)
    assert re.search(r'<a href="[^"]*" style="[^"]*color', markup)
    assert "<link" not in markup and "@import" not in markup and "<script" not in markup
    assert "googleapis" not in markup
    # Only our own open pixel is loaded from outside; every src is a token.
    sources = re.findall(r'\bsrc="([^"]*)"', markup)
    assert sources and all(s.startswith("@@") for s in sources)
    # Responsive rules survive inlining.
    assert "@media" in markup


def test_a_post_without_paywall_has_one_variant(sample: Post) -> None:
    post = parse_post_text(
        "---\ntitle: Open Letter\n---\n\nHello [there](https://x.org).\n", "t.md"
    )
    composition = compose(post, PUB)
    assert composition.free is composition.paid
    assert "Keep reading" not in composition.paid.html


def test_long_post_stays_under_gmail_clipping() -> None:
    post = parse_post(LONG)
    assert len(post.body.split()) >= 2000
    composition = compose(post, PUB)
    personaliser = Personaliser(
        composition.paid, send_id=10**9, signer=SIGNER, tracker_url=PUB.tracker_url
    )
    body = html_part(personaliser.personalise(READERS[-1])).encode()
    assert len(body) < GMAIL_CLIP_BYTES


def html_part(message: bytes) -> str:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    part = parsed.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def to_name(message: bytes) -> str:
    """The To header's display name as RFC 2047 decoders read it, joining adjacent encoded
    words (the email package's parser puts a space between them)."""
    raw = email.message_from_bytes(message, policy=email.policy.compat32)["To"]
    if "=?" not in raw:
        parsed = email.message_from_bytes(message, policy=email.policy.default)
        return str(parsed["To"].addresses[0].display_name)
    *words, (address, _) = email.header.decode_header(raw)
    assert address.strip().startswith(b"<")
    return b"".join(word for word, _ in words).decode()


def expected(template: MessageTemplate, body: str, ctx: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        raw = values[match.group(2)]
        return html.escape(raw) if ctx == "m" else raw

    assert {m.group(1) for m in template.markers.finditer(body)} == {ctx}
    return template.markers.sub(value, body)


@pytest.mark.parametrize("variant", ["free", "paid"])
@pytest.mark.parametrize("reader", READERS, ids=lambda r: str(r.subscriber_id))
def test_personalised_message_decodes_exactly(
    composed: Composition, variant: str, reader: Recipient
) -> None:
    template = composed.variant(variant)  # type: ignore[arg-type]
    when = dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.UTC)
    personaliser = Personaliser(
        template, send_id=77, signer=SIGNER, tracker_url=PUB.tracker_url, now=when
    )
    raw = personaliser.personalise(reader)
    values = personaliser.values(reader)

    assert raw.isascii(), "QP bodies and RFC 2047 headers keep the message 7-bit"
    assert "@@" not in raw.decode()
    lines = raw.split(b"\r\n")
    assert not any(b"\n" in line or b"\r" in line for line in lines), "bare CR or LF"
    head, _, body = raw.partition(b"\r\n\r\n")
    assert max(len(line) for line in body.split(b"\r\n")) <= 76, "QP lines stay within 76"
    assert max(len(line) for line in head.split(b"\r\n")) <= 998

    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert not part.defects
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert str(parts[0].get_content()).replace("\r\n", "\n") == expected(
        template, template.text, "t", values
    )
    assert str(parts[1].get_content()).replace("\r\n", "\n") == expected(
        template, template.html, "m", values
    )

    assert message["To"].addresses[0].addr_spec == reader.email
    # Control characters become spaces, and white space is folded.
    assert to_name(raw) == " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", reader.name or "").split())
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", raw)
    to = re.search(rb"^To: .*?\r\n(?![ \t])", raw, re.MULTILINE | re.DOTALL)
    assert to is not None and max(len(line) for line in to.group().split(b"\r\n")) <= 78
    assert message["Subject"] == template.subject
    assert message["Message-ID"] == f"<{template.nonce}.77.{reader.subscriber_id}@example.com>"
    assert personaliser.message_id(reader) == message["Message-ID"]
    assert message["Date"].datetime == when
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = values["unsubscribe_token"]
    assert message["List-Unsubscribe"] == (
        f"<{values['unsubscribe_url']}>, <mailto:unsubscribe+{token}@example.com>"
    )
    assert message["List-Id"] == "The Demo Dispatch <the-demo-dispatch.example.com>"
    assert message["Feedback-ID"] == f"77:{variant}:newsletter:the-demo-dispatch.example.com"
    assert personaliser.envelope_sender(reader).endswith("@example.com")
    assert f"because {reader.email} subscribed" in " ".join(parts[0].get_content().split())


def test_tokens_name_the_send_reader_and_link(composed: Composition) -> None:
    reader = READERS[1]
    personaliser = Personaliser(
        composed.free, send_id=5, signer=SIGNER, tracker_url=PUB.tracker_url
    )
    markup = html_part(personaliser.personalise(reader))
    clicks = re.findall(r'href="https://t\.example\.com/c/([\w-]+)"', markup)
    assert clicks
    urls = set()
    for token in clicks:
        parsed = SIGNER.verify(token)
        assert parsed is not None and parsed.kind is Kind.CLICK
        assert (parsed.send_id, parsed.subscriber_id) == (5, reader.subscriber_id)
        urls.add(composed.links[parsed.link_no])
    assert "https://example.com/subscribe" in urls
    bounce = personaliser.envelope_sender(reader).split("+", 1)[1].split("@")[0]
    assert SIGNER.verify(bounce) == Token(Kind.BOUNCE, 5, reader.subscriber_id)
    pixel = re.search(r'src="https://t\.example\.com/o/([\w-]+)\.gif"', markup)
    assert pixel and SIGNER.verify(pixel.group(1)) is not None
    # Nothing in the HTML leads anywhere without going through the tracker.
    hrefs = re.findall(r'href="([^"]*)"', markup)
    assert all(h.startswith("https://t.example.com/") for h in hrefs)


def test_merge_tags_and_forged_markers() -> None:
    post = parse_post_text(
        "---\ntitle: Hello\n---\n\nDear {{ name }}, your address is {{email}}.\n\n"
        "Fake @@0000:m:email@@ stays as written.\n",
        "t.md",
    )
    composition = compose(post, PUB)
    personaliser = Personaliser(
        composition.paid, send_id=1, signer=SIGNER, tracker_url=PUB.tracker_url
    )
    markup = html_part(personaliser.personalise(Recipient(9, "a&b@example.com", "Zoë <Z>")))
    assert "Dear Zoë &lt;Z&gt;, your address is a&amp;b@example.com." in markup
    assert "Fake @@0000:m:email@@ stays as written." in markup
    fallback = html_part(personaliser.personalise(Recipient(9, "x@example.com", None)))
    assert "Dear reader," in fallback


def test_markers_never_collide_between_compositions(sample: Post) -> None:
    assert compose(sample, PUB).paid.nonce != compose(sample, PUB).paid.nonce


KEYS = [
    DkimKey("example.com", "r", generate_key()),
    DkimKey("example.com", "e", generate_key(True)),
]
WHITESPACE_LINES = [
    "Hello {{ name }},  two  spaces  and trailing ones   ",
    "\tA tab\tin\tthe middle\t",
    "    an indented code block  \t ",
    "A [link](https://example.com/a?b=c&d=e)  and **bold**\t text",
    "* an item  with  runs ",
    "   ",
    "",
    "Ends with {{ name }}",
    "{{ email }}   ",
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.sampled_from(WHITESPACE_LINES), min_size=1, max_size=12),
    name=st.one_of(st.none(), st.text(st.sampled_from(" \t\u00a0aZé-'\"<>&=?"), max_size=120)),
    tracker_url=st.sampled_from(["https://t.example.com", "https://t.example.com/x?a=b&c=d"]),
)
def test_every_signed_message_verifies_whatever_its_whitespace(
    lines: list[str], name: str | None, tracker_url: str
) -> None:
    # Each body's relaxed form is made from the template's pieces, made relaxed once, with
    # the reader's values between them; dkimpy makes it from the whole message.
    text = "\n".join(["Dear {{ name }},", *lines])
    post = parse_post_text(f"---\ntitle: Runs  of  spaces\n---\n\n{text}\n", "post.md")
    composition = compose(post, replace(PUB, tracker_url=tracker_url))
    published = {f"{n}.".encode(): v.encode() for n, v in map(dns_record, KEYS)}
    for template in (composition.free, composition.paid):
        personaliser = Personaliser(
            template, send_id=5, signer=SIGNER, tracker_url=tracker_url, dkim=DkimSigner(KEYS)
        )
        message = personaliser.personalise(Recipient(7, "ana@example.com", name))
        verifier = dkim.DKIM(message)
        assert verifier.verify(idx=0, dnsfunc=lambda n, timeout=5: published.get(n))
        assert verifier.verify(idx=1, dnsfunc=lambda n, timeout=5: published.get(n))

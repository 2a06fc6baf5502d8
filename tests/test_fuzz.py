"""Fuzzing what users and strangers send (issue 12): front matter, CSV bytes, segment
expressions, and tracker requests. Whatever comes in, the answer is a success or a clear error
(a ``MailerError``, which the CLI prints as one line), never another exception; the tracker
never answers 5xx. Examples are bounded, so the whole file runs in seconds per backend;
``FUZZ_EXAMPLES=2000`` searches longer.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import add_send, running
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from mailer import db, segments
from mailer.billing.testing import signature
from mailer.billing.webhook import handle_stripe
from mailer.errors import MailerError
from mailer.posts import parse_post
from mailer.subscribers import import_csv, manage
from mailer.tokens import Kind, Signer, Token
from mailer.tracking.app import create_app
from mailer.tracking.ingest import MemoryBuffer

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # One database per test, shared by its examples: what they leave behind is more input.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEY = "fuzz-signing-key-0123456789-0123456789"
WEBHOOK_SECRET = "whsec_fuzz_0123456789"
SIGNER = Signer([KEY])

# Front matter: YAML made of fields, values and the odd structure a careless author writes.
FIELDS = ["title", "subtitle", "author", "date", "slug", "audience", "preheader", "Title", "x"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.dates().map(str),
    st.sampled_from(["everyone", "paid", "2024-02-30", "the-slug", "Bad Slug!", "~", "[]"]),
)
yaml_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
yaml_text = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), yaml_values, max_size=6).map(
        lambda fields: "\n".join(f"{k}: {json.dumps(v, default=str)}" for k, v in fields.items())
    ),
    st.text(alphabet=st.sampled_from(list(":-[]{}?!&*|>'\"#%@` \n\tabc12")), max_size=80),
    st.text(max_size=80),
)
bodies = st.one_of(
    st.text(max_size=200),
    st.sampled_from(
        ["", "<!-- paywall -->", "a\n<!-- paywall -->\nb", "```\n<!-- paywall -->\n```"]
    ),
)


@FUZZ
@given(front=yaml_text, body=bodies, raw=st.binary(max_size=200), crlf=st.booleans())
@example(front="[a, b]: 1\ntitle: x", body="body", raw=b"", crlf=False)
@example(front="? {a: 1}\n: 2", body="body", raw=b"", crlf=False)
def test_front_matter(tmp_path: Path, front: str, body: str, raw: bytes, crlf: bool) -> None:
    text = f"---\n{front}\n---\n{body}\n"
    if crlf:
        text = text.replace("\n", "\r\n")
    path = tmp_path / "post.md"
    for data in (text.encode("utf-8", "surrogatepass"), raw, b"---\n" + raw + b"\n---\nb\n"):
        path.write_bytes(data)
        with contextlib.suppress(MailerError):
            parse_post(path, max_bytes=10_000)


# CSV: bytes as files come, near enough to CSV that the importer reads far into them.
CSV_ALPHABET = [*"emailnt,;\t\"'\r\n =+-@x.@ä\ufeff\x00", "@example.com", "email", "name,tier"]
csv_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(CSV_ALPHABET), max_size=120).map(
        lambda parts: "".join(parts).encode()
    ),
    st.lists(st.sampled_from(CSV_ALPHABET), max_size=120).map(
        lambda parts: (
            "email,name,tier,tags,status,attributes,created_at\n" + "".join(parts)
        ).encode()
    ),
)


@FUZZ
@given(data=csv_bytes, encoding=st.sampled_from([None, None, "cp1252", "utf-16", "latin-1"]))
@example(
    data=b'email,bio\nann@example.com,"' + b"x\n" * 70_000 + b'"\nbob@example.com,b\n',
    encoding=None,
)
def test_csv_bytes(engine: Engine, tmp_path: Path, data: bytes, encoding: str | None) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(data)
    try:
        result = import_csv(engine, path, rejects=tmp_path / "rejects.csv", encoding=encoding)
    except MailerError:
        return
    assert result.created + result.updated + result.rejected + result.duplicates == result.rows


# Segment expressions: the language's own words, in any order, and anything else.
WORDS = [
    "tier:", "tag:", "domain:", "joined:", "all", "AND", "OR", "NOT", "not", "(", ")", "@",
    "@paying", '"', ",", ">=", "<", "2026-01-01", "9999-12-31", "free", "paid", "gmail.com", " ",
    "  ", "\t", "x", "é", "\x00", ":",
]  # fmt: skip
expressions = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=40).map("".join),
    st.text(max_size=60),
)


@FUZZ
@given(expr=expressions)
@example(expr=" OR ".join(["tag:x"] * 1000))
@example(expr="(" * 30 + "all" + ")" * 30)
def test_segment_expressions(engine: Engine, expr: str) -> None:
    with db.session(engine) as session:
        if not segments.list_saved(session):
            segments.save(session, "paying", "tier:paid,comped")
        with contextlib.suppress(MailerError):
            assert segments.count(session, expr) >= 0


# Tracker requests: paths with and without real tokens, methods, headers and bodies; webhooks
# signed (so they reach the handler's logic) and not.
PATH_CHARS = string.ascii_letters + string.digits + "-_.~%/"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
stripe_like = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=300), st.integers(), st.none()),
        "type": st.sampled_from(
            [
                "customer.subscription.created",
                "customer.subscription.updated",
                "customer.subscription.deleted",
                "x",
            ]
        ),
        "data": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "object": st.fixed_dictionaries(
                        {
                            "status": st.sampled_from(["trialing", "active", "canceled", "x"]),
                            "trial_end": st.one_of(
                                st.integers(), st.floats(allow_nan=False), st.none()
                            ),
                            "customer": json_values,
                            "metadata": json_values,
                        }
                    ),
                    "previous_attributes": json_values,
                }
            ),
        ),
    }
)


@pytest.fixture
def tracker(engine: Engine) -> Iterator[tuple[httpx.Client, dict[Kind, str]]]:
    """A served tracker, and a real token of each kind for one reader of one send."""
    with db.session(engine) as session:
        send = add_send(session, status="done")
        reader = manage.add(session, "ann@example.com")
        session.flush()
        tokens = {kind: SIGNER.sign(Token(kind, send.id, reader.id)) for kind in Kind}

    def webhook(payload: bytes, signature: str | None) -> int:
        return handle_stripe(
            engine, payload, signature, secret=WEBHOOK_SECRET, signer=SIGNER, attribution_days=30
        )

    app = create_app(
        engine=engine,
        signer=SIGNER,
        site_url="https://news.example.com",
        buffer=MemoryBuffer(),
        flush_interval=0.05,
        stripe_webhook=webhook,
        max_body=64 * 1024,
    )
    with running(app) as client:
        yield client, tokens


@FUZZ
@given(
    route=st.sampled_from(
        ["/o/{}.gif", "/c/{}", "/u/{}", "/{}", "/webhooks/stripe", "/healthz{}", "/o/{}"]
    ),
    token=st.one_of(st.sampled_from(list(Kind)), st.text(alphabet=PATH_CHARS, max_size=40)),
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS"]),
    body=st.one_of(st.binary(max_size=300), st.just(b"List-Unsubscribe=One-Click")),
    content_type=st.sampled_from(
        [
            "",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "multipart/form-data",
            "text/plain",
        ]
    ),
    user_agent=st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=60).map(str.strip),
)
def test_tracker_requests(
    tracker: tuple[httpx.Client, dict[Kind, str]],
    route: str,
    token: Kind | str,
    method: str,
    body: bytes,
    content_type: str,
    user_agent: str,
) -> None:
    client, tokens = tracker
    text = tokens[token] if isinstance(token, Kind) else token
    headers = {"User-Agent": user_agent, "X-Forwarded-For": user_agent[:20].strip()}
    if content_type:
        headers["Content-Type"] = content_type
    answer = client.request(method, route.format(text), content=body, headers=headers)
    assert answer.status_code < 500, (route, text, answer.text)


@FUZZ
@given(event=st.one_of(stripe_like, json_values), age=st.sampled_from([0, 0, 200, 400, -200, -400]))
def test_signed_webhooks(
    tracker: tuple[httpx.Client, dict[Kind, str]], event: Any, age: int
) -> None:
    client, tokens = tracker
    if isinstance(event, dict) and isinstance(event.get("data"), dict):
        obj = event["data"].get("object")
        if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
            obj["metadata"]["mailer_ref"] = tokens[Kind.REF]
    payload = json.dumps(event)
    at = int(time.time()) - age
    answer = client.post(
        "/webhooks/stripe",
        content=payload.encode(),
        headers={"Stripe-Signature": signature(payload, WEBHOOK_SECRET, at=at)},
    )
    assert answer.status_code in (200, 400), (payload, answer.status_code)
    assert -300 <= age <= 300 or answer.status_code == 400

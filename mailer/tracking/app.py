"""The tracker: open pixels, tracked links, one-click unsubscribes, web versions, Stripe webhooks.

Opens and clicks never wait on the database: the answer goes out first, then the event is
appended to the buffer, and a ``Flusher`` started with the app writes it in the background.
A token that does not verify, or names another route's kind, gets a plain 404 and records
nothing. ``create_app`` takes everything it needs as arguments; it reads no settings.

Nothing a client sends is held without a bound: a POST announcing a body over ``max_body`` is
answered 413 before any of it is read, and a body sent without a length is cut off there; a
few webhooks are handled at once per process, the others are asked to come back (503). The
cap on headers is the protocol's (``mailer.tracking.http``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.parser import BytesParser
from email.policy import HTTP
from typing import Literal
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from redis import RedisError
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mailer import db
from mailer.db.models import LinkRow
from mailer.errors import MailerError, reason
from mailer.subscribers import unsubscribe_by_id
from mailer.tokens import PREVIEW_SEND_ID, Kind, Signer, Token
from mailer.tracking.ingest import Buffer, Event, EventKind, Flusher
from mailer.tracking.webview import WebVersions

log = logging.getLogger(__name__)

StripeWebhook = Callable[[bytes, str | None], int]  # (payload, Stripe-Signature) → HTTP status

# A transparent 1x1 GIF: the smallest image every mail client renders.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
NO_STORE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
# Our pages load nothing, embed nothing and post only to themselves.
PAGE_HEADERS = NO_STORE | {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
}
# A web version shows the post's images, from wherever its author put them; nothing else loads.
VIEW_HEADERS = PAGE_HEADERS | {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src https: http:"
}
ONE_CLICK = ("List-Unsubscribe", "One-Click")  # RFC 8058
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
MAX_FORM_BYTES = 8192
MAX_BODY = 1024 * 1024  # MAILER_TRACKER_MAX_BODY's default
# Webhooks handled at once per process, each holding up to max_body: beyond, 503 and Stripe
# delivers the event again later.
WEBHOOK_CONCURRENCY = 4
LINK_CACHE_SENDS = 256

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font:17px/1.5 system-ui,sans-serif;max-width:32em;margin:4em auto;padding:0 1em}}
button{{font:inherit;padding:.5em 1.2em;cursor:pointer}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""
CONFIRM_PAGE = _PAGE.format(
    title="Unsubscribe",
    body=(
        "<p>Stop receiving this newsletter?</p>"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
    ),
)
DONE_PAGE = _PAGE.format(
    title="You are unsubscribed", body="<p>You will not receive this newsletter again.</p>"
)


def _not_found() -> Response:
    return PlainTextResponse("not found\n", status_code=404)


class _Links:
    """Each send's links, read once and kept for the most recent ``size`` sends."""

    def __init__(self, engine: Engine, size: int = LINK_CACHE_SENDS) -> None:
        self._engine = engine
        self._size = size
        self._sends: OrderedDict[int, Mapping[int, str]] = OrderedDict()

    async def url(self, send_id: int, link_no: int) -> str | None:
        links = self._sends.get(send_id)
        if links is None:
            links = await run_in_threadpool(self._load, send_id)
            self._sends[send_id] = links
            if len(self._sends) > self._size:
                self._sends.popitem(last=False)
        else:
            self._sends.move_to_end(send_id)
        return links.get(link_no)

    def _load(self, send_id: int) -> Mapping[int, str]:
        with db.session(self._engine) as session:
            rows = session.execute(
                select(LinkRow.link_no, LinkRow.url).where(LinkRow.send_id == send_id)
            )
            return {link_no: url for link_no, url in rows}


class Tracker:
    """The request handlers, with what they share."""

    def __init__(
        self,
        engine: Engine,
        signer: Signer,
        site_url: str,
        buffer: Buffer,
        *,
        trust_proxy: bool = False,
    ) -> None:
        self.engine = engine
        self.signer = signer
        self.buffer = buffer
        self.trust_proxy = trust_proxy
        self.links = _Links(engine)
        self._subscribe = urlsplit(site_url.rstrip("/") + "/subscribe")

    def token(self, request: Request, kind: Kind) -> Token | None:
        return self.verify(request.path_params["token"], kind)

    def verify(self, text: str, kind: Kind) -> Token | None:
        token = self.signer.verify(text)
        if token is None or token.kind != kind or token.send_id == PREVIEW_SEND_ID:
            return None
        return token

    def event(
        self,
        scope: Scope,
        kind: EventKind,
        token: Token,
        *,
        link_no: int | None = None,
        pending_unsubscribe: bool = False,
    ) -> Event:
        user_agent = forwarded = ""
        for name, value in scope["headers"]:
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded = value.decode("latin-1")
        return Event(
            kind=kind,
            send_id=token.send_id,
            subscriber_id=token.subscriber_id,
            at=time.time(),
            user_agent=user_agent,
            ip=self.client_ip(scope, forwarded),
            link_no=link_no,
            pending_unsubscribe=pending_unsubscribe,
        )

    def client_ip(self, scope: Scope, forwarded: str) -> str | None:
        if forwarded and self.trust_proxy:
            first = forwarded.split(",", 1)[0].strip()
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(first))
        client = scope.get("client")
        return str(client[0]) if client else None

    async def click(self, request: Request) -> Response:
        token = self.token(request, Kind.CLICK)
        if token is None:
            return _not_found()
        try:
            url = await self.links.url(token.send_id, token.link_no)
        except SQLAlchemyError as exc:
            log.warning("cannot read links of send %d: %s", token.send_id, exc)
            return PlainTextResponse("try again shortly\n", 503, {"Retry-After": "5"})
        if url is None:
            return _not_found()
        if self.is_subscribe_page(url):
            ref = self.signer.sign(Token(Kind.REF, token.send_id, token.subscriber_id))
            url = with_query(url, mailer_ref=ref)
        self.buffer.put(self.event(request.scope, "click", token, link_no=token.link_no))
        return RedirectResponse(url, 302, headers=NO_STORE)

    def is_subscribe_page(self, url: str) -> bool:
        parts = urlsplit(url)
        site = self._subscribe
        return (parts.scheme, parts.netloc) == (site.scheme, site.netloc) and (
            parts.path == site.path or parts.path.startswith(site.path + "/")
        )

    async def confirm(self, request: Request) -> Response:
        if self.token(request, Kind.UNSUBSCRIBE) is None:
            return _not_found()
        return HTMLResponse(CONFIRM_PAGE, headers=PAGE_HEADERS)

    async def unsubscribe(self, request: Request) -> Response:
        token = self.token(request, Kind.UNSUBSCRIBE)
        if token is None:
            return _not_found()
        form = await read_body(request, MAX_FORM_BYTES) or b""  # larger: no one-click form
        if not one_click(request.headers.get("content-type", ""), form):
            return PlainTextResponse("expected List-Unsubscribe=One-Click\n", 400)
        outcome = await run_in_threadpool(self.unsubscribe_now, token.subscriber_id)
        if outcome == "erased":
            return HTMLResponse(DONE_PAGE, headers=PAGE_HEADERS)
        event = self.event(
            request.scope, "unsubscribe", token, pending_unsubscribe=outcome == "later"
        )
        try:
            await self.buffer.append(event)
        except MailerError as exc:
            # Done already, the event was only a record; left for later, it was the request.
            log.warning("unsubscribe event of reader %d lost: %s", token.subscriber_id, exc)
            if outcome == "later":
                return PlainTextResponse("try again shortly\n", 503, {"Retry-After": "30"})
        return HTMLResponse(DONE_PAGE, headers=PAGE_HEADERS)

    def unsubscribe_now(self, subscriber_id: int) -> Literal["done", "erased", "later"]:
        try:
            with db.session(self.engine) as session:
                return "done" if unsubscribe_by_id(session, subscriber_id) else "erased"
        except SQLAlchemyError as exc:
            log.warning("unsubscribe of reader %d left to the flusher: %s", subscriber_id, exc)
            return "later"


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is longer than ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body carries List-Unsubscribe=One-Click (RFC 8058 allows both forms)."""
    if content_type.lower().startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        message = BytesParser(policy=HTTP).parsebytes(head + body)
        return any(
            part.get_param("name", header="content-disposition") == ONE_CLICK[0]
            and part.get_payload(decode=True) == ONE_CLICK[1].encode()
            for part in message.iter_parts()
        )
    fields = parse_qs(body.decode("latin-1"))
    return fields.get(ONE_CLICK[0]) == [ONE_CLICK[1]]


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query (any of the same names replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))


class _PixelFirst:
    """Answers ``GET /o/{token}.gif`` (and HEAD) straight from the ASGI scope; the rest goes to
    ``app``. The pixel is nearly all of the traffic, and Starlette's routing, request and
    response objects cost more than the rest of its work (about half the requests per
    second)."""

    def __init__(self, tracker: Tracker, app: ASGIApp) -> None:
        self.tracker = tracker
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if not (
            scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")  # the server leaves out a HEAD's body
            and path.startswith("/o/")
            and path.endswith(".gif")
        ):
            await self.app(scope, receive, send)
            return
        token = self.tracker.verify(path[3:-4], Kind.OPEN)
        if token is None:
            await _not_found()(scope, receive, send)
            return
        self.tracker.buffer.put(self.tracker.event(scope, "open", token))
        await send(_PIXEL_START)
        await send(_PIXEL_BODY)


_PIXEL_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"image/gif"),
        (b"content-length", str(len(PIXEL)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in NO_STORE.items()),
    ],
}
_PIXEL_BODY = {"type": "http.response.body", "body": PIXEL}


class _BodyLimit:
    """413 to a POST announcing a body over ``limit`` bytes, before any of it is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            for name, value in scope["headers"]:
                if name != b"content-length":
                    continue
                if not value.isdigit():  # httptools refuses these first; another server may not
                    answer = PlainTextResponse("bad Content-Length\n", status_code=400)
                    await answer(scope, receive, send)
                    return
                if len(value) > 18 or int(value) > self.limit:  # a length of 19+ digits: absurd
                    await _too_large()(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _too_large() -> Response:
    return PlainTextResponse("request body too large\n", status_code=413)


def create_app(
    *,
    engine: Engine,
    signer: Signer,
    site_url: str,
    buffer: Buffer,
    flush_interval: float | None = 1.0,
    stripe_webhook: StripeWebhook | None = None,
    trust_proxy: bool = False,
    metrics: Callable[[], bytes] | None = None,
    metrics_token: str = "",
    max_body: int = MAX_BODY,
    tracker_url: str | None = None,
) -> ASGIApp:
    """The tracker as an ASGI app.

    Unless ``flush_interval`` is None (a separate process writes the buffer), its lifespan
    runs a ``Flusher`` writing ``buffer`` to ``engine`` every ``flush_interval`` seconds. At
    shutdown it stores what requests queued, and the flusher writes once more.
    ``stripe_webhook(payload, signature)`` answers ``POST /webhooks/stripe`` (in a thread);
    without it the route does not exist. ``trust_proxy``: take the client address from
    X-Forwarded-For (its first address). ``metrics()`` answers ``GET /metrics`` (in a thread),
    to requests bearing ``metrics_token`` if it is set. A request body over ``max_body``
    bytes gets 413. ``tracker_url``, the tracker's public URL (its links in a web version lead
    there), enables ``GET /v/TOKEN``, the web version.
    """
    tracker = Tracker(engine, signer, site_url, buffer, trust_proxy=trust_proxy)
    routes = [
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", _readiness(engine, buffer), methods=["GET"]),
        Route("/c/{token}", tracker.click, methods=["GET"]),
        Route("/u/{token}", tracker.confirm, methods=["GET"]),
        Route("/u/{token}", tracker.unsubscribe, methods=["POST"]),
    ]
    if stripe_webhook is not None:
        routes.append(
            Route("/webhooks/stripe", _webhook(stripe_webhook, max_body), methods=["POST"])
        )
    if metrics is not None:
        routes.append(Route("/metrics", _metrics(metrics, metrics_token), methods=["GET"]))
    if tracker_url is not None:
        pages = WebVersions(engine, signer, tracker_url)
        routes.append(Route("/v/{token}", _view(tracker, pages), methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        flusher = None
        if flush_interval is not None:
            flusher = asyncio.create_task(Flusher(engine, buffer).run(flush_interval, stop))
        try:
            yield
        finally:
            await buffer.aclose()  # stores what requests queued...
            stop.set()
            if flusher is not None:
                await flusher  # ...for the flusher's last round to write

    return _PixelFirst(tracker, _BodyLimit(Starlette(routes=routes, lifespan=lifespan), max_body))


async def _healthz(request: Request) -> Response:
    """Alive: this process answers."""
    return PlainTextResponse("ok", headers=NO_STORE)


def _readiness(engine: Engine, buffer: Buffer) -> Callable[[Request], Awaitable[Response]]:
    """Ready: the database and the event buffer (Redis) answer; 503 names what did not."""

    def check() -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            with engine.connect() as conn:
                conn.execute(select(1))
            found["database"] = "ok"
        except SQLAlchemyError as exc:
            found["database"] = reason(exc)
        try:
            buffer.backlog()
            found["redis"] = "ok"
        except MailerError as exc:
            found["redis"] = reason(exc)
        return found

    async def readyz(request: Request) -> Response:
        found = await run_in_threadpool(check)
        ready = all(state == "ok" for state in found.values())
        return JSONResponse(
            {"ready": ready, "checks": found}, status_code=200 if ready else 503, headers=NO_STORE
        )

    return readyz


def _metrics(render: Callable[[], bytes], token: str) -> Callable[[Request], Awaitable[Response]]:
    expected = f"Bearer {token}".encode()

    async def metrics(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if token and not hmac.compare_digest(given, expected):
            return PlainTextResponse("a bearer token is required", status_code=401)
        try:
            body = await run_in_threadpool(render)
        except (MailerError, SQLAlchemyError, RedisError) as exc:
            return PlainTextResponse(f"metrics unavailable: {reason(exc)}", status_code=503)
        return Response(body, media_type=PROMETHEUS_TEXT, headers=NO_STORE)

    return metrics


def _view(tracker: Tracker, pages: WebVersions) -> Callable[[Request], Awaitable[Response]]:
    async def view(request: Request) -> Response:
        token = tracker.token(request, Kind.VIEW)
        if token is None:
            return _not_found()
        try:
            page = await pages.page(token.send_id, token.subscriber_id)
        except SQLAlchemyError as exc:
            log.warning("cannot read send %d for its web version: %s", token.send_id, exc)
            return PlainTextResponse("try again shortly\n", 503, {"Retry-After": "5"})
        if page is None:
            return _not_found()
        # The reader opened their copy: an open, classified like the pixel's.
        tracker.buffer.put(tracker.event(request.scope, "open", token))
        return HTMLResponse(page, headers=VIEW_HEADERS)

    return view


def _webhook(handle: StripeWebhook, max_body: int) -> Callable[[Request], Awaitable[Response]]:
    slots = asyncio.Semaphore(WEBHOOK_CONCURRENCY)

    async def stripe(request: Request) -> Response:
        if slots.locked():  # taken before the body is read: a waiting request holds no body
            return PlainTextResponse("busy, try again shortly\n", 503, {"Retry-After": "10"})
        async with slots:
            payload = await read_body(request, max_body)
            if payload is None:
                return _too_large()
            signature = request.headers.get("stripe-signature")
            status = await run_in_threadpool(handle, payload, signature)
        return Response(status_code=status)

    return stripe

"""The web version of a message ("View in browser"): what the reader was sent, as a page.

The tracker serves it at ``GET /v/TOKEN``. The page is the HTML part of the variant the ledger
says this reader got (the paywall for a free reader), read back from the send's stored template,
with the reader's own values filled in as in their copy: merge tags, tracked links and the
unsubscribe link. It leaves out the open pixel (the request itself is the open) and the link to
itself. Nothing is rendered again: a send's template is decoded once per variant and kept.
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import Engine, select
from starlette.concurrency import run_in_threadpool

from mailer import db
from mailer.compose import mime
from mailer.db.models import DeliveryRow, SendVariantRow, SubscriberRow
from mailer.delivery.ledger import StoredTemplate
from mailer.delivery.personalise import Personaliser, Recipient
from mailer.tokens import Signer
from mailer.vocabulary import Variant

CACHED_VARIANTS = 64


@dataclass(frozen=True)
class Page:
    """One variant of a send as a page: literal pieces with token names between them."""

    pieces: tuple[str, ...]  # literal HTML at even positions, token names at odd ones
    personaliser: Personaliser

    @classmethod
    def of(cls, template: StoredTemplate, personaliser: Personaliser) -> Page:
        markup = mime.part(template.mime, "html")
        token = f"@@{template.nonce}:m:{{}}@@"
        markup = re.sub(rf"<img\b[^>]*{re.escape(token.format('pixel_url'))}[^>]*>", "", markup)
        markup = re.sub(
            rf"<a\b[^>]*{re.escape(token.format('view_url'))}[^>]*>.*?</a>", "", markup, flags=re.S
        )
        return cls(tuple(re.split(f"@@{template.nonce}:m:([a-z0-9_]+)@@", markup)), personaliser)

    def render(self, reader: Recipient) -> str:
        values = self.personaliser.values(reader)
        out = list(self.pieces)
        out[1::2] = [html.escape(values[name]) for name in self.pieces[1::2]]
        return "".join(out)


class WebVersions:
    """Pages for ``GET /v/TOKEN``: each send's variants are read once and kept for a while."""

    def __init__(self, engine: Engine, signer: Signer, tracker_url: str) -> None:
        self._engine = engine
        self._signer = signer
        self._tracker_url = tracker_url
        self._pages: OrderedDict[tuple[int, Variant], Page] = OrderedDict()

    async def page(self, send_id: int, subscriber_id: int) -> str | None:
        """This reader's page; None if they were not part of the send (or are erased since)."""
        found = await run_in_threadpool(self._reader, send_id, subscriber_id)
        if found is None:
            return None
        variant, reader = found
        key = (send_id, variant)
        page = self._pages.get(key)
        if page is None:
            page = await run_in_threadpool(self._load, send_id, variant)
            self._pages[key] = page
            if len(self._pages) > CACHED_VARIANTS:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(key)
        return page.render(reader)

    def _reader(self, send_id: int, subscriber_id: int) -> tuple[Variant, Recipient] | None:
        with db.session(self._engine) as session:
            found = session.execute(
                select(DeliveryRow.variant, SubscriberRow.email, SubscriberRow.name)
                .join(SubscriberRow, SubscriberRow.id == DeliveryRow.subscriber_id)
                .where(DeliveryRow.send_id == send_id, DeliveryRow.subscriber_id == subscriber_id)
            ).one_or_none()
        if found is None:
            return None
        variant, email, name = found
        return variant, Recipient(subscriber_id, email, name)

    def _load(self, send_id: int, variant: Variant) -> Page:
        with db.session(self._engine) as session:
            nonce, template = session.execute(
                select(SendVariantRow.nonce, SendVariantRow.template).where(
                    SendVariantRow.send_id == send_id, SendVariantRow.variant == variant
                )
            ).one()
        stored = StoredTemplate(nonce, template)
        personaliser = Personaliser(
            stored, send_id=send_id, signer=self._signer, tracker_url=self._tracker_url
        )
        return Page.of(stored, personaliser)

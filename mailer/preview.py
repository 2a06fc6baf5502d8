"""Previews: one variant, personalised for a sample reader, as the reader's client decodes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from mailer.delivery.personalise import Personaliser, Recipient
from mailer.tokens import PREVIEW_SEND_ID, Signer
from mailer.vocabulary import Variant

if TYPE_CHECKING:
    from mailer.compose import Composition

Format = Literal["html", "text", "eml"]
SAMPLE_READER = Recipient(subscriber_id=0, email="reader@example.com", name="Sample Reader")


def render_preview(
    composition: Composition,
    variant: Variant,
    fmt: Format,
    *,
    signer: Signer,
    tracker_url: str,
    reader: Recipient = SAMPLE_READER,
) -> bytes:
    """The bytes of the preview: the whole message for ``eml``, else the decoded part."""
    # Here: SAMPLE_READER is the `mailer preview` options' default, shown by --help, which
    # must not load mailer.compose (premailer).
    from mailer.compose import mime

    personaliser = Personaliser(
        composition.variant(variant),
        send_id=PREVIEW_SEND_ID,
        signer=signer,
        tracker_url=tracker_url,
    )
    message = personaliser.personalise(reader)
    if fmt == "eml":
        return message
    # Decode it back as a mail client would, so the preview shows what readers get.
    return mime.part(message, "html" if fmt == "html" else "plain").encode("utf-8")

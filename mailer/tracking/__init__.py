"""The tracker: what readers' mail clients fetch, and what becomes of it.

``app`` answers the open pixel, tracked links, unsubscribes, the web version (``webview``) and
Stripe's webhooks (handled by ``mailer.billing``), checking tokens with ``mailer.tokens``;
``classify`` tells a person's open from a machine's; ``ingest`` buffers the events in Redis
and writes them to the database in batches; ``http`` caps request headers in uvicorn.
"""

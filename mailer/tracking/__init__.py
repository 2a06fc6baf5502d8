"""Tracking: the tracker's HTTP side (opens, clicks, unsubscribes, web versions, webhooks).

The tokens it checks are signed by ``mailer.tokens``; Stripe's webhooks are handled by
``mailer.billing``.
"""

"""Billing: which send earned a reader's trial, conversion or cancellation.

``webhook`` handles Stripe's signed events; ``attribution`` credits a tier change to a send
and records it, for the webhook and ``mailer subscribers set-tier`` alike; ``testing`` makes
signed events as Stripe sends them, for the tests and the demo. Import them by
name: ``set-tier`` needs no Stripe library.
"""

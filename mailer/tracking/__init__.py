"""Tracking: signed tokens for opens, clicks and unsubscribes."""

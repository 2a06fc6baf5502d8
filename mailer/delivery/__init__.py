"""Delivery: personalise composed messages and hand them to SMTP."""

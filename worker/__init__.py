"""Celery workers: thin tasks that take ids and call the library (which knows nothing of Celery)."""

"""Celery workers: thin tasks that take ids and call the library (which knows nothing of Celery).

``celery = app`` lets ``celery -A worker`` find the app as well as ``celery -A worker.app``.
"""

from worker.app import app as celery

__all__ = ["celery"]

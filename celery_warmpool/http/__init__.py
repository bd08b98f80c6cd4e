"""The HTTP front door of warm pools: ``create_app(warm)`` and ``celery warmpool serve``.

Needs the ``http`` extra (``pip install 'celery-warmpool[http]'``): FastAPI on Starlette,
uvicorn, sse-starlette.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]

"""The worker and beat entry point: ``celery -A services.celery_app worker|beat``.

Configuration is read and validated here, once, at import: a bad value stops start-up with a
message naming the variable instead of a traceback from deep inside Celery.
"""

from __future__ import annotations

import sys

from services.application import ServiceApp, create_app
from services.config import ConfigError, load_settings

try:
    settings = load_settings()
except ConfigError as exc:
    print(f"celery service: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app: ServiceApp = create_app(settings)

__all__ = ["app", "settings"]

#!/usr/bin/env bash
# Starts Flower, the Celery monitor, behind basic auth. Flower reads FLOWER_BASIC_AUTH
# ("user:password") from the environment itself, so the secret never appears on a command line.
set -euo pipefail

: "${FLOWER_BASIC_AUTH:?FLOWER_BASIC_AUTH must be user:password (set FLOWER_USER and FLOWER_PASSWORD in .env)}"
exec celery -A services.celery_app flower --address=0.0.0.0 --port="${FLOWER_PORT:-5555}" "$@"

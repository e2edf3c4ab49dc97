#!/usr/bin/env bash
# Starts Flower, the Celery monitor, behind basic auth. Flower reads FLOWER_BASIC_AUTH
# ("user:password") from the environment itself, so the secret never appears on a command line.
# FLOWER_BASIC_AUTH_FILE (a Compose secret, /run/secrets/flower_basic_auth) is read into this
# process's environment only, never the container's (`docker inspect` shows the path alone).
set -euo pipefail

if [[ -n ${FLOWER_BASIC_AUTH_FILE:-} ]]; then
  if [[ -n ${FLOWER_BASIC_AUTH:-} ]]; then
    echo "start-flower: FLOWER_BASIC_AUTH and FLOWER_BASIC_AUTH_FILE are both set: expected only one" >&2
    exit 64
  fi
  FLOWER_BASIC_AUTH=$(<"$FLOWER_BASIC_AUTH_FILE")
  export FLOWER_BASIC_AUTH
  unset FLOWER_BASIC_AUTH_FILE
fi
: "${FLOWER_BASIC_AUTH:?FLOWER_BASIC_AUTH must be user:password (set FLOWER_USER and FLOWER_PASSWORD in .env)}"
exec celery -A services.celery_app flower --address=0.0.0.0 --port="${FLOWER_PORT:-5555}" "$@"

#!/usr/bin/env bash
# Starts the one Celery beat of the stack. Its schedule state lives on a volume so that a restart
# neither repeats nor forgets runs. Never run more than one (periodic tasks would run twice).
set -euo pipefail

state_dir=${BEAT_STATE_DIR:-/var/lib/celery-beat}
pidfile=${BEAT_PIDFILE:-/tmp/celerybeat.pid}
# A container restart keeps /tmp, and PIDs restart from 1: an old pidfile could name a live
# process and make beat refuse to start. This container runs one beat, so the old file is stale.
rm -f "$pidfile"
exec celery -A services.celery_app beat --schedule "$state_dir/schedule" --pidfile "$pidfile" \
  --loglevel "${LOG_LEVEL:-INFO}" "$@"

#!/usr/bin/env bash
# Starts one Celery worker that consumes exactly one queue. The pool and concurrency come from the
# compose service, so each queue gets the pool that suits its work. `exec` so that Celery's main
# process receives SIGTERM from tini (PID 1) and does a warm shutdown: running tasks finish.
set -euo pipefail

: "${WORKER_QUEUE:?WORKER_QUEUE must name the one queue this worker consumes}"
pool=${WORKER_POOL:-prefork}
case "$pool" in
  prefork | threads | solo) ;;
  *) echo "start-worker: WORKER_POOL='$pool' is not one of prefork, threads, solo" >&2; exit 64 ;;
esac
args=(-A services.celery_app worker -Q "$WORKER_QUEUE" --pool "$pool" -n "${WORKER_QUEUE}@%h"
      --loglevel "${LOG_LEVEL:-INFO}")
if [[ -n ${WORKER_CONCURRENCY:-} ]]; then
  if ! [[ $WORKER_CONCURRENCY =~ ^[1-9][0-9]*$ ]]; then
    echo "start-worker: WORKER_CONCURRENCY='$WORKER_CONCURRENCY' is not a positive integer" >&2
    exit 64
  fi
  args+=(--concurrency "$WORKER_CONCURRENCY")
fi
# A stale heartbeat from a previous run of this container must not count as healthy.
rm -f "${WORKER_HEARTBEAT_FILE:-/tmp/celery-worker.heartbeat}"
exec celery "${args[@]}" "$@"

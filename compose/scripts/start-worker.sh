#!/usr/bin/env bash
# Starts one Celery worker that consumes exactly one queue. The pool and concurrency come from the
# compose service, so each queue gets the pool that suits its work. `exec` so that Celery's main
# process receives SIGTERM from tini (PID 1) and does a warm shutdown: running tasks finish.
#
# Started for a cold start: a replica the scaler adds should consume within about a second
# (docs/benchmarks.md, "Cold start"). So the worker starts through services.worker (Celery's own
# `worker` command without the umbrella `celery` command's imports: same options), and with
#   --without-mingle  no 1 s wait at every start for other workers to share their revoked task ids
#                     and logical clocks: nothing here revokes tasks (docs/celery-settings.md);
#   --without-gossip  no subscription to every other worker's heartbeats and events: nothing here
#                     uses Celery's gossip (leader election, node join/leave callbacks).
# Workers still send heartbeats and task events (Flower, the scaler) and answer control commands
# (ping, inspect, add_consumer, cancel_consumer).
set -euo pipefail

: "${WORKER_QUEUE:?WORKER_QUEUE must name the one queue this worker consumes}"
pool=${WORKER_POOL:-prefork}
case "$pool" in
  prefork | threads | solo) ;;
  *) echo "start-worker: WORKER_POOL='$pool' is not one of prefork, threads, solo" >&2; exit 64 ;;
esac
args=(-Q "$WORKER_QUEUE" --pool "$pool" -n "${WORKER_QUEUE}@%h" --loglevel "${LOG_LEVEL:-INFO}"
      --without-mingle --without-gossip)
if [[ -n ${WORKER_CONCURRENCY:-} ]]; then
  if ! [[ $WORKER_CONCURRENCY =~ ^[1-9][0-9]*$ ]]; then
    echo "start-worker: WORKER_CONCURRENCY='$WORKER_CONCURRENCY' is not a positive integer" >&2
    exit 64
  fi
  args+=(--concurrency "$WORKER_CONCURRENCY")
fi
# A stale heartbeat from a previous run of this container must not count as healthy.
rm -f "${WORKER_HEARTBEAT_FILE:-/tmp/celery-worker.heartbeat}"
exec python -m services.worker "${args[@]}" "$@"

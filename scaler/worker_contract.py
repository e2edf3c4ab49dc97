"""The names a worker and the scaler must agree on, written once on the scaler's side.

The scaler runs beside any Celery project and imports nothing of it; what it needs from a worker
is a handful of names. The stack's worker-side modules that must stay self-contained (they are
copied alone into test images: ``services.warm_start``, ``services.ownership``) keep their own
literal, and ``tests/services/test_worker_contract.py`` checks each equals the one here; the
rest import it from here. docs/adopting.md says what each buys a project and what is lost
without it.
"""

from __future__ import annotations

# Set to 1 on a replica the scaler starts for its warm pool: the worker boots consuming nothing
# (services.warm_start) until the scaler promotes it with add_consumer.
WARM_START_ENV = "WORKER_WARM_START"

# The Celery control command a worker answers with its CPU and memory (services.resource_report):
# the only way to read a replica's figures on another Swarm node.
RESOURCE_COMMAND = "resource_usage"

# kombu transport option naming the hash of unacked messages' holders (services.ownership):
# a dead worker's tasks go back at once instead of after the visibility timeout.
OWNER_KEY = "unacked_owner"

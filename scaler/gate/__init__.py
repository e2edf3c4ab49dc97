"""The engine gate: the only holder of the Docker socket, offering exactly the scaler's operations.

Each operation is bounded to the managed workers (``autoscale.managed=true`` and the gate's own
Compose project or Swarm stack label); everything else is refused with a 4xx naming it, logged and
counted. No request body written by a caller reaches the engine: the gate composes every engine
request from the engine's own state and its fixed rules (``rules``, ``clone``). ``app`` is the
route table, ``engine`` the connection to the socket; ``python -m scaler.gate`` serves it.
Docs: docs/security.md (issue 19).
"""

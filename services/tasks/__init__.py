"""Task families, one module per routing prefix (``tasks.<family>.<name>``).

Every task that does work writes its effect once per task id (services.effects.apply_once) and
returns a JSON dict with at least task_id, hostname, worker and queue.
"""

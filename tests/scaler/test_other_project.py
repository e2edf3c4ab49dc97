"""The scaler on a Celery project that is not this stack's (issue 23: "the scaler on any Celery
project"): its own app module (tests/scaler/fixtures/other_project/shop.py), its own queue and key
prefix, none of ``services``. A ``services`` package that raises on import is put first on the
path, so the scaler and the workers it starts would fail at once if either imported it.

The scaler runs as an operator would run it beside their project: ``scaler run --backend local
--app shop:app`` with a policy naming the project's queue. A backlog scales the service up, every
task runs, and it goes back to its minimum once idle."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path
from typing import cast

import pytest
import redis
from scaler_runs import start_scaler_run, stop_workers
from support.polling import poll_until

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).parent / "fixtures" / "other_project"


def test_the_scaler_scales_another_projects_workers_without_services(
    redis_url: str, tmp_path: Path
) -> None:
    prefix = f"shop{uuid.uuid4().hex[:6]}:"
    trap = tmp_path / "trap" / "services"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text("raise ImportError('this process imported services')\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""\
        interval_s: 1.0
        host: {cpu_percent: 100, memory_percent: 100}  # a busy CI machine must not hold it
        defaults:
          min_replicas: 1
          max_replicas: 3
          target: {tasks_per_replica: 4}
          scale_up: {stabilization_s: 0, cooldown_s: 2}
          scale_down: {stabilization_s: 3, cooldown_s: 2}
        services:
          shop-orders:
            queues: [orders]
        """))  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(trap.parent), str(PROJECT)]),
        "SHOP_BROKER_URL": redis_url,
        "SHOP_PREFIX": prefix,
    }
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "SCALER_REDIS_URL", "DATABASE_URL"):
        env.pop(name, None)
    client = redis.Redis.from_url(redis_url)
    workdir = tmp_path / "workers"
    # Run from the project's directory, not this repository's: `python -m` puts the working
    # directory first on the path, where this repository's own `services` would be found.
    run = start_scaler_run("shop", policy, workdir, tmp_path, env, "--app", "shop:app",
                           "--no-leader-election", cwd=tmp_path)  # fmt: skip

    def replicas() -> int:
        if run.proc.poll() is not None:  # an import of services, or anything else, ended it
            raise AssertionError(f"the scaler exited: {run.log_file.read_text()[-3000:]}")
        return int(run.service("shop-orders").get("current") or 0)

    try:
        poll_until(lambda: replicas() == 1,
                   "the minimum of one worker", 60)  # fmt: skip
        sys.path.insert(0, str(PROJECT))
        os.environ["SHOP_BROKER_URL"], os.environ["SHOP_PREFIX"] = redis_url, prefix
        try:
            from shop import app, ship  # the project's own app, as its code would send
        finally:
            sys.path.remove(str(PROJECT))
        try:
            orders = range(40)
            for order in orders:
                ship.delay(order)
            poll_until(lambda: replicas() > 1,
                       "a scale-up on the backlog", 60)  # fmt: skip
            poll_until(lambda: client.scard(prefix + "shipped") == len(orders),
                       "every order shipped", 120)  # fmt: skip
            counted = cast(dict[bytes, bytes], client.hgetall(prefix + "runs"))
            runs = {int(k): int(v) for k, v in counted.items()}
            assert runs == dict.fromkeys(orders, 1), "each order ran once"
            poll_until(lambda: replicas() == 1,
                       "back to the minimum once idle", 90)  # fmt: skip
        finally:
            app.close()
        assert run.proc.poll() is None, run.log_file.read_text()[-3000:]
        log = run.log_file.read_text() + "".join(
            p.read_text(errors="replace") for p in workdir.glob("*.log")
        )
        assert "this process imported services" not in log
    finally:
        run.stop()
        stop_workers(workdir)
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        client.close()

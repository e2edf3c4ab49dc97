"""`make backup` and `make restore` on a real stack, and `PROD=1` remembered by `make up`.

The stack test brings up its own project (``cst-test-backup-*``: it destroys data, so it never
shares the session's stack), leaves effect rows in PostgreSQL and tasks waiting in Redis on a
queue whose worker is stopped, and backs up with the real Makefile target. It destroys the data,
shows that a tampered backup is refused and changes nothing, that a failing step stops the
restore naming it (Redis's old data put back when the snapshot cannot be loaded), then removes
the project's volumes and restores into the empty project: the rows are back, and the waiting
tasks are back on their queue and then run exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from compose_project import (
    COMPOSE_DIR,
    ROOT,
    ComposeProject,
    docker_socket_gid,
    ensure_wheelhouse,
    free_port,
    fresh_env_file,
    read_env,
    wait_until,
)

from services.rotate import set_in_env_file

FILES = (
    COMPOSE_DIR / "compose.yaml",
    COMPOSE_DIR / "compose.prod.yaml",
    Path(__file__).with_name("compose.scaler-test.yaml"),
)
SETTINGS = {
    "HEALTH_CHECK_INTERVAL": "3",
    "APP_IMAGE": os.environ.get("E2E_APP_IMAGE", "celery-stack/app:e2e"),
    "LOG_LEVEL": "INFO",
    "IO_CONCURRENCY": "8",
}
DONE_TASKS = 12
QUEUED_TASKS = 25
SECRETS = (
    "REDIS_WORKER_PASSWORD", "REDIS_SCALER_PASSWORD", "REDIS_ADMIN_PASSWORD", "POSTGRES_PASSWORD",
    "POSTGRES_APP_PASSWORD", "FLOWER_PASSWORD", "SCALER_TOKEN",
)  # fmt: skip

# Piped to `python -` inside the beat container (the broker's port is not published).
SEND_DEFAULT = f"""
import json
from services.celery_app import app
sent = [app.send_task("tasks.default.record", kwargs={{"key": f"bk-done-{{i}}"}})
        for i in range({DONE_TASKS})]
print(json.dumps([r.id for r in sent if r.get(timeout=120)]))
"""
SEND_SCHEDULED = f"""
import json
from services.celery_app import app
print(json.dumps([app.send_task("tasks.scheduled.run_job",
                                kwargs={{"job": "backup-test", "key": f"bk-queued-{{i}}"}}).id
                  for i in range({QUEUED_TASKS})]))
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeProject]:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode
    ):
        pytest.skip("BACKUP TESTS SKIPPED: no Docker engine here; these tests are required in CI")
    ensure_wheelhouse()
    settings = {
        **SETTINGS,
        "SCALER_HTTP_PORT_HOST": str(free_port()),
        "FLOWER_HOST_PORT": str(free_port()),
        "DOCKER_GID": docker_socket_gid(),
    }
    env_file = fresh_env_file(tmp_path_factory.mktemp("backup-stack"), settings)
    project = ComposeProject(
        name=f"cst-test-backup-{uuid.uuid4().hex[:8]}",
        env_file=env_file,
        files=FILES,
        # REDISCLI_AUTH: handed to `exec -e REDISCLI_AUTH` (the admin user's password).
        env={**os.environ, **settings, "REDISCLI_AUTH": read_env(env_file)["REDIS_ADMIN_PASSWORD"]},
    )
    try:
        project.run("build", timeout=900)
        project.run("up", "--detach", "--wait", "--wait-timeout", "240", timeout=400)
        yield project
    except BaseException:
        print(project.diagnostics())
        raise
    finally:
        project.down()
        left = project.leftovers()
        assert not any(left.values()), f"left behind: {left}"


def make(
    stack: ComposeProject, *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """A Makefile target against the test's project: its env file, compose files and name."""
    files = " ".join(f"-f {f}" for f in stack.files)
    return subprocess.run(
        ["make", "--no-print-directory", *args, f"ENV_FILE={stack.env_file}",
         f"COMPOSE_FILES={files}", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        env={**stack.env, "COMPOSE_PROJECT_NAME": stack.name},
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip


def redis_admin(stack: ComposeProject, *args: str) -> str:
    return stack.run(
        "exec", "-T", "-e", "REDISCLI_AUTH", "redis",
        "redis-cli", "--user", "admin", "--no-auth-warning", *args,
    ).stdout  # fmt: skip


# Messages waiting on a queue: kombu keeps one Redis list per priority step, the bare name and
# name + "\x06\x16" + step (a default-priority task lands on one of the latter).
QUEUE_DEPTH_LUA = """
local n = 0
for _, k in ipairs(redis.call('KEYS', ARGV[1] .. '*')) do
  if (k == ARGV[1] or k:sub(1, #ARGV[1] + 2) == ARGV[1] .. '\\6\\22')
      and redis.call('TYPE', k).ok == 'list' then
    n = n + redis.call('LLEN', k)
  end
end
return n
"""


def queue_depth(stack: ComposeProject, queue: str) -> int:
    return int(redis_admin(stack, "EVAL", QUEUE_DEPTH_LUA, "0", queue).strip())


def started_at(stack: ComposeProject, services: list[str]) -> dict[str, str]:
    """When each service's container last started (a restart or recreate changes it)."""
    return {
        s: c["State"]["StartedAt"] for s in services for c in stack.inspect(stack.container_ids(s))
    }


def effects(stack: ComposeProject, ids: list[str]) -> set[str]:
    quoted = ", ".join(f"'{i}'" for i in ids)
    return {
        r[0] for r in stack.psql(f"SELECT task_id FROM task_effects WHERE task_id IN ({quoted})")
    }


def successes(stack: ComposeProject, ids: list[str]) -> list[dict[str, Any]]:
    """Success records of these ids (task_successes, the result backend's db 1), oldest first."""
    out = redis_admin(stack, "-n", "1", "LRANGE", "task_successes", "0", "-1")
    wanted = set(ids)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r for r in reversed(records) if r.get("task_id") in wanted]


def flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_backup_restore_brings_back_rows_and_queued_tasks(
    stack: ComposeProject, tmp_path: Path
) -> None:
    # Effect rows in PostgreSQL.
    done = json.loads(stack.run("exec", "-T", "beat", "python", "-", stdin=SEND_DEFAULT).stdout)
    assert len(done) == DONE_TASKS
    assert effects(stack, done) == set(done)

    # Tasks waiting in Redis: the scheduled queue's worker stopped (the scaler first, or it
    # would start a replacement).
    stack.run("stop", "scaler", timeout=120)
    stack.run("stop", "worker-scheduled", timeout=300)
    queued = json.loads(stack.run("exec", "-T", "beat", "python", "-", stdin=SEND_SCHEDULED).stdout)
    assert len(queued) == QUEUED_TASKS
    assert queue_depth(stack, "scheduled") == QUEUED_TASKS

    # make backup.
    backups = tmp_path / "backups"
    t0 = time.monotonic()
    proc = make(stack, "backup", f"BACKUP_DIR={backups}")
    backup_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (backup,) = list(backups.iterdir())
    assert backup.name.startswith(f"{stack.name}-") and not backup.name.endswith(".partial")
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["project"] == stack.name
    assert set(manifest["files"]) == {
        "postgres.dump", "redis.rdb", "beat-data.tar", "scaler-data.tar",
    }  # fmt: skip
    for name, part in manifest["files"].items():
        content = (backup / name).read_bytes()
        assert len(content) == part["bytes"], name
        assert hashlib.sha256(content).hexdigest() == part["sha256"], name
    assert manifest["files"]["redis.rdb"]["queues"]["scheduled"] == QUEUED_TASKS
    assert manifest["files"]["postgres.dump"]["rows"]["task_effects"] >= DONE_TASKS
    assert len(str(manifest["git_commit"] or "")) in (0, 40)
    # No secret of the env file is in the backup, and no env file either.
    env = read_env(stack.env_file)
    assert not (backup / ".env").exists()
    for path in backup.iterdir():
        blob = path.read_bytes()
        for name in SECRETS:
            assert env[name].encode() not in blob, f"{name} found in {path.name}"

    # Destroy: every Redis key and the effect rows; a marker shows whether Redis is replaced.
    assert redis_admin(stack, "FLUSHALL").strip() == "OK"
    redis_admin(stack, "SET", "bk-marker", "after-the-backup")
    stack.psql("DELETE FROM task_effects")
    assert effects(stack, done) == set()
    assert queue_depth(stack, "scheduled") == 0

    # A tampered copy (one byte of the Redis snapshot) and a directory without a manifest are
    # refused before anything is touched.
    writers = ["beat", "worker-default", "worker-io"]
    before = started_at(stack, [*writers, "redis", "postgres"])
    tampered = tmp_path / "tampered"
    shutil.copytree(backup, tampered)
    flip_one_byte(tampered / "redis.rdb", 100)
    proc = make(stack, "restore", f"BACKUP={tampered}", timeout=300)
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "redis.rdb: checksum mismatch" in proc.stderr, proc.stderr
    assert "nothing changed" in proc.stderr
    (tampered / "manifest.json").unlink()
    proc = make(stack, "restore", f"BACKUP={tampered}", timeout=300)
    assert proc.returncode != 0 and "has no manifest.json" in proc.stderr, proc.stderr
    assert started_at(stack, [*writers, "redis", "postgres"]) == before
    assert effects(stack, done) == set()
    assert redis_admin(stack, "GET", "bk-marker").strip() == "after-the-backup"

    # A dump that pg_restore cannot read, under a manifest whose sums match it: the postgres step
    # fails inside its one transaction, the restore stops there and says so; Redis is untouched.
    broken = tmp_path / "broken"
    shutil.copytree(backup, broken)
    dump = broken / "postgres.dump"
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    fixed = json.loads((broken / "manifest.json").read_text())
    fixed["files"]["postgres.dump"].update(
        bytes=dump.stat().st_size, sha256=hashlib.sha256(dump.read_bytes()).hexdigest()
    )
    (broken / "manifest.json").write_text(json.dumps(fixed))
    proc = make(stack, "restore", f"BACKUP={broken}")
    assert proc.returncode != 0
    assert "step 'postgres' failed" in proc.stderr and "restored: nothing" in proc.stderr, (
        proc.stdout + proc.stderr
    )
    assert effects(stack, done) == set()
    assert stack.psql("SELECT count(*) FROM schema_migrations") == [["1"]]
    assert redis_admin(stack, "GET", "bk-marker").strip() == "after-the-backup"

    # A snapshot Redis cannot load, under matching sums: PostgreSQL is restored, then the redis
    # step fails and puts Redis's previous data back (the marker), running and healthy.
    bad_redis = tmp_path / "bad-redis"
    shutil.copytree(backup, bad_redis)
    rdb = bad_redis / "redis.rdb"
    rdb.write_bytes(b"NOT-AN-RDB" + rdb.read_bytes()[10:])
    fixed = json.loads((bad_redis / "manifest.json").read_text())
    fixed["files"]["redis.rdb"]["sha256"] = hashlib.sha256(rdb.read_bytes()).hexdigest()
    (bad_redis / "manifest.json").write_text(json.dumps(fixed))
    proc = make(stack, "restore", f"BACKUP={bad_redis}")
    assert proc.returncode != 0
    assert "step 'redis' failed" in proc.stderr and "restored: postgres;" in proc.stderr, (
        proc.stdout + proc.stderr
    )
    assert "Redis runs again on its previous data" in proc.stderr, proc.stderr
    assert redis_admin(stack, "GET", "bk-marker").strip() == "after-the-backup"

    # Disaster: the project's containers and volumes gone. make restore rebuilds it from the backup.
    stack.down()
    assert not any(stack.leftovers().values())
    t0 = time.monotonic()
    proc = make(stack, "restore", f"BACKUP={backup}")
    restore_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Back on their queue when Redis came back (before the workers started again).
    assert f"scheduled={QUEUED_TASKS}" in proc.stdout, proc.stdout
    assert effects(stack, done) == set(done)
    assert redis_admin(stack, "GET", "bk-marker").strip() == ""

    # Every service is up and healthy again, the scaler and the scheduled worker included.
    out = stack.run("ps", "--format", "json").stdout.strip()
    entries = json.loads(out) if out.startswith("[") else [json.loads(x) for x in out.splitlines()]
    state = {e["Service"]: (e["State"], e.get("Health", "")) for e in entries}
    for service in ("redis", "postgres", "beat", "scaler", "worker-scheduled", "worker-default"):
        assert state.get(service) == ("running", "healthy"), (service, state.get(service))

    # The queued tasks run, each exactly once.
    wait_until(
        "the restored scheduled tasks all leave their effect",
        lambda: effects(stack, queued) == set(queued),
        deadline_s=180,
        every_s=1,
    )
    wait_until(
        "the scheduled queue is drained",
        lambda: queue_depth(stack, "scheduled") == 0,
        deadline_s=60,
    )
    records = wait_until(
        "a success record for every restored task",
        lambda: (
            (r := successes(stack, queued)) and len({x["task_id"] for x in r}) == len(queued) and r
        ),
        deadline_s=60,
    )
    ran = [r["task_id"] for r in records]
    assert sorted(ran) == sorted(queued), "a restored task ran more than once or not at all"
    assert not [r for r in records if r["result"].get("duplicate")]

    # The backup is untouched and still verifies.
    verify = subprocess.run(
        [sys.executable, "-m", "services.backup", "verify", str(backup)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    print(f"\nbackup {backup_s:.1f}s, restore {restore_s:.1f}s (make targets, wall clock)")
    print(proc.stdout.splitlines()[-1])


# -- PROD=1 remembered ----------------------------------------------------------------------------


def dry_run(target: str, env_file: Path, *extra: str) -> str:
    """`make -n TARGET` against env_file: the commands it would run, nothing run."""
    env = {k: v for k, v in os.environ.items() if k not in ("STACK_PROD", "PROD", "MAKEFLAGS")}
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", target, f"ENV_FILE={env_file}", "PYTHON=false",
         "DOCKER_GID=0", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def compose_lines(output: str) -> list[str]:
    # Each Compose command, after the secret files' variables make hands it (SECRETS_DIR=...).
    return [line for line in output.splitlines() if " docker compose --env-file " in f" {line}"]


def test_make_up_remembers_prod(tmp_path: Path) -> None:
    env_file = fresh_env_file(tmp_path, {})
    env_file.chmod(0o600)
    prod = "-f compose/compose.prod.yaml"

    # Nothing recorded: no limits, and `up` records nothing.
    out = dry_run("up", env_file)
    assert compose_lines(out) and not any(prod in line for line in compose_lines(out)), out
    assert "remember-prod" not in out

    # PROD=1: the limits, and `up` records them.
    out = dry_run("up", env_file, "PROD=1")
    assert all(prod in line for line in compose_lines(out)), out
    assert f"compose/scripts/remember-prod.sh {env_file} 1" in out

    # What `up PROD=1` runs: STACK_PROD=1 in the file, nothing else changed, the mode kept.
    original = env_file.read_text()
    script = ROOT / "compose/scripts/remember-prod.sh"
    subprocess.run(["bash", str(script), str(env_file), "1"], check=True, capture_output=True)
    assert read_env(env_file)["STACK_PROD"] == "1"
    assert oct(env_file.stat().st_mode & 0o777) == oct(0o600)
    strip = [line for line in env_file.read_text().splitlines() if not line.startswith("STACK_")]
    assert strip == [line for line in original.splitlines() if not line.startswith("STACK_")]

    # A later plain `make up` (and down, backup) keeps them.
    for target in ("up", "down", "backup"):
        out = dry_run(target, env_file)
        lines = [line for line in out.splitlines() if "compose/compose.yaml" in line]
        assert lines and all(prod in line for line in lines), (target, out)

    # PROD=0 drops them and clears the record.
    out = dry_run("up", env_file, "PROD=0")
    assert not any(prod in line for line in compose_lines(out)), out
    assert f"compose/scripts/remember-prod.sh {env_file} 0" in out
    subprocess.run(["bash", str(script), str(env_file), "0"], check=True, capture_output=True)
    assert read_env(env_file).get("STACK_PROD", "") == ""
    out = dry_run("up", env_file)
    assert not any(prod in line for line in compose_lines(out)), out

    # check-env (make up, make restore) refuses anything but 1, 0 or empty.
    with env_file.open("a") as f:
        f.write("STACK_PROD=yes\n")
    check = subprocess.run(
        ["bash", str(ROOT / "compose/scripts/check-env.sh"), str(env_file)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "STACK_PROD='yes' is malformed" in check.stderr, check.stderr


def owner_login(stack: ComposeProject, password: str) -> subprocess.CompletedProcess[str]:
    """psql over TCP as the owner with ``password`` (given on stdin, never a command line)."""
    return stack.run(
        "exec", "-T", "postgres", "sh", "-c",
        'read -r PGPASSWORD; export PGPASSWORD; psql -h 127.0.0.1 -X -U "$POSTGRES_USER"'
        ' -d "$POSTGRES_DB" -tAc "select 1"',
        stdin=password + "\n", check=False,
    )  # fmt: skip


def test_rotating_the_database_owners_password(stack: ComposeProject, tmp_path: Path) -> None:
    """`make rotate-db-owner`: the database takes the new owner password and refuses the old
    one, the env file and the secret files carry it, and what connects as the owner still works
    (migrate ran again in the recreated containers, and `make backup` reads the database). The
    password appears in no output."""
    old = read_env(stack.env_file)["POSTGRES_PASSWORD"]
    assert owner_login(stack, old).returncode == 0
    proc = make(stack, "rotate-db-owner", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = read_env(stack.env_file)["POSTGRES_PASSWORD"]
    assert new != old and len(new) >= 32
    assert new not in proc.stdout + proc.stderr and old not in proc.stdout + proc.stderr
    assert owner_login(stack, new).returncode == 0
    refused = owner_login(stack, old)
    assert refused.returncode != 0 and "password authentication failed" in refused.stderr, (
        refused.stdout + refused.stderr
    )
    secrets_dir = Path(f"{stack.env_file.resolve()}.secrets")
    assert (secrets_dir / "postgres_password").read_text().strip() == new
    # The test's own compose commands read the digest from the env file (make exports it).
    digest = subprocess.run(
        ["bash", str(ROOT / "compose/scripts/write-secrets.sh"), "--digest", str(secrets_dir)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    set_in_env_file(stack.env_file, "SECRETS_DIGEST", digest)
    migrate = stack.run("ps", "--all", "--format", "json", "migrate").stdout.strip()
    states = [json.loads(line) for line in migrate.splitlines() if line.strip()]
    assert states and all(s.get("ExitCode") == 0 for s in states), states
    backup = make(stack, "backup", f"BACKUP_DIR={tmp_path}")
    assert backup.returncode == 0, backup.stdout + backup.stderr

"""`make backup` and `make restore`: one host's Compose stack saved to a directory and put back.

Runs on the host (standard library only, plus ``docker compose``), never inside the stack::

    python3 -m services.backup backup  --env-file .env -f compose/compose.yaml [--out backups]
    python3 -m services.backup restore --env-file .env -f compose/compose.yaml BACKUP_DIR
    python3 -m services.backup verify  BACKUP_DIR

A backup is one directory ``<project>-<UTC time>/`` holding:

- ``postgres.dump``: ``pg_dump -Fc`` of the application's database, run inside the postgres
  container as the owner (POSTGRES_USER);
- ``redis.rdb``: a point-in-time snapshot of Redis (``BGSAVE`` as the ``admin`` user, finished
  when INFO persistence says so), so queued tasks, results and the scaler's overrides;
- ``beat-data.tar`` and ``scaler-data.tar``: the beat schedule's state and the scaler's
  recording, copied out of their volumes;
- ``manifest.json``: what was saved, sizes and SHA-256 sums, the project, the git commit, the time.

The env file (the secrets) is never copied: the operator keeps it apart (docs/backup.md).

A restore refuses a directory whose manifest is missing or invalid or whose files do not match
their sums, before it touches anything. Then it stops the services that write (the scalers, beat,
the workers), restores PostgreSQL in one transaction, replaces Redis's data while Redis is
stopped (the old data is kept aside until the restored Redis is healthy), refills the two volumes
the same way, and starts the stack again, waiting for health. A failed step is named, with what
was already done; the backup directory is only ever read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from services.config import PRIORITY_SEP, PRIORITY_STEPS, QUEUE_NAMES

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "celery-stack-backup/1"
MANIFEST = "manifest.json"
POSTGRES_FILE = "postgres.dump"
REDIS_FILE = "redis.rdb"
# Volumes saved as tar files besides the two data services (those that the compose file defines).
VOLUME_FILES = {"beat-data": "beat-data.tar", "scaler-data": "scaler-data.tar"}
REQUIRED_FILES = (POSTGRES_FILE, REDIS_FILE)
# The services that write: stopped before a restore (the scalers first: they would replace a
# stopped worker), started again after it.
WRITER_PREFIXES = ("scaler", "beat", "worker-")
NOT_INCLUDED = [
    "the env file (.env: passwords, tokens): keep a copy of it apart from the backups",
    "the images (rebuilt by make up) and the scaler policy file (in the checkout)",
    "Flower's and Compose's own state (none that matters)",
]
# Redis's append-only files as Redis 7 names them in its --dir (appenddirname, appendfilename):
# a restore writes the snapshot as the base of a fresh AOF, which Redis loads on start.
AOF_DIR = "appendonlydir"
AOF_BASE = "appendonly.aof.1.base.rdb"
AOF_MANIFEST = "appendonly.aof.manifest"
LONG = 900.0  # seconds: a step that waits on the engine (stops honour a 150 s grace period)


class StepFailed(Exception):
    """A step of a backup or restore failed; the message names the step and what went wrong."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step '{step}' failed: {message}")
        self.step, self.detail = step, message


class Refused(Exception):
    """The backup directory cannot be restored (missing or invalid manifest, checksum mismatch)."""


def log(message: str) -> None:
    print(message, flush=True)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as Compose reads them (comments, blanks, surrounding quotes aside)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        value = match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[match.group(1)] = value
    return values


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def queue_keys(prefix: str) -> dict[str, list[str]]:
    """Each queue's Redis lists: the bare key and one per non-zero priority step (kombu's)."""
    return {
        q: [f"{prefix}{q}", *(f"{prefix}{q}{PRIORITY_SEP}{s}" for s in PRIORITY_STEPS if s)]
        for q in QUEUE_NAMES
    }


def redis_cli_quote(key: str) -> str:
    """A key as one argument of redis-cli's line input (double quotes, \\xHH escapes)."""
    out = "".join(c if c.isalnum() or c in "_-:.@/" else f"\\x{ord(c):02x}" for c in key)
    return f'"{out}"'


@dataclass
class Stack:
    """The Compose project, driven through ``docker compose`` with the operator's files."""

    env_file: Path
    files: Sequence[str]
    project: str | None = None
    profiles: Sequence[str] = ()
    _config: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        file_values = read_env_file(self.env_file)
        # An exported variable wins over the file, as it does for Compose.
        self.values = {**file_values, **{k: os.environ[k] for k in file_values if k in os.environ}}
        # Handed to `compose exec -e REDISCLI_AUTH` from this process's environment: the
        # password never appears on a command line.
        self.env = {**os.environ, "REDISCLI_AUTH": self.values.get("REDIS_ADMIN_PASSWORD", "")}
        # The secret files compose.yaml names: where `make` puts them (it exports SECRETS_DIR)
        # unless the environment or the env file says otherwise.
        if not self.env.get("SECRETS_DIR") and not self.values.get("SECRETS_DIR"):
            self.env["SECRETS_DIR"] = f"{self.env_file.resolve()}.secrets"

    def base(self, profiles: Iterable[str] = ()) -> list[str]:
        cmd = ["docker", "compose", "--env-file", str(self.env_file)]
        if self.project:
            cmd += ["-p", self.project]
        for f in self.files:
            cmd += ["-f", f]
        for p in profiles:
            cmd += ["--profile", p]
        return cmd

    def run(
        self,
        step: str,
        args: Sequence[str],
        *,
        profiles: Iterable[str] = (),
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float = LONG,
    ) -> str:
        """Run one compose command; raise StepFailed with its stderr when it fails."""
        return run_command(step, [*self.base(profiles), *args], self.env, stdin, stdout, timeout)

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            out = self.run("config", ["config", "--format", "json"], profiles=["monitoring", "ha"])
            self._config = json.loads(out)
        return self._config

    @property
    def name(self) -> str:
        return str(self.config["name"])

    def services(self) -> dict[str, Any]:
        services: dict[str, Any] = self.config["services"]
        return services

    def volume(self, key: str) -> str | None:
        """The engine's name of a volume of the compose file (``<project>_<key>``), if defined."""
        volumes = self.config.get("volumes") or {}
        if key not in volumes:
            return None
        return str(volumes[key].get("name") or f"{self.name}_{key}")

    def running(self) -> list[str]:
        out = self.run(
            "ps",
            ["ps", "--services", "--status", "running"],
            profiles=["monitoring", "ha"],
            timeout=120,
        )
        return [s for s in out.split() if s]

    def writers(self) -> list[str]:
        return [s for s in self.services() if s.startswith(WRITER_PREFIXES)]

    def helper_image(self) -> str:
        """An image with sh and tar that is already here: the redis service's."""
        return str(self.services()["redis"]["image"])

    def redis(self, step: str, *args: str, stdin: str | None = None) -> str:
        """redis-cli as the ``admin`` user inside the redis container."""
        cmd = [*self.base(), "exec", "-T", "-e", "REDISCLI_AUTH", "redis", "redis-cli"]
        cmd += ["--user", "admin", "--no-auth-warning", *args]
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=self.env, timeout=120
        )
        if proc.returncode != 0 or proc.stdout.startswith(("ERR", "NOPERM", "WRONGPASS")):
            detail = (proc.stderr or proc.stdout).strip()
            raise StepFailed(step, f"redis-cli {' '.join(args)}: {detail}")
        return proc.stdout

    def redis_info(self, step: str, section: str) -> dict[str, str]:
        out = self.redis(step, "INFO", section)
        return dict(
            line.split(":", 1) for line in out.replace("\r", "").splitlines() if ":" in line
        )

    def queue_depths(self, step: str) -> dict[str, int]:
        """Messages waiting on each queue (all its priority lists), read as ``admin``."""
        keys = queue_keys(self.values.get("CELERY_KEY_PREFIX", ""))
        lines = [f"LLEN {redis_cli_quote(k)}" for ks in keys.values() for k in ks]
        out = self.redis(step, stdin="\n".join(lines) + "\n").split()
        if len(out) != len(lines):
            raise StepFailed(step, f"expected {len(lines)} LLEN replies, got: {out[:5]}...")
        counts = iter(int(n) for n in out)
        return {q: sum(next(counts) for _ in ks) for q, ks in keys.items()}

    def psql(self, step: str, sql: str) -> str:
        return self.run(
            step,
            ["exec", "-T", "postgres", "sh", "-c",
             'PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"'
             ' psql -h 127.0.0.1 -v ON_ERROR_STOP=1 -X -q'
             ' -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -F "|" -c "$0"', sql],
            timeout=120,
        )  # fmt: skip

    def table_rows(self, step: str) -> dict[str, int]:
        """Rows per table of the public schema (exact counts)."""
        out = self.psql(
            step,
            "SELECT table_name, (xpath('/row/c/text()', query_to_xml(format("
            "'SELECT count(*) AS c FROM %I.%I', table_schema, table_name), false, true, '')))[1]"
            "::text FROM information_schema.tables WHERE table_schema = 'public'"
            " AND table_type = 'BASE TABLE' ORDER BY 1",
        )
        rows = [line.split("|") for line in out.splitlines() if "|" in line]
        return {name: int(count) for name, count in rows}

    def helper(
        self,
        step: str,
        volume: str,
        script: str,
        *,
        read_only: bool,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> str:
        """A throwaway container of the helper image with the volume at /v, running ``script``."""
        mount = f"{volume}:/v" + (":ro" if read_only else "")
        cmd = ["docker", "run", "--rm", "-i", "--network", "none", "--user", "0",
               "--label", f"celery-stack.backup-helper={self.name}",
               "--entrypoint", "sh", "-v", mount, self.helper_image(), "-c", script]  # fmt: skip
        return run_command(step, cmd, self.env, stdin, stdout, LONG)

    def ensure_volume(self, step: str, key: str, volume: str) -> None:
        """Create the volume as Compose would (its labels), when the stack never ran here."""
        found = subprocess.run(["docker", "volume", "inspect", volume], capture_output=True)
        if found.returncode == 0:
            return
        run_command(
            step,
            ["docker", "volume", "create",
             "--label", f"com.docker.compose.project={self.name}",
             "--label", f"com.docker.compose.volume={key}", volume],
            self.env, None, None, 120,
        )  # fmt: skip


def run_command(
    step: str,
    cmd: Sequence[str],
    env: Mapping[str, str],
    stdin: IO[bytes] | None,
    stdout: IO[bytes] | None,
    timeout: float,
) -> str:
    try:
        proc = subprocess.run(
            cmd,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise StepFailed(step, f"{shlex.join(cmd[:8])} ... took over {timeout:.0f}s") from None
    except OSError as exc:
        raise StepFailed(step, f"{cmd[0]}: {exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-3000:]
        raise StepFailed(step, f"{shlex.join(cmd[:8])} ... exited {proc.returncode}: {err}")
    return proc.stdout.decode(errors="replace") if stdout is None else ""


def git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# -- backup ---------------------------------------------------------------------------------------


def backup(stack: Stack, out_dir: Path) -> Path:
    """Write one backup directory under ``out_dir``; return its path."""
    started = time.monotonic()
    now = datetime.now(UTC)
    project = stack.name
    running = set(stack.running())
    missing = [s for s in ("redis", "postgres") if s not in running]
    if missing:
        raise StepFailed(
            "preflight",
            f"{' and '.join(missing)} not running in project {project}: a backup reads the live "
            "services; start the stack first (make up)",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{project}-{now:%Y%m%dT%H%M%SZ}"
    partial = final.with_name(final.name + ".partial")
    if final.exists() or partial.exists():
        raise StepFailed("preflight", f"{final} already exists: one backup per second at most")
    partial.mkdir(mode=0o700)
    try:
        manifest = write_backup(stack, partial, now, started)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        partial.rename(final)
    except BaseException:
        for f in partial.iterdir():
            f.unlink()
        partial.rmdir()
        raise
    return final


def write_backup(stack: Stack, dest: Path, now: datetime, started: float) -> dict[str, Any]:
    parts: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}

    # Redis first, then PostgreSQL: a task that finishes between the two has its effect in the
    # dump and its message still in the snapshot, so after a restore it runs again and its
    # effect (keyed by task id, services/effects.py) absorbs the repeat. The other order would
    # lose that effect: the message acked away, the row written after the dump.
    t = time.monotonic()
    log("backup: redis: BGSAVE as admin, waiting for it to finish ...")
    depths = stack.queue_depths("redis")
    snapshot_redis(stack, dest / REDIS_FILE)
    keyspace = stack.redis_info("redis", "keyspace")
    parts[REDIS_FILE] = {
        "what": "Redis snapshot (BGSAVE): queued tasks, results, the scaler's overrides",
        "queues": depths,
        "keyspace": keyspace,
    }
    timings["redis"] = time.monotonic() - t

    t = time.monotonic()
    log("backup: postgres: pg_dump -Fc as the owner ...")
    with (dest / POSTGRES_FILE).open("wb") as f:
        stack.run(
            "postgres",
            ["exec", "-T", "postgres", "sh", "-c",
             'PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"'
             ' exec pg_dump -h 127.0.0.1 -U "$POSTGRES_USER"'
             ' -d "$POSTGRES_DB" -Fc'],
            stdout=f,
        )  # fmt: skip
    rows = stack.table_rows("postgres")
    parts[POSTGRES_FILE] = {
        "what": "pg_dump -Fc of the application's database (pg_restore reads it)",
        "database": stack.values.get("POSTGRES_DB") or "celery",
        "rows": rows,
    }
    timings["postgres"] = time.monotonic() - t

    for key, filename in VOLUME_FILES.items():
        volume = stack.volume(key)
        if volume is None:
            continue
        t = time.monotonic()
        log(f"backup: {key}: copying the volume {volume} ...")
        with (dest / filename).open("wb") as f:
            stack.helper(key, volume, "cd /v && exec tar -cf - .", read_only=True, stdout=f)
        parts[filename] = {"what": f"the {key} volume (tar)", "volume": key}
        timings[key] = time.monotonic() - t

    for filename, part in parts.items():
        path = dest / filename
        part["bytes"] = path.stat().st_size
        part["sha256"] = sha256_of(path)
    git = git_commit()
    return {
        "format": FORMAT,
        "created_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "project": stack.name,
        "host": socket.gethostname(),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "compose_files": list(stack.files),
        "files": parts,
        "not_included": NOT_INCLUDED,
        "seconds": {
            k: round(v, 2) for k, v in {**timings, "total": time.monotonic() - started}.items()
        },
    }


def snapshot_redis(stack: Stack, dest: Path, deadline_s: float = 600) -> None:
    """BGSAVE, poll INFO persistence until that save finished well, copy the RDB file out."""
    before = int(stack.redis_info("redis", "persistence").get("rdb_saves", "0"))
    reply = stack.redis("redis", "BGSAVE", "SCHEDULE").strip()
    if "started" not in reply and "scheduled" not in reply:
        raise StepFailed("redis", f"BGSAVE answered {reply!r}")
    deadline = time.monotonic() + deadline_s
    while True:
        info = stack.redis_info("redis", "persistence")
        done = int(info.get("rdb_saves", "0")) > before
        if done and info.get("rdb_bgsave_in_progress") == "0":
            if info.get("rdb_last_bgsave_status") != "ok":
                raise StepFailed(
                    "redis", "BGSAVE failed (INFO persistence: not ok); see redis logs"
                )
            break
        if time.monotonic() > deadline:
            raise StepFailed("redis", f"BGSAVE not finished after {deadline_s:.0f}s")
        time.sleep(0.2)
    directory = stack.redis("redis", "CONFIG", "GET", "dir").split()[-1]
    filename = stack.redis("redis", "CONFIG", "GET", "dbfilename").split()[-1]
    # Through stdout rather than `compose cp`: works the same against a remote engine.
    with dest.open("wb") as f:
        stack.run(
            "redis",
            ["exec", "-T", "redis", "cat", f"{directory}/{filename}"],
            stdout=f,
        )


# -- verify ---------------------------------------------------------------------------------------


def verify(directory: Path) -> dict[str, Any]:
    """The manifest, once every file it lists is there with its size and sum; else Refused."""
    if not directory.is_dir():
        raise Refused(f"{directory} is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise Refused(f"{directory} has no {MANIFEST}: not a backup made by make backup")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise Refused(f"{path}: format {found!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise Refused(f"{path}: no 'files' object")
    known = {*REQUIRED_FILES, *VOLUME_FILES.values()}
    problems = [
        f"{name}: not listed in the manifest" for name in REQUIRED_FILES if name not in files
    ]
    for name, part in files.items():
        if name not in known:
            problems.append(f"{name}: not a file a backup contains ({', '.join(sorted(known))})")
            continue
        if not isinstance(part, dict) or not isinstance(part.get("sha256"), str):
            problems.append(f"{name}: no sha256 in the manifest")
            continue
        file = directory / name
        if not file.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        size = file.stat().st_size
        if size != part.get("bytes"):
            problems.append(f"{name}: {size} bytes, the manifest says {part.get('bytes')}")
        digest = sha256_of(file)
        if digest != part["sha256"]:
            problems.append(
                f"{name}: checksum mismatch (sha256 {digest[:16]}..., the manifest says "
                f"{part['sha256'][:16]}...): the file changed or is corrupt"
            )
    if problems:
        raise Refused("; ".join(problems))
    return manifest


# -- restore --------------------------------------------------------------------------------------


def restore(stack: Stack, directory: Path, wait_timeout_s: int = 300) -> dict[str, float]:
    """Restore the backup into the stack (running or not); return seconds per step."""
    started = time.monotonic()
    manifest = verify(directory)
    files: dict[str, Any] = manifest["files"]
    log(
        f"restore: {directory}: manifest valid, {len(files)} files match their sums "
        f"(project {manifest.get('project')}, {manifest.get('created_at')}, "
        f"commit {str(manifest.get('git_commit'))[:12]})"
    )
    if manifest.get("project") != stack.name:
        log(f"restore: note: the backup is of project {manifest.get('project')}, restoring into "
            f"{stack.name}")  # fmt: skip
    services = stack.services()
    running_before = set(stack.running())
    # Profiles of services that ran before (Flower, the standby scaler) stay on.
    profiles = list(dict.fromkeys([
        *stack.profiles,
        *(p for s in running_before for p in services.get(s, {}).get("profiles") or []),
    ]))  # fmt: skip
    done: list[str] = []
    timings: dict[str, float] = {}

    def step(name: str) -> float:
        log(f"restore: {name} ...")
        return time.monotonic()

    try:
        t = step("stop the services that write (scalers, beat, workers)")
        writers = stack.writers()
        stack.run("stop", ["stop", *writers], profiles=["monitoring", "ha"])
        timings["stop"] = time.monotonic() - t

        t = step("start redis and postgres")
        stack.run("create", ["up", "--no-start", "--no-recreate"], profiles=profiles)
        stack.run("start-data", ["up", "-d", "--wait", "--no-deps", "redis", "postgres"])
        timings["start-data"] = time.monotonic() - t

        t = step("postgres: pg_restore --clean --if-exists in one transaction")
        with (directory / POSTGRES_FILE).open("rb") as f:
            stack.run(
                "postgres",
                ["exec", "-T", "postgres", "sh", "-c",
                 'PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")" exec pg_restore -h 127.0.0.1'
                 ' -U "$POSTGRES_USER" -d "$POSTGRES_DB" --clean --if-exists --no-owner'
                 " --no-privileges --single-transaction --exit-on-error"],
                stdin=f,
            )  # fmt: skip
        done.append("postgres")
        timings["postgres"] = time.monotonic() - t

        t = step("redis: stop, replace its data with the snapshot, start, wait healthy")
        restore_redis(stack, directory / REDIS_FILE)
        done.append("redis")
        timings["redis"] = time.monotonic() - t
        depths = stack.queue_depths("redis")
        log("restore: redis: queues now: " + ", ".join(f"{q}={n}" for q, n in depths.items()))

        for key, filename in VOLUME_FILES.items():
            volume = stack.volume(key)
            if filename not in files or volume is None:
                continue
            t = step(f"{key}: refill the volume {volume}")
            stack.ensure_volume(key, key, volume)
            with (directory / filename).open("rb") as f:
                stack.helper(key, volume, REFILL_VOLUME, read_only=False, stdin=f)
            done.append(key)
            timings[key] = time.monotonic() - t

        t = step("start the stack and wait for health")
        stack.run(
            "start",
            ["up", "-d", "--wait", "--wait-timeout", str(wait_timeout_s), "--remove-orphans"],
            profiles=profiles,
        )
        timings["start"] = time.monotonic() - t
    except StepFailed as exc:
        left = "restored: " + (", ".join(done) if done else "nothing")
        raise StepFailed(
            exc.step,
            f"{exc.detail}\n  {left}; the backup is untouched; the writers "
            f"({', '.join(stack.writers())}) may be stopped: fix the cause and run the restore "
            "again (it starts over and is safe to repeat), or start the stack with make up",
        ) from None
    timings["total"] = time.monotonic() - started
    return timings


# Run in a helper container with the volume at /v and the backup's tar on stdin: the volume's
# content is set aside, the tar extracted (owners and modes as recorded), and the old content
# dropped; if the extraction fails, the old content is put back.
REFILL_VOLUME = """
set -eu
cd /v
rm -rf .pre-restore
mkdir .pre-restore
for f in .[!.]* ..?* *; do
  if [ -e "$f" ] && [ "$f" != .pre-restore ]; then mv "$f" .pre-restore/; fi
done
if tar -xpf -; then
  rm -rf .pre-restore
else
  echo "extracting the backup failed: putting the volume's old content back" >&2
  for f in .[!.]* ..?* *; do
    if [ -e "$f" ] && [ "$f" != .pre-restore ]; then rm -rf "$f"; fi
  done
  for f in .pre-restore/.[!.]* .pre-restore/..?* .pre-restore/*; do
    if [ -e "$f" ]; then mv "$f" .; fi
  done
  rmdir .pre-restore
  exit 1
fi
"""


# Run with redis stopped, its volume at /v and the snapshot on stdin: the AOF directory and any
# dump.rdb set aside in .pre-restore, the snapshot installed as the base of a fresh AOF, owned
# like the volume's root (the redis user once the entrypoint has run).
STAGE_REDIS = f"""
set -eu
cd /v
rm -rf .pre-restore
mkdir .pre-restore
for f in {AOF_DIR} dump.rdb; do
  if [ -e "$f" ]; then mv "$f" .pre-restore/; fi
done
mkdir {AOF_DIR}
cat > {AOF_DIR}/{AOF_BASE}
printf 'file {AOF_BASE} seq 1 type b\\n' > {AOF_DIR}/{AOF_MANIFEST}
chown -R "$(stat -c %u:%g /v)" {AOF_DIR}
chmod 700 {AOF_DIR}
sync
"""
# ...and undone: Redis's previous data back in place.
UNSTAGE_REDIS = f"""
set -eu
cd /v
rm -rf {AOF_DIR} dump.rdb
for f in .pre-restore/{AOF_DIR} .pre-restore/dump.rdb; do
  if [ -e "$f" ]; then mv "$f" .; fi
done
rm -rf .pre-restore
"""


# Redis loads the whole snapshot before it answers its health check: minutes for gigabytes.
REDIS_UP = ["up", "-d", "--wait", "--wait-timeout", "300", "--no-deps", "redis"]


def restore_redis(stack: Stack, snapshot: Path) -> None:
    """Stop Redis, make the snapshot the base of a fresh AOF (Redis 7 loads the AOF, not a bare
    dump.rdb, when appendonly is on), start it and wait for health. If any of it fails, Redis's
    previous data is put back and Redis started again before the failure is reported."""
    volume = stack.volume("redis-data")
    if volume is None:
        raise StepFailed("redis", "the compose file defines no redis-data volume")
    stack.run("redis", ["stop", "redis"])
    try:
        with snapshot.open("rb") as f:
            stack.helper("redis", volume, STAGE_REDIS, read_only=False, stdin=f)
        stack.run("redis", REDIS_UP)
    except StepFailed as exc:
        try:
            stack.run("redis", ["stop", "redis"])
            stack.helper("redis", volume, UNSTAGE_REDIS, read_only=False)
            stack.run("redis", REDIS_UP)
        except StepFailed as undo:
            raise StepFailed(
                "redis",
                f"{exc.detail}; putting Redis's previous data back failed too ({undo.detail}): "
                f"it is in the volume {volume}, under .pre-restore/",
            ) from None
        raise StepFailed("redis", f"{exc.detail}; Redis runs again on its previous data") from None
    stack.helper("redis", volume, "rm -rf /v/.pre-restore", read_only=False)


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def stack_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--env-file", type=Path, default=Path(".env"), help="the stack's env file")
        p.add_argument("-f", "--file", dest="files", action="append", default=[],
                       help="compose file (repeatable; default compose/compose.yaml)")  # fmt: skip
        p.add_argument("-p", "--project", default=None, help="compose project name")
        p.add_argument("--profile", dest="profiles", action="append", default=[],
                       help="compose profile to start after a restore (repeatable)")  # fmt: skip

    b = sub.add_parser("backup", help="save the running stack to a new directory")
    stack_args(b)
    b.add_argument("--out", type=Path, default=Path("backups"), help="where the directory goes")
    r = sub.add_parser("restore", help="put a backup back into the stack")
    stack_args(r)
    r.add_argument("backup", type=Path, help="a directory made by `backup`")
    r.add_argument("--wait-timeout", type=int, default=300, help="seconds to wait for health")
    v = sub.add_parser("verify", help="check a backup's manifest and sums, change nothing")
    v.add_argument("backup", type=Path)
    args = parser.parse_args(argv)

    if args.command == "verify":
        try:
            manifest = verify(args.backup)
        except Refused as exc:
            print(f"verify: {args.backup}: refused: {exc}", file=sys.stderr)
            return 2
        print(f"verify: {args.backup}: valid ({len(manifest['files'])} files match their sums)")
        return 0

    if not args.env_file.is_file():
        print(f"{args.command}: env file {args.env_file} not found", file=sys.stderr)
        return 2
    stack = Stack(
        env_file=args.env_file,
        files=args.files or ["compose/compose.yaml"],
        project=args.project,
        profiles=args.profiles,
    )
    try:
        if args.command == "backup":
            path = backup(stack, args.out)
            manifest = json.loads((path / MANIFEST).read_text())
            total = sum(p["bytes"] for p in manifest["files"].values())
            queues = manifest["files"][REDIS_FILE]["queues"].items()
            log(
                f"backup: {path} written in {manifest['seconds']['total']:.1f}s "
                f"({len(manifest['files'])} files, {total} bytes; queues: "
                f"{', '.join(f'{q}={n}' for q, n in queues)}). "
                "The env file is not in it: keep a copy of it apart."
            )
        else:
            timings = restore(stack, args.backup, args.wait_timeout)
            steps = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
            log(f"restore: done in {timings['total']:.1f}s ({steps})")
    except Refused as exc:
        print(f"restore: {args.backup}: refused, nothing changed: {exc}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

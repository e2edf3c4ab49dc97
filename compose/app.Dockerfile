# The application image: Celery workers, beat, the migration step, Flower and the scaler all run
# from it (one image, one dependency set, one place to patch). Build context: the repository root.
#
#   docker build -f compose/app.Dockerfile --build-arg PYTHON_IMAGE=local/python:3.11 .
#
# Dependencies come from the host-built wheelhouse `.wheelhouse/` (`make wheels`) when it holds
# wheels, so the build needs no network; otherwise (or when the wheelhouse does not fit this
# interpreter) pip uses the package index as usual.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
# Bytecode is compiled here, once (below): the root filesystem is read-only at runtime and the user
# is not root, so a module without valid bytecode would be compiled again at every start.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A venv, never the system interpreter: Debian's python refuses system installs (PEP 668), and the
# venv is one directory the runtime stage copies. `python3` is found on PATH (/usr/local/bin in the
# official image, /usr/bin in Debian's), never by a hard-coded path.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The glob keeps the build working when .wheelhouse/ does not exist (COPY needs one match, which
# pyproject.toml always is); /wheels then holds no *.whl and pip goes to the index.
COPY pyproject.toml .wheelhouse* /wheels/
COPY compose/scripts/pip-install.sh /usr/local/bin/pip-install.sh
RUN chmod 0755 /usr/local/bin/pip-install.sh
# Dependencies first, from pyproject.toml alone (empty package directories), so that a change to
# the application's code does not reinstall them: this layer is cached until pyproject changes.
COPY pyproject.toml /src/
RUN mkdir -p /src/services /src/scaler && pip-install.sh '/src[monitoring]'
COPY pyproject.toml README.md* /src/
COPY services /src/services
COPY scaler /src/scaler
# The whole venv's bytecode, checked against nothing at import (unchecked-hash): the image never
# changes its sources, and a copy or builder that rewrites file times cannot make it stale.
RUN pip-install.sh --no-deps --force-reinstall /src \
 && python -c "import celery, kombu, redis, psycopg2, flower, services, scaler, scaler.api" \
 && python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WORKER_HEARTBEAT_FILE=/tmp/celery-worker.heartbeat
# A fixed uid/gid so volume ownership is predictable across rebuilds. The beat schedule directory
# (and the scaler's recording directory) exists in the image, owned by the app user, so a fresh
# named volume mounted there inherits that ownership and beat (the scaler), non-root, can write.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /app /var/lib/celery-beat /var/lib/scaler \
 && chown app:app /app /var/lib/celery-beat /var/lib/scaler
COPY --from=builder /opt/venv /opt/venv
# The interpreter's own library too: the official python images ship it without bytecode, so every
# start would compile the standard modules it imports (a no-op where they are compiled already).
RUN python3 -m compileall -q -j 0 -x '/(tests?|idle_test)/' \
      "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
# Plain COPY + chmod: the engine's classic builder (no BuildKit here) has no COPY --chmod.
COPY compose/scripts/start-worker.sh compose/scripts/start-beat.sh compose/scripts/start-flower.sh \
     compose/scripts/healthcheck-file.sh /usr/local/bin/
RUN chmod 0755 /usr/local/bin/start-worker.sh /usr/local/bin/start-beat.sh \
      /usr/local/bin/start-flower.sh /usr/local/bin/healthcheck-file.sh
WORKDIR /app
USER app:app
# Compose runs every service with `init: true` (tini as PID 1: forwards SIGTERM to Celery's main
# process only and reaps zombies). SIGTERM is Celery's warm shutdown.
STOPSIGNAL SIGTERM
CMD ["start-worker.sh"]

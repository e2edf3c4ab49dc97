# Celery stack with a sidecar autoscaler. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv test nemesis lint up down rotate-db-owner monitor clean ps logs load wheels scaler-status

# The stack: compose/compose.yaml, plus a local compose/compose.override.yaml when present, plus
# the production override with PROD=1. Image variables exported in the shell win over .env (on a
# machine without a registry: PYTHON_IMAGE=local/python:3.11 REDIS_IMAGE=local/redis:7
# POSTGRES_IMAGE=local/postgres:15 make up).
ENV_FILE ?= .env
# PROD is remembered: `make up PROD=1` writes STACK_PROD=1 into the env file and `make up PROD=0`
# clears it, so a later `make up` (or down, ps, backup, ...) without PROD keeps the limits. An
# exported STACK_PROD wins over the file's, as for Compose.
ifndef STACK_PROD
STACK_PROD := $(shell sed -n 's/^STACK_PROD=//p' $(ENV_FILE) 2>/dev/null | tail -n 1)
endif
PROD_ON := $(if $(PROD),$(filter-out 0,$(PROD)),$(filter 1,$(STACK_PROD)))
COMPOSE_FILES := -f compose/compose.yaml \
  $(if $(wildcard compose/compose.override.yaml),-f compose/compose.override.yaml) \
  $(if $(PROD_ON),-f compose/compose.prod.yaml)
# The secret files (docs/security.md, "Secrets on Compose"): written from the env file by `make up`
# and `make restore` into a 0700 directory beside it (.env -> .env.secrets/), which compose.yaml's
# `secrets:` name (an absolute path). SECRETS_DIGEST, a digest of the files as they are when each
# command runs (not a secret), is in the services' environment: a changed secret recreates the
# containers that read it. Both are handed to Compose's commands only (`make test` runs stacks of
# its own, with their own files).
SECRETS_DIR ?= $(abspath $(ENV_FILE)).secrets
WRITE_SECRETS := compose/scripts/write-secrets.sh
SECRETS_ENV = SECRETS_DIR='$(SECRETS_DIR)' SECRETS_DIGEST="$$($(WRITE_SECRETS) --digest '$(SECRETS_DIR)' 2>/dev/null)"
COMPOSE = $(SECRETS_ENV) docker compose --env-file $(ENV_FILE) $(COMPOSE_FILES)
PROFILES := $(if $(MONITOR),--profile monitoring) $(if $(HA),--profile ha)
# The engine gate (`gate`, the only container with the socket) joins the socket's group
# instead of running as root: the group id is read off the socket here and handed to Compose (an
# exported DOCKER_GID wins).
DOCKER_SOCKET ?= /var/run/docker.sock
DOCKER_GID ?= $(shell stat -c %g $(DOCKER_SOCKET) 2>/dev/null)
export DOCKER_SOCKET DOCKER_GID
SCALER_SERVICE ?= scaler
WHEELHOUSE := .wheelhouse
WHEEL_STAMP := $(WHEELHOUSE)/.stamp
QUEUE ?= io_intensive
COUNT ?= 200
LOAD_ARGS ?=
SERVICE ?=

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,monitoring]'
	@touch $@

venv: $(STAMP) ## Create the virtual environment with the test dependencies

# Two pytest-xdist workers: most tests wait on brokers, containers and workers rather than
# compute, so two share the 2-core machine well. Whole files (and the two whole-stack suites,
# together) stay on one worker: tests/conftest.py schedules them. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: $(STAMP) ## Run the whole test suite (starts throwaway Redis/Postgres/RabbitMQ when not given)
	$(VENV)/bin/pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope) $(PYTEST_ARGS)

# A long nemesis campaign (tests/chaos/nemesis.py) on its own chaos stack: faults at random moments
# under steady and bursty load; the seed (random when not given) is printed first and replays it.
# The table per fault kind is printed and written to NEMESIS_TABLE. Needs the Docker engine. Its
# project is cst-nemesis-*, not cst-test-*: a CI run on the same engine cleans up only its own.
DURATION ?= 30m
SEED ?=
NEMESIS_TABLE ?= nemesis-table.md
nemesis: $(STAMP) ## Run a nemesis campaign: DURATION=30m SEED=n (table also in NEMESIS_TABLE)
	CHAOS_PROJECT_PREFIX=cst-nemesis- $(VENV)/bin/python tests/chaos/nemesis.py --duration $(DURATION) $(if $(SEED),--seed $(SEED)) --table $(NEMESIS_TABLE)

lint: $(STAMP) ## Run ruff, mypy and the layer rules (pyproject's import-linter contracts)
	$(VENV)/bin/ruff check services scaler tests bench
	$(VENV)/bin/ruff format --check services scaler tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Always run: it creates the file, or appends only the secrets an older file lacks.
.PHONY: $(ENV_FILE)
$(ENV_FILE):
	@compose/scripts/init-env.sh .env.example $(ENV_FILE)

# Built on the host (its pip reaches the index; containers cannot), for the image's interpreter:
# async-timeout is listed explicitly because its marker (Python < 3.11.3) is false on the host but
# true for Debian's 3.11.2; setuptools and wheel let pip build the project itself offline. The
# scaler's fastapi and uvicorn (and their starlette, anyio, h11, click, idna, annotated-doc,
# typing-inspection, opentelemetry-api) are pure-Python wheels with no marker that is false on the
# host but true on 3.11.2 (checked: only python_version < '3.11' markers, false on both).
$(WHEEL_STAMP): pyproject.toml
	rm -rf $(WHEELHOUSE)
	$(PYTHON) -m pip wheel -q --disable-pip-version-check -w $(WHEELHOUSE) \
	  '.[monitoring]' 'async-timeout>=4.0.3' 'setuptools>=68' wheel
	rm -f $(WHEELHOUSE)/celery_autoscale_stack-*.whl
	@touch $@

wheels: $(WHEEL_STAMP) ## Build the dependency wheelhouse for offline image builds (when stale)

up: $(ENV_FILE) ## Start the stack (creates .env with fresh secrets; MONITOR=1 Flower, HA=1 standby scaler, PROD=1 limits, remembered; PROD=0 forgets)
	@$(if $(PROD),compose/scripts/remember-prod.sh $(ENV_FILE) $(if $(PROD_ON),1,0))
	@compose/scripts/check-env.sh $(ENV_FILE)
	@$(WRITE_SECRETS) $(ENV_FILE) $(SECRETS_DIR)
	@[[ -S $(DOCKER_SOCKET) && -n "$(DOCKER_GID)" ]] || { echo "up: DOCKER_GID: cannot read the group of the Docker socket $(DOCKER_SOCKET) (set DOCKER_SOCKET or DOCKER_GID)" >&2; exit 1; }
	@if command -v $(PYTHON) >/dev/null && $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory wheels || echo "up: wheelhouse build failed; the image build will use the package index" >&2; \
	else echo "up: no $(PYTHON) with pip on this host; the image build will use the package index" >&2; fi
	$(COMPOSE) $(PROFILES) build
	$(COMPOSE) $(PROFILES) up -d --wait --remove-orphans
	@echo
	@echo "The stack is up. Where to look:"
	@echo "  http://127.0.0.1:$${SCALER_HTTP_PORT_HOST:-9808}/               the scaler's live dashboard (pause/pin need SCALER_TOKEN from $(ENV_FILE))"
	@echo "  make ps                              status and health of every container"
	@echo "  make logs SERVICE=worker-io          follow one service's logs (all without SERVICE)"
	@echo "  make scaler-status                   the scaler's table: replicas, queues, decisions"
	@echo "                                       (HTTP: http://127.0.0.1:$${SCALER_HTTP_PORT_HOST:-9808}/status, /metrics)"
	@echo "  make load QUEUE=io_intensive COUNT=500   send a burst of tasks (queues: default"
	@echo "                                       cpu_intensive io_intensive priority scheduled)"
	@echo "  make monitor                         Flower on http://127.0.0.1:$${FLOWER_HOST_PORT:-5555} (user/password in $(ENV_FILE))"
	@echo "  make down                            stop (keeps data);  make clean  also deletes the data"

monitor: ## Start the stack with Flower (127.0.0.1 only, basic auth from .env)
	@$(MAKE) --no-print-directory up MONITOR=1

scaler-status: ## Show the scaler's status table (SCALER_SERVICE=scaler-standby for the HA standby)
	@$(COMPOSE) exec -T $(SCALER_SERVICE) scaler status

down: ## Stop the stack and remove its containers (keeps the data volumes)
	$(COMPOSE) --profile monitoring --profile ha down --remove-orphans

clean: ## Stop the stack and DELETE its volumes (queued tasks, database, beat state)
	@echo "clean: removing the stack's containers, networks and volumes: Redis queues, PostgreSQL data and beat state are deleted"
	$(COMPOSE) --profile monitoring --profile ha down --volumes --remove-orphans

# Backups of this host's stack (services/backup.py, docs/backup.md): PostgreSQL (pg_dump), Redis
# (a BGSAVE snapshot: the queued tasks), beat's and the scaler's volumes, a manifest with sha256
# sums, in BACKUP_DIR/<project>-<UTC time>/. Never the env file (nor its .secrets files): keep it
# apart. The restore checks the sums first, writes the secret files from the env file, stops the
# writers, puts everything back and starts the stack (MONITOR/HA too).
BACKUP_DIR ?= backups
BACKUP ?=
STACK_BACKUP = $(SECRETS_ENV) $(PYTHON) -m services.backup
STACK_BACKUP_ARGS = --env-file $(ENV_FILE) $(COMPOSE_FILES)
.PHONY: backup restore
backup: ## Back up the running stack into BACKUP_DIR (backups)/<project>-<time>/ (.env not included)
	@$(STACK_BACKUP) backup $(STACK_BACKUP_ARGS) --out $(BACKUP_DIR)

restore: ## Restore BACKUP=<dir> (refused unless its manifest and sums check out), then start the stack
	@[[ -n "$(BACKUP)" ]] || { echo "restore: BACKUP=<directory made by make backup> is required (ls $(BACKUP_DIR))" >&2; exit 2; }
	@compose/scripts/check-env.sh $(ENV_FILE)
	@$(WRITE_SECRETS) $(ENV_FILE) $(SECRETS_DIR)
	@$(STACK_BACKUP) restore $(STACK_BACKUP_ARGS) $(PROFILES) "$(BACKUP)"

rotate-db-owner: ## Rotate PostgreSQL's owner password on the running stack (the database, the env file, then the containers that read it)
	@$(SECRETS_ENV) $(PYTHON) -m services.rotate db-owner $(STACK_BACKUP_ARGS)
	@$(WRITE_SECRETS) $(ENV_FILE) $(SECRETS_DIR)
	$(COMPOSE) $(PROFILES) up -d --wait

ps: ## Show the stack's containers and their health
	$(COMPOSE) --profile monitoring --profile ha ps

logs: ## Follow the logs (SERVICE=worker-io for one service)
	$(COMPOSE) --profile monitoring --profile ha logs --follow --tail=100 $(SERVICE)

# A one-off container of the application image on the stack's network (the broker's port is not
# published); the migrate service's definition carries no scaler label. LOAD_ARGS="--duration 1".
# Refused when no Compose stack runs here (`compose run` would create its network and volumes on
# whatever engine DOCKER_HOST names): on a swarm, make swarm-load.
load: ## Send a burst of tasks: QUEUE="io_intensive cpu_intensive" (or all) COUNT=200
	@if [[ -z "$$($(COMPOSE) ps -q redis 2>/dev/null)" ]]; then \
	  echo "load: no running Compose stack on this engine ($${DOCKER_HOST:-the local socket}): start it with make up" >&2; \
	  if [[ "$$(docker info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" == true ]]; then \
	    echo "load: this engine is a swarm manager: for the stack on Swarm, make swarm-load QUEUE=... COUNT=..." >&2; fi; \
	  exit 1; fi
	$(COMPOSE) run --rm --no-deps migrate python -m services.load \
	  $(foreach q,$(QUEUE),--queue $(q)) --count $(COUNT) $(LOAD_ARGS)

# Docker Swarm (compose/stack.yaml, docs/swarm.md), against the manager DOCKER_HOST names. Images
# come from a registry every node reaches (APP_IMAGE=registry.example:5000/celery-app:1), or are
# loaded on every node without one: make swarm-images SWARM_NODES="ssh://node-1 ssh://node-2 ...".
.PHONY: swarm-images swarm-preflight swarm-secrets swarm-up swarm-load swarm-down swarm-dashboard \
  swarm-dashboard-stop swarm-status
SWARM := ENV_FILE=$(ENV_FILE) compose/scripts/swarm.sh
swarm-images: $(ENV_FILE) ## Swarm: build the images locally and docker load them on every node of SWARM_NODES
	@if command -v $(PYTHON) >/dev/null && $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory wheels || echo "swarm-images: wheelhouse build failed; the image build will use the package index" >&2; fi
	@$(SWARM) images
swarm-preflight: $(ENV_FILE) ## Swarm: can the nodes (SWARM_NODES, else the manager) do encrypted overlays?
	@$(SWARM) preflight
swarm-secrets: $(ENV_FILE) ## Swarm: create the stack's Docker secrets from .env (existing ones kept)
	@$(SWARM) secrets
swarm-up: $(ENV_FILE) ## Swarm: IPsec preflight, secrets, docker stack deploy as SWARM_STACK (celery); SWARM_UNENCRYPTED=1
	@$(SWARM) up
swarm-load: $(ENV_FILE) ## Swarm: send a burst of tasks from a one-off service: QUEUE=io_intensive COUNT=200
	@QUEUE="$(QUEUE)" COUNT="$(COUNT)" LOAD_ARGS="$(LOAD_ARGS)" $(SWARM) load
swarm-down: ## Swarm: docker stack rm, wait until it is gone, say what is left (SWARM_REMOVE_SECRETS=1)
	@$(SWARM) down
swarm-dashboard: $(ENV_FILE) ## Swarm: the scaler's dashboard on the manager's 127.0.0.1:SCALER_HTTP_PORT_HOST (.env: 9808)
	@$(SWARM) dashboard
swarm-dashboard-stop: ## Swarm: remove the dashboard's forwarder
	@$(SWARM) dashboard-stop
swarm-status: ## Swarm: the stack's services, where each task runs, why a task is not running
	@$(SWARM) status

# Benchmarks (bench/): measured on this machine, written to docs/benchmarks.md with plots under
# docs/img/. matplotlib is installed into the venv on first use (optional group "bench").
# The README's screenshot: the dashboard's browser test, saving its mid-burst screenshot.
.PHONY: dashboard-screenshot
dashboard-screenshot: $(STAMP) ## Rewrite docs/img/dashboard.png (needs chromium and the test servers)
	DASHBOARD_SCREENSHOT=docs/img/dashboard.png $(VENV)/bin/pytest -q tests/scaler/test_dashboard_browser.py

.PHONY: bench
BENCH ?=
bench: $(STAMP) ## Run the benchmarks and write docs/benchmarks.md (BENCH="throughput" for one)
	@$(VENV)/bin/python -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q matplotlib
	$(VENV)/bin/python -m bench $(BENCH)

# Celery stack with a sidecar autoscaler. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv test lint

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,monitoring]'
	@touch $@

venv: $(STAMP) ## Create the virtual environment with the test dependencies

test: $(STAMP) ## Run the whole test suite (starts throwaway Redis/Postgres/RabbitMQ when not given)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP) ## Run ruff and mypy
	$(VENV)/bin/ruff check services scaler tests
	$(VENV)/bin/ruff format --check services scaler tests
	$(VENV)/bin/mypy

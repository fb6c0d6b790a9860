# Everyday commands. Each is a thin wrapper over a script, so CI (.ci/run -> scripts/test.sh) and
# `make` run the same thing. Every target first makes sure .venv is installed (scripts/_env.sh).
#   make setup         create/refresh .venv from requirements/cpu.lock + dev.lock
#   make test          the README's test command: gates, then unit, integration, slow tiers
#   make gates         the static gates only (lint, format check, typecheck, imports)
#   make unit | integration | slow      one test tier (ARGS="-k learner" passes pytest options)
#   make lint | lint-fix | format | format-check | typecheck | imports   one gate, or its fixer
#   make quickstart    the short F-GRPO run on the tiny model (ARGS="trainer.total_steps=5" overrides)
#   make bench         the learner throughput benchmark (scripts/bench_learner.py; ARGS for its flags)
#   make clean         caches and build leftovers (not .venv, not outputs/)
SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV := source scripts/_env.sh >/dev/null &&
ARGS ?=
# ruff's fixer and formatter act on these (default: the whole tree); e.g. make format FILES=rlsys/algo
FILES ?= .

.PHONY: help setup test gates unit integration slow lint lint-fix format format-check typecheck imports \
        quickstart bench clean

help:
	@sed -n '1,/^SHELL/p' Makefile | grep '^#' | sed 's/^# \{0,1\}//'

setup:
	@source scripts/_env.sh

test:
	./scripts/test.sh $(ARGS)

gates:
	./scripts/gates.sh

unit:
	@$(ENV) python -m pytest -m "not integration and not slow and not gpu" -p no:cacheprovider $(ARGS)

integration:
	@$(ENV) python -m pytest -m "integration and not slow" -p no:cacheprovider $(ARGS)

slow:
	@$(ENV) python -m pytest -m "slow or gpu" -p no:cacheprovider $(ARGS)

lint:
	./scripts/gates.sh lint

lint-fix:
	@$(ENV) ruff check --fix $(FILES)

format:
	@$(ENV) ruff format $(FILES)

format-check:
	./scripts/gates.sh format

typecheck:
	./scripts/gates.sh types

imports:
	./scripts/gates.sh imports

quickstart:
	./scripts/quickstart.sh $(ARGS)

bench:
	@$(ENV) python scripts/bench_learner.py $(ARGS)

clean:
	rm -rf .mypy_cache .ruff_cache .import_linter_cache .pytest_cache *.egg-info
	find . -path ./.venv -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

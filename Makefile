# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: the CPU build lies on disk, and a looser pin pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rewardloop demo --workdir demo-run

test: $(STAMP)
	$(BIN)/ruff check .
	# The layer contract of docs/architecture.md (pyproject.toml [tool.importlinter]).
	$(BIN)/lint-imports --no-cache
	# Types: strict on ops, losses, pg_losses and rollout, standard elsewhere ([tool.mypy]).
	$(BIN)/mypy
	# --reruns 1: a test that fails once and then passes is reported as RERUN in the summary
	# (kept visible), so one rare timing flake does not fail CI.
	$(BIN)/python -m pytest -n 2 --dist loadgroup --reruns 1 -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo-run build *.egg-info src/*.egg-info

# Two commands do all the set-up: `make demo` (install + run on 3 demo pods) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/warmpool-router --demo 3 --metrics-port 0

test: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/mypy

# Router vs nginx vs the direct path (~10 min); `make bench BENCH_ARGS=--quick` for a smoke run.
# BENCH_BASE: the commit whose router is measured beside this one (the round's 5% budget).
BENCH_BASE ?= 4f7774e
bench: $(STAMP)
	bash bench/install.sh
	$(BIN)/python -m bench.run $(if $(BENCH_BASE),--compare $(BENCH_BASE)) $(BENCH_ARGS)

# Fault-injection soak (minutes): 100,000 requests at c=256 over pods that fail at random,
# with --workers 1 then 2; `make soak SOAK_ARGS="--requests 20000"` for a shorter one.
soak: $(STAMP)
	$(BIN)/python -m soak.run $(SOAK_ARGS)

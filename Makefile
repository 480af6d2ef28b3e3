# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install the project, run the end-to-end demo on the built-in data
#   make test   -- create .venv, install the project with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install lint

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate setup.py
	$(BIN)/pip install -q -e ".[all]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/avg-jax demo --out $(DEMO_OUT)

test: install
	XLA_FLAGS="$${XLA_FLAGS:---xla_force_host_platform_device_count=8}" $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

lint: install
	$(BIN)/ruff check avg_jax tests benchmarks

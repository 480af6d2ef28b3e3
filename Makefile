# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install the project (core dependencies only), run the end-to-end demo
#   make test   -- create .venv, install the project with every extra the tests use, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install install-demo lint

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the core dependencies (no TensorFlow, PyTorch or faiss).
$(VENV)/.installed-core: $(BIN)/activate setup.py
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: $(BIN)/activate setup.py
	$(BIN)/pip install -q -e ".[all]"
	touch $@

install-demo: $(VENV)/.installed-core

install: $(VENV)/.installed

demo: install-demo
	$(BIN)/avg-jax demo --out $(DEMO_OUT)

test: install
	XLA_FLAGS="$${XLA_FLAGS:---xla_force_host_platform_device_count=8}" $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

lint: install
	$(BIN)/ruff check avg_jax tests benchmarks

# bna-gateway: `make demo` builds the embedded default bundle (if missing) and serves it;
# `make test` builds the environment from nothing and runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= artifacts/demo
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: env test test-fast demo demo-build serve bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

env: $(BIN)/.installed

test: env
	$(BIN)/python -m pytest -q

test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

demo-build: env
	$(BIN)/bna demo --out $(DEMO_DIR)

demo: demo-build
	$(BIN)/bna serve $(DEMO_DIR)/bundle --host $(HOST) --port $(PORT)

bench: env
	$(BIN)/python bench/detect_batching.py
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache

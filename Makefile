# bna-gateway: `make demo` builds the embedded default bundle (if missing) and serves it;
# `make test` builds the environment from nothing and runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= artifacts/demo
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: env promtool prometheus test test-fast demo demo-build serve bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

env: $(BIN)/.installed

# promtool (Debian's `prometheus` package) for tests/test_deploy.py. Best effort: only the promtool
# binary is unpacked into the venv (no Prometheus daemon is installed); root refreshes the package
# lists first. When it cannot be had, the promtool checks are skipped with a reason.
promtool: env
	@command -v promtool >/dev/null 2>&1 || test -x $(BIN)/promtool || { \
	  tmp=$$(mktemp -d); \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1; fi; \
	  (cd $$tmp && apt-get download -qq prometheus >/dev/null 2>&1) \
	    && dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root \
	    && cp $$tmp/root/usr/bin/promtool $(BIN)/promtool; \
	  rm -rf $$tmp; \
	  test -x $(BIN)/promtool || echo "promtool unavailable: tests/test_deploy.py skips its promtool checks"; \
	}

# The Prometheus server for tests/test_gateway_prometheus.py (a real Prometheus scrapes the gateway).
# Best effort, as for promtool: the binary is unpacked from Debian's `prometheus` package into the venv
# (no daemon, no service), or, failing that, root installs the package with apt. When neither works
# the test is skipped with a reason.
prometheus: env
	@command -v prometheus >/dev/null 2>&1 || test -x $(BIN)/prometheus || { \
	  tmp=$$(mktemp -d); \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1; fi; \
	  (cd $$tmp && apt-get download -qq prometheus >/dev/null 2>&1) \
	    && dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root \
	    && cp $$tmp/root/usr/bin/prometheus $(BIN)/prometheus; \
	  rm -rf $$tmp; \
	  if ! test -x $(BIN)/prometheus && [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || true; \
	  fi; \
	  command -v prometheus >/dev/null 2>&1 || test -x $(BIN)/prometheus \
	    || echo "prometheus unavailable: tests/test_gateway_prometheus.py is skipped"; \
	}

test: env promtool prometheus
	$(BIN)/python -m pytest -q

test-fast: env promtool prometheus
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

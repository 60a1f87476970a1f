# bna-gateway: `make demo` builds the embedded default bundle (if missing) and serves it;
# `make test` builds the environment from nothing and runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= artifacts/demo
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: env prometheus nginx test test-fast demo demo-build serve bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

env: $(BIN)/.installed

# Prometheus' server and promtool, both from Debian's `prometheus` package: the server for
# tests/test_gateway_prometheus.py (a real Prometheus scrapes the gateway), promtool for
# tests/test_deploy.py (config, rules and dashboard queries). Best effort: the two binaries are unpacked
# from one download into the venv (no daemon, no service); failing that, root installs the package with
# apt. Whatever cannot be had is reported, and the tests that need it are skipped with a reason.
prometheus: env
	@missing=; for tool in prometheus promtool; do \
	  command -v $$tool >/dev/null 2>&1 || test -x $(BIN)/$$tool || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
	  tmp=$$(mktemp -d); \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1; fi; \
	  (cd $$tmp && apt-get download -qq prometheus >/dev/null 2>&1) \
	    && dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root \
	    && for tool in $$missing; do cp $$tmp/root/usr/bin/$$tool $(BIN)/$$tool; done; \
	  rm -rf $$tmp; \
	  for tool in $$missing; do \
	    if ! test -x $(BIN)/$$tool && [ "$$(id -u)" = 0 ]; then \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || true; \
	    fi; \
	    command -v $$tool >/dev/null 2>&1 || test -x $(BIN)/$$tool \
	      || echo "$$tool unavailable: the tests that need it are skipped"; \
	  done; \
	fi

# nginx, from Debian's `nginx` package, for tests/test_deploy_scaleout.py: `nginx -t` on the compose load
# balancer's config, and that config in front of a real gateway. Same best effort as above: the binary
# is unpacked into the venv; failing that, the tests that need it are skipped with a reason.
nginx: env
	@if ! command -v nginx >/dev/null 2>&1 && ! test -x $(BIN)/nginx; then \
	  tmp=$$(mktemp -d); \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1; fi; \
	  (cd $$tmp && apt-get download -qq nginx >/dev/null 2>&1) \
	    && dpkg-deb -x $$tmp/nginx_*.deb $$tmp/root \
	    && cp $$tmp/root/usr/sbin/nginx $(BIN)/nginx; \
	  rm -rf $$tmp; \
	  test -x $(BIN)/nginx && $(BIN)/nginx -v >/dev/null 2>&1 \
	    || { rm -f $(BIN)/nginx; echo "nginx unavailable: the tests that need it are skipped"; }; \
	fi

test: env prometheus nginx
	$(BIN)/python -m pytest -q

test-fast: env prometheus nginx
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

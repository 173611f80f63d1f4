# pgpilot: `make demo` runs the whole loop, `make test` runs the tests. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := postgresql-15 postgresql-15-hypopg redis-server pgbouncer prometheus time
PYTEST_ARGS ?=

.PHONY: test demo bench deps system-deps venv clean lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages for the throwaway servers and references; installed only when missing and run as root.
system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi
	@# The Debian postgresql package starts a cluster we do not use; ours are throwaway.

deps: system-deps venv

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PY) -m pgpilot demo

bench: deps
	$(PY) -m bench.proxy_overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

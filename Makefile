# KoroKoro: `make demo` sets everything up and turns the bundled sample video into a model;
# `make test` runs the test suite (CI runs exactly this through .ci/run).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
DATA   ?= ./korokoro-data

.PHONY: setup system-deps demo test test-fast view clean

# Mesa's software OpenGL renders ground-truth turntables and preview images on machines
# without a GPU. Installed with apt when we are root; otherwise we say what is missing.
# Headless Chromium (driven by node + playwright-core) runs the viewer's browser tests; a
# throwaway PostgreSQL tests the queue SQL.
system-deps:
	@missing=""; ldconfig -p | grep -q libOSMesa || missing="$$missing libosmesa6 libgl1"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing (apt-get) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note: missing$$missing; the tests that need them are skipped (sudo apt-get install$$missing)"; fi

# The viewer's bundle is committed; node packages are only needed for its browser test.
viewer/node_modules/.package-lock.json: viewer/package-lock.json
	@if command -v npm >/dev/null; then cd viewer && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "note: node/npm missing; the viewer's browser test will be skipped"; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: system-deps viewer/node_modules/.package-lock.json $(VENV)/.installed

demo: setup
	KOROKORO_DATA=$(DATA) $(VENV)/bin/korokoro run video=sample/basket/video.mp4 name="wicker basket" profile=cpu

view: setup
	KOROKORO_DATA=$(DATA) $(VENV)/bin/korokoro view

test: setup
	PYOPENGL_PLATFORM=osmesa $(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: setup
	PYOPENGL_PLATFORM=osmesa $(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(DATA) outputs multirun .pytest_cache

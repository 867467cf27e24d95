# KoroKoro: `make demo` sets everything up and turns the bundled sample video into a model;
# `make test` runs the test suite (CI runs exactly this through .ci/run).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
DATA   ?= ./korokoro-data

.PHONY: setup system-deps demo test test-fast clean

# Mesa's software OpenGL renders ground-truth turntables and preview images on machines
# without a GPU. Installed with apt when we are root; otherwise we say what is missing.
system-deps:
	@if ldconfig -p | grep -q libOSMesa; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Mesa OSMesa (apt-get) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 libgl1 >/dev/null; \
	else echo "note: libosmesa6 is missing; rendering tests and previews will be skipped (sudo apt-get install libosmesa6)"; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: system-deps $(VENV)/.installed

demo: setup
	KOROKORO_DATA=$(DATA) $(VENV)/bin/korokoro run video=sample/basket/video.mp4 name="wicker basket" profile=cpu

test: setup
	PYOPENGL_PLATFORM=osmesa $(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: setup
	PYOPENGL_PLATFORM=osmesa $(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(DATA) outputs multirun .pytest_cache

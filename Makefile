# Two commands: `make demo` and `make test`. Both create .venv and install sonde if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.sonde-demo
STAMP := $(VENV)/.sonde-test

.PHONY: demo test test-mxnet lint imports typecheck docs bench install clean chromium

install: $(STAMP)

# `make demo` installs only what the demo needs (the core and the 'demo' extra); `make test` the test stack.
# torch first and exactly: a range would pull a CUDA build of several GB.
TORCH_STAMP := $(VENV)/.torch

$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	touch $(TORCH_STAMP)

$(DEMO_STAMP): pyproject.toml | $(TORCH_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(TORCH_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# MXNet 1.9.1 needs numpy<1.24, so it has an environment of its own, with sonde installed in it too.
MXVENV := .venv-mxnet
MXSTAMP := $(MXVENV)/.sonde-installed

$(MXSTAMP): pyproject.toml
	test -x $(MXVENV)/bin/python || $(PYTHON) -m venv $(MXVENV)
	$(MXVENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(MXVENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[mxnet-test]'
	touch $(MXSTAMP)

test-mxnet: $(MXSTAMP)
	$(MXVENV)/bin/python -m pytest -q tests/mxnet_env

demo: $(DEMO_STAMP)
	$(VENV)/bin/sonde demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The architecture's import rules (the [tool.importlinter] contracts in pyproject.toml).
imports: $(STAMP)
	$(VENV)/bin/lint-imports

# The documentation site (mkdocs.yml, docs/): a strict build fails on any warning, such as a broken
# link or a docstring that does not parse.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

# Browser tests drive Debian's Chromium through Playwright (Playwright's own download fails here).
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "make: could not install Debian's chromium; browser tests will be skipped with a reason"

test: $(STAMP) lint imports typecheck docs chromium
	$(PY) -m pytest -q
	$(MAKE) test-mxnet

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,benchmark]'
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(MXVENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

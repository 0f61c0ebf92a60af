# Two user-facing targets (see README): `make demo` and `make test`.
# Both are idempotent: the venv is created once and re-installed only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.5
# Test workers: most of the suite's time is single-threaded XLA compilation, so two
# workers use both CI cores; whole files go to one worker (module fixtures built once), the
# costliest first (tests/conftest.py: HEAVY_FIRST, kept by --no-loadscope-reorder).
TEST_WORKERS ?= 2

.PHONY: demo test test-fast install install-test browser

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.stamp-base
install-test: $(VENV)/.stamp-test

# Debian's chromium for tests/test_app.py (apt, only when missing).
browser:
	bash tools/install-chromium.sh

demo: install
	$(PY) -m jaxdiff.cli generate --prompt "a small red circle on the left" \
	  --prompt "a big blue square" --prompt "a green triangle at the top" \
	  --prompt "a yellow star on a black background" --prompt "a cross on a gray background" \
	  --prompt "a purple object" --batch 2 --out outputs/demo

test: install-test browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# For iteration: everything except the PyTorch-reference and slow tests (markers in
# tests/conftest.py). `make test` (and CI) still runs the whole suite.
test-fast: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not reference" tests

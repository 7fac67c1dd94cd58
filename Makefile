# One command runs the main job, one passes the tests; both install what they need.
#   make demo   - small real pretraining run on the embedded default data, then export + generate
#   make test   - the whole test suite (slow multi-process tests included)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

demo: install
	DS_ACCELERATOR=cpu $(PY) -m pretrain.demo

bench: install
	$(PY) -m bench.layer

clean:
	rm -rf $(VENV) build *.egg-info

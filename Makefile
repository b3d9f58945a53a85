# make demo: set up .venv and run the end-to-end CPU demo on the built-in synthetic corpus.
# make test: set up .venv and run the test suite (CPU; Triton kernels under the interpreter).
# TORCH_SPEC picks the torch to install when none is importable in the venv, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test gpu-check clean-data

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test]"
	touch $@

demo: venv
	$(PY) -m pgolf.demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean-data:
	rm -rf data/synthetic

# make demo: set up .venv and run the end-to-end CPU demo on the built-in synthetic corpus.
# make test: set up .venv and run the test suite (CPU; Triton kernels under the interpreter).
# TORCH_SPEC picks the torch to install when none is importable in the venv, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# make gpu-check: on a GPU machine, with the torch/triton already installed there (no venv, no install): the
#   GPU-marked tests and the kernel, training-step and eval benchmarks, all run even when one fails, into
#   bench/results/<date>_<gpu>_<commit>.json plus one bench/history.jsonl record; exit 1 if anything failed.
#   About 19 minutes at most on an H200 (GPU_CHECK_ARGS="--budget-s 540" for a 10-minute slot). Pass
#   PGOLF_COMMIT=<sha> when the tree has no .git, GPU_CHECK_ARGS="--copy-to DIR" to also copy results and logs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=

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

gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m pgolf.bench gpu-check $(GPU_CHECK_ARGS)

clean-data:
	rm -rf data/synthetic

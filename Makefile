# make demo: set up .venv and run the end-to-end CPU demo on the built-in synthetic corpus.
# make test: set up .venv and run the test suite (CPU; Triton kernels under the interpreter).
# TORCH_SPEC picks the torch to install when none is importable in the venv, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# make compile-sweep / compile-compat: see below (no GPU needed).
# make gpu-check: on a GPU machine, with the torch/triton already installed there (no venv, no install): the
#   GPU-marked tests (kernels first), the kernel benchmarks (tuning launch configs into
#   pgolf/kernels/tuned/<gpu>.json as they go), the training step and the eval benchmark, in that order, each
#   stage time-boxed, all of them run even when one fails. Default budget 480 s of work: the whole command ends
#   inside one 10-minute slot. Results: bench/results/<date>_<gpu>_<commit>.json (rewritten after every stage),
#   one bench/history.jsonl record; exit 1 if anything failed. Pass PGOLF_COMMIT=<sha> when the tree has no .git,
#   GPU_CHECK_ARGS="--copy-to DIR" to also copy the results, the tuned file, the history and the logs to DIR.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
COMPAT_TRITON ?= 3.6.0
COMPAT_VENV ?= .venv-triton$(subst .,,$(COMPAT_TRITON))
RESULTS ?= bench/results

.PHONY: venv demo test gpu-check compile-sweep compile-compat clean-data

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

# make compile-sweep: every kernel in every config it could pick (defaults, tuning candidates, tuned-file
#   entries) compiled for sm_90 on this machine with the venv's triton: bench/results/compile_sm90_triton-<v>.json.
compile-sweep: venv
	$(PY) -m pgolf.bench compile --json $(RESULTS)/compile_sm90_triton-$$($(PY) -c "import triton; print(triton.__version__)").json

# make compile-compat: the same sweep with triton $(COMPAT_TRITON) (the GPU machine's) in a side venv.
compile-compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -c "import torch, triton; assert triton.__version__ == '$(COMPAT_TRITON)'" 2>/dev/null \
		|| $(COMPAT_VENV)/bin/python -m pip install $(TORCH_SPEC) triton==$(COMPAT_TRITON) numpy
	PYTHONPATH=. $(COMPAT_VENV)/bin/python -m pgolf.bench compile --json $(RESULTS)/compile_sm90_triton-$(COMPAT_TRITON).json

clean-data:
	rm -rf data/synthetic

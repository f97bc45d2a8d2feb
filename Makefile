# Entry points. `make train` and `make test` work on a fresh machine: they build .venv when it is missing
# or older than pyproject.toml. TORCH_SPEC pins the CPU build that lies on this machine's disk; a GPU
# cluster overrides it (e.g. make test TORCH_SPEC="torch==2.13.0 --index-url ..." TRITON_SPEC=).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Triton for the FP8 kernels' tests (run in its interpreter on CPU): the Hopper machine's version. A CUDA torch
# brings its own Triton: there pass TRITON_SPEC= (empty) to keep it.
TRITON_SPEC ?= triton==3.6.0
STAMP := $(VENV)/.installed
ARGS ?=
NAME ?=
PYTEST_ARGS ?=

.PHONY: venv train test test-fast bench lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	@# deepspeed's setup.py imports torch: build it against the torch above, not an isolated (CUDA) one
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e ".[dev]"
	@if [ -n "$(TRITON_SPEC)" ]; then $(PY) -m pip install -q "$(TRITON_SPEC)"; fi
	@touch $(STAMP)

train: $(STAMP)
	bash scripts/train.sh $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --timeout 900 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(NAME)

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)

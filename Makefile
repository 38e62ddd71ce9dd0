# slm: the two commands for a fresh machine are `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless a GPU is present: a bare `torch` from PyPI is the multi-GB CUDA build.
# GPU machines: `make install TORCH=torch` (or any CUDA build you prefer).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
# Two stamps: `make train` installs only what the main job needs (torch and the package, no extra),
# so a fresh clone trains within minutes; `make install`, `make test`, `make bench` and `make lint`
# add every extra on top (after `make train`, they install only the rest).
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
EXTRAS := dev,wandb,tensorboard,slurm,hf,report,eval
ARGS ?=
# Test processes: most tests spend their time starting `slm` subprocesses, one core each, so one
# worker per core (up to 4) halves the suite on 2 cores. A module's tests stay on one worker, so its
# fixtures run once (and the SLURM tests never share the local cluster). TEST_WORKERS=0: in-process.
TEST_WORKERS ?= auto

.PHONY: install train test bench lint clean

install: $(STAMP)

# One pip run for torch and the package: one resolution, and torch's pin holds for `torch>=2.4`.
$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

train: $(CORE)  ## prepare the embedded stdlib corpus and train gpt2-nano on it
	$(BIN)/slm train $(ARGS)

test: install  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist loadscope $(ARGS)

bench: install  ## benchmarks; figures go to docs/benchmarks.md
	$(BIN)/python benchmarks/run.py $(ARGS)

lint: install
	$(BIN)/ruff check slm_cli tests benchmarks scripts

clean:
	rm -rf $(VENV) outputs multirun data .pytest_cache .ruff_cache build *.egg-info

# sdprep developer commands. `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SDPREP := $(VENV)/bin/sdprep
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false

LOCK := constraints.txt

.PHONY: help setup demo test typecheck test-slow test-gpu test-latest lock lint format bench bench-fullsize clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	# every install goes through the lock: a new release on the package index never changes it
	$(PY) -m pip install -q -c $(LOCK) pip setuptools wheel
	# torch first (the lock pins the CPU-served 2.13.0; an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install sdprep with all extras

demo: setup  ## run the whole pipeline on sample_data, offline, with a tiny demo model
	$(SDPREP) run sample_data/project.toml

test: setup  ## the type checker (mypy --strict), then the test suite (offline, one torch thread)
	VENV=$(VENV) bash .ci/typecheck
	$(VENV)/bin/pytest

typecheck: setup  ## mypy --strict on sdprep/, prep/, train/, taggers/ (pyproject.toml's [tool.mypy])
	VENV=$(VENV) bash .ci/typecheck

test-slow: setup  ## the slow tests: LoRA, TI and fine-tune on the topology-true SDXL, the planner vs real runs and full-size traces (5-10 min, 8 GB of RAM)
	$(VENV)/bin/pytest -m slow

test-gpu: setup  ## on a CUDA machine: the memory planner vs torch.cuda.max_memory_allocated, bf16/fp16/8-bit paths
	$(VENV)/bin/pytest tests/test_gpu.py -v

test-latest:  ## the tests against the newest releases on the index, in .venv-latest (not in CI)
	bash .ci/test-latest

lock:  ## write constraints.txt (new dependencies added, pins kept; UPGRADE=1: newest releases)
	UPGRADE=$(UPGRADE) bash .ci/lock

lint: setup  ## ruff lint + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup  ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: setup  ## run the benchmarks (prints ratios against named baselines; not the full-size one)
	for b in benchmarks/bench_*.py; do [ $$b = benchmarks/bench_fullsize.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-fullsize: setup  ## LoRA steps on the real full-size SDXL on the CPU (about 20 min, 8 GB of RAM)
	$(PY) benchmarks/bench_fullsize.py

clean:  ## remove build output and the demo folder
	rm -rf build dist *.egg-info demo_output

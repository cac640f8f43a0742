# sdprep developer commands. `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SDPREP := $(VENV)/bin/sdprep
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup demo test lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install sdprep with all extras

demo: setup  ## run the whole pipeline on sample_data, offline, with a tiny demo model
	$(SDPREP) run sample_data/project.toml

test: setup  ## run the test suite (offline, one torch thread)
	$(VENV)/bin/pytest

lint: setup  ## ruff lint + format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup  ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: setup  ## run the benchmarks (prints ratios against named baselines)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove build output and the demo folder
	rm -rf build dist *.egg-info demo_output

# Two commands do everything on a fresh CPU machine (Python 3.11, pip configured offline):
#   make demo   set up .venv, then optimise and benchmark the example model
#   make bench  the benchmark suite (BENCH_ARGS=--quick for a short run) -> out/bench/cpu/ (uncommitted);
#               BENCH_ARGS=--update-results replaces the committed benchmarks/results/cpu/ the README cites
#   make test   set up .venv, then run the default (fast) test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu-py311.txt
PYTEST_ARGS ?=
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip repeats one warning per package for this machine's offline index folders; keep the log readable
PIPQUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

BENCH_ARGS ?=

.PHONY: setup demo test test-slow test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml examples/fold_bn/pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[ort,zoo,bench,dev]" -e examples/fold_bn $(PIPQUIET)
	@touch $@

demo: setup
	rm -rf out/resnet18 out/resnet18-auto.json out/resnet18-auto.png
	mkdir -p out
	$(VENV)/bin/graphopt inspect examples/resnet18.py --draw out/resnet18-graph.png | tail -n 4
	# automatic mode: candidates decided by measuring the training step (small settings: ~1 minute here)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/graphopt optimize examples/resnet18.py --device cpu --batch-size 2 \
		--rounds 3 --steps 1 --warmup 1 --time-budget 60 --report out/resnet18-auto.json -o out/resnet18
	# benchmark the pipeline it chose against the original
	$(PY) -c "import json; print(*(a for p in json.load(open('out/resnet18-auto.json'))['auto']['pipeline'] \
		for a in ('-p', p)), sep='\n', end='')" | OMP_WAIT_POLICY=PASSIVE xargs -d '\n' $(VENV)/bin/graphopt bench \
		examples/resnet18.py --batch-size 4 --steps 6 --warmup 1 --rounds 3 -o out/resnet18-bench --force

bench: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/run_suite.py $(BENCH_ARGS)

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-slow: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 -m slow $(PYTEST_ARGS)

test-all: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 -m "" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache

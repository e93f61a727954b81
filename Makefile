# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-cluster test-system test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# uv lays down the ~6 GB of wheels (torch with CUDA) in 2 minutes where pip takes five; pip if uv fails.
	# --compile-bytecode: without .pyc files (PYTHONDONTWRITEBYTECODE=1 here) every Ray worker's imports take twice as long.
	$(BIN)/python -m pip install -q uv && $(BIN)/python -m uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[test]' \
	  || $(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The demo's classifiers see 10 epochs' worth of the digits each (the recipe's 30 are for benchmarks/effectiveness.py).
DEMO_BUDGET ?= 14370
demo: $(STAMP)
	$(BIN)/python jobs/scale_in1k.py --preset tiny --mult 1 --out runs/demo --set train.budget_images=$(DEMO_BUDGET)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster_sim

test-system: $(STAMP)
	$(BIN)/python -m pytest -q -m "system or cluster_sim"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) runs .pytest_cache

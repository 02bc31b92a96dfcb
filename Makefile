# The two commands of the README. Both set everything up first (scripts/setup.sh is a no-op once done).
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test test-fast lint bench

setup:
	@bash scripts/setup.sh

## demo: the main job on the built-in data (tiny weighted pretraining → SFT → GRPO; ends with a summary of where the models, logs and plots went)
demo: setup
	$(PYTHON) trainers/demo.py --config recipes/tiny/demo.yaml $(ARGS)

## test: the whole test suite (about 10 minutes on 2 CPU cores)
test: setup
	$(PYTHON) -m pytest -q $(ARGS)

test-fast: setup
	$(PYTHON) -m pytest -q -m "not multiprocess and not slow" $(ARGS)

lint: setup
	$(PYTHON) -m ruff check hfweight trainers tests benchmarks

bench: setup
	$(PYTHON) benchmarks/bench_overhead.py $(ARGS)

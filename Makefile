# The two commands of the README (`make demo`, `make test`) and the version checks. Each target sets its environment
# up first (scripts/setup.sh; a no-op once done).
#
# Where the packages go: inside an activated virtual or conda environment, into it; otherwise into the project's own
# `.venv` (created on first use), so a system Python that refuses pip (PEP 668) is never touched.
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python
else
PYTHON ?= .venv/bin/python
endif
export PYTHON

# The fast core that decides whether a new upstream release is safe: the private seams, bit-for-bit parity with each
# parent trainer, GA/rank invariance, exact resume, and one run of each trainer.
CORE_TESTS = tests/test_seams.py tests/test_parity.py tests/test_invariance.py tests/test_state.py \
	tests/test_sample_resume.py tests/test_sft.py tests/test_rl.py

.PHONY: setup demo test test-fast test-latest test-oldest lock lint bench wheel-check

setup:
	@bash scripts/setup.sh

## demo: the main job on the built-in data (tiny weighted pretraining → SFT → GRPO; ends with a summary of where the models, logs and plots went)
demo: setup
	$(PYTHON) -m hfweight demo --config tiny/demo $(ARGS)

## test: the whole test suite with the validated versions of requirements/lock.txt
test: setup
	$(PYTHON) -m pytest -q $(ARGS)

test-fast: setup
	$(PYTHON) -m pytest -q -m "not multiprocess and not slow" $(ARGS)

## test-latest: the newest releases of every dependency, in .venv-latest, against the fast core (drift check)
test-latest:
	@PYTHON=.venv-latest/bin/python LOCK=none bash scripts/setup.sh
	.venv-latest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|trl|accelerate|datasets|peft|tokenizers|deepspeed)=='
	.venv-latest/bin/python -m pytest -q $(CORE_TESTS) $(ARGS)

## test-oldest: the oldest versions pyproject.toml claims (requirements/oldest.txt), in .venv-oldest, against the fast core
test-oldest:
	@PYTHON=.venv-oldest/bin/python LOCK=requirements/oldest.txt bash scripts/setup.sh
	.venv-oldest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|trl|accelerate|datasets|peft|tokenizers|deepspeed)=='
	.venv-oldest/bin/python -m pytest -q $(CORE_TESTS) $(ARGS)

## lock: after `make test-latest` (and `make test` in .venv-latest) passed, adopt its versions as the validated set
lock:
	@test -x .venv-latest/bin/python || { echo "run make test-latest first"; exit 1; }
	@{ sed -n '1,2p' requirements/lock.txt; .venv-latest/bin/python -m pip freeze --exclude-editable; } > requirements/lock.txt.new
	@mv requirements/lock.txt.new requirements/lock.txt
	@echo "requirements/lock.txt now holds .venv-latest's versions: review 'git diff requirements/lock.txt', run make test, commit"

## wheel-check: build the wheel, install it in a fresh venv outside the repository, run `hfweight` from there (~3 min)
wheel-check: setup
	PYTHON=$(PYTHON) bash scripts/wheel_check.sh

lint: setup
	$(PYTHON) -m ruff check hfweight trainers tests benchmarks

bench: setup
	$(PYTHON) benchmarks/bench_overhead.py $(ARGS)

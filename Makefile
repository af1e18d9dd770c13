# Two commands from a fresh clone: `make run` and `make test`. Both set up .venv first (idempotent).
CONFIG ?= configs/default.yaml
ARGS ?=
PY := .venv/bin/python

.PHONY: setup run test test-fast clean
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m pipeline run $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25 $(ARGS)

test-fast: setup  ## unit tests only (seconds)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider $(ARGS)

clean:
	rm -rf runs .pytest_cache

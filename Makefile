# Two commands from a fresh clone: `make run` and `make test`. Both set up .venv first (idempotent).
CONFIG ?= configs/default.yaml
ARGS ?=
PY := .venv/bin/python

.PHONY: setup browser run toy test test-fast clean
setup:
	@bash scripts/setup.sh

browser:  ## Debian's chromium, for the test that opens report/index.html (no-op when installed)
	@bash scripts/setup_browser.sh

# the toy model first (~30 s): the run's report prints its claims from runs/<config name>/toy/
run: setup
	$(PY) -m pipeline toy --out runs/$(basename $(notdir $(CONFIG)))/toy
	$(PY) -m pipeline run $(CONFIG) $(ARGS)

toy: setup  ## the paper's toy model alone (runs/toy)
	$(PY) -m pipeline toy --out runs/toy

test: setup browser
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25 $(ARGS)

test-fast: setup browser  ## unit tests only (about 2 minutes)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider $(ARGS)

clean:
	rm -rf runs .pytest_cache

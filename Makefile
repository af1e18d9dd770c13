# Two commands from a fresh clone: `make run` and `make test`. Both set up .venv first (idempotent).
CONFIG ?= configs/default.yaml
ARGS ?=
PY := .venv/bin/python

.PHONY: setup browser run test test-fast clean
setup:
	@bash scripts/setup.sh

browser:  ## Debian's chromium, for the test that opens report/index.html (no-op when installed)
	@bash scripts/setup_browser.sh

run: setup
	$(PY) -m pipeline run $(CONFIG) $(ARGS)

test: setup browser
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25 $(ARGS)

test-fast: setup  ## unit tests only (seconds)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider $(ARGS)

clean:
	rm -rf runs .pytest_cache

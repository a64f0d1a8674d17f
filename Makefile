# Two commands do all the set-up on a fresh machine: `make test` and `make reproduce-figures`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lint format test test-slow bench reproduce-figures clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[tests,experiments]'
	touch $(STAMP)

# ruff's lint rules and its formatter (pyproject.toml); `make format` rewrites in place.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Two workers, whole files each: the suite is mostly XLA compilation, one core per process
# (so one compile thread each: docs/decisions.md D53).
test: $(STAMP)
	JAXMARGIN_COMPILE_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

reproduce-figures: $(STAMP)
	@if [ ! -f experiments/__main__.py ]; then \
		echo "reproduce-figures: the experiment suite (experiments/__main__.py) is missing; no figures were made." >&2; \
		exit 2; \
	fi
	$(PY) -m experiments

clean-venv:
	rm -rf $(VENV)

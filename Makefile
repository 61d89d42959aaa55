# Two commands: `make demo` (the quick CPU demo) and `make test` (the test suite).
# Each creates the virtual environment $(VENV) and installs requirements.txt when missing or
# changed. Reuse an existing environment with `make test VENV=/path/to/venv`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptcl-requirements

.PHONY: demo test perf venv

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@cp requirements.txt $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) bench.py

test: $(STAMP)
	$(PY) -m pytest -q

perf: $(STAMP)
	$(PY) -m pytest tests/perf --benchmark-only -q

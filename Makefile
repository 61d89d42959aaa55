# Two commands: `make demo` (the quick CPU demo) and `make test` (the test suite).
# Each creates the virtual environment $(VENV) and installs requirements.txt when missing or
# changed. Reuse an existing environment with `make test VENV=/path/to/venv`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptcl-requirements

.PHONY: demo test perf venv gpu-check

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

# speed, memory and bf16 precision of every method on the GPU, within GPU_CHECK_BUDGET seconds
# (docs/speed.md). Needs only PyTorch, torchvision and timm, so it does not build the virtual
# environment (which needs the network): it uses $(VENV) if it exists, else $(PYTHON)
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_BUDGET ?= 420
GPU_CHECK_OUT ?= results/gpu-check
gpu-check:
	$(GPU_CHECK_PY) bench.py gpu-check --budget $(GPU_CHECK_BUDGET) --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

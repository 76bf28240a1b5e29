# The one place that knows the install recipe (see ../shared/DESIGN.md, platform facts).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export RECPIPE_HOME ?= $(CURDIR)/workspace

.PHONY: run test test-all lint install clean

run: $(STAMP)  ## install if needed, then one nightly run on the built-in simulator
	$(VENV)/bin/recpipe nightly

test: $(STAMP)  ## install if needed, then the default (lean) test suite
	$(PY) -m pytest -q

test-all: $(STAMP)  ## the whole suite, slow tests included
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .

install: $(STAMP)

# torch 2.13.0 is the CPU wheel on this machine's disk; fbgemm-gpu-cpu replaces the CUDA
# fbgemm-gpu that torchrec's metadata asks for, hence torchrec --no-deps.
$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0 fbgemm-gpu-cpu
	$(PIP) install -q -c constraints.txt --no-deps torchrec
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) workspace

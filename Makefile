# The one place that knows the install recipe (see ../shared/DESIGN.md, platform facts).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export RECPIPE_HOME ?= $(CURDIR)/workspace

.PHONY: run test test-all lint install clean bench-env bench-rankers

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
# fbgemm-gpu that torchrec's metadata asks for, hence torchrec --no-deps. pip and setuptools
# are pinned too; recpipe itself builds with the venv's pinned setuptools (no isolation).
$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt --upgrade pip setuptools
	$(PIP) install -q -c constraints.txt torch==2.13.0 fbgemm-gpu-cpu
	$(PIP) install -q -c constraints.txt --no-deps torchrec
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The benchmark environment: the same pinned install plus DeepCTR-Torch, kept out of .venv so
# the product never depends on it. The last line fails if deepctr-torch changed torch.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

bench-env: $(BENCH_STAMP)  ## .venv-bench: the project's pins + deepctr-torch==0.3.0

$(BENCH_STAMP): constraints.txt pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q -c constraints.txt --upgrade pip setuptools
	$(BENCH_PY) -m pip install -q -c constraints.txt torch==2.13.0 fbgemm-gpu-cpu
	$(BENCH_PY) -m pip install -q -c constraints.txt --no-deps torchrec
	$(BENCH_PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	$(BENCH_PY) -m pip install -q -c constraints.txt deepctr-torch==0.3.0
	$(BENCH_PY) -c "import torch, deepctr_torch; assert torch.__version__.startswith('2.13.0'), \
	  torch.__version__; print('torch', torch.__version__, 'deepctr-torch', deepctr_torch.__version__)"
	touch $(BENCH_STAMP)

bench-rankers: $(BENCH_STAMP)  ## side-by-side ranker benchmark (2 threads) → benchmarks/README.md
	$(BENCH_PY) benchmarks/rankers.py

clean:
	rm -rf $(VENV) workspace

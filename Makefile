# Quick start: `make demo` and `make test`. Both create or reuse .venv.
# torch is pinned and installed first: an unpinned torch pulls the CUDA build (gigabytes).
# Megatron-Core is installed without its dependencies (they pull CUDA builds), only for the
# interop tests: 0.15.3 into the venv, and beside it, in directories the tests put first on
# sys.path, 0.16.1 and the zarr-python 2 stack that Megatron-Core 0.15's zarr reader needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: install demo test bench-env clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test,demo]'
	$(PY) -m pip install --quiet --no-deps megatron-core==0.15.3
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/peers/megatron-core-0.16.1 megatron-core==0.16.1
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/peers/zarr2 zarr==2.18.7 numcodecs==0.15.1 \
		asciitree==1.0.0 fasteners==0.20 deprecated==1.3.1 wrapt==2.5.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q

# The benchmarks' own environment: the peer they are measured against (Megatron-Core 0.16.1,
# without its CUDA dependencies) and the zarrs codec pipeline next to this library
# (docs/performance.md says which benchmark needs it).
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BENCH_VENV)/bin/python -m pip install --quiet -e .
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps megatron-core==0.16.1
	$(BENCH_VENV)/bin/python -m pip install --quiet zarrs==0.2.3
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo_output

# Quick start: `make demo` and `make test`. Both create or reuse .venv.
# torch is pinned and installed first: an unpinned torch pulls the CUDA build (gigabytes).
# Megatron-Core is installed without its dependencies (they pull CUDA builds), only for the
# interop tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps megatron-core==0.15.3
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo_gpt_tp.py

test: $(STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) demo_output

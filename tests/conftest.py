import os

# No hub on these machines: everything must load from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Spinning OpenMP threads make LAPACK calls (Cholesky inverse) 10x slower on an oversubscribed machine; must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted from GGUF once, then cached)."""
    from tyr.models.default import default_model_dir as resolve

    return resolve()


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    """SmolLM2's tokenizer (one per test module, as the tests may set its padding)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def smollm2(default_model_dir):
    from tyr.models.io import load_model

    return load_model(default_model_dir, dtype=torch.float32)

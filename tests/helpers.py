"""What several test files share: a 4-layer keep pattern, greedy tokens from onnxruntime-genai, a saved folder's
logits in a process where tyr cannot be imported, and the ONNX decode check."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tyr.models.facts import layer_widths
from tyr.models.slicing import LayerKeep


def keeps_for(model, seed: int = 1) -> list[LayerKeep]:
    """Keep sets for a 4-layer tiny model: layer 0 loses its attention (so every later layer's KV-cache slot differs
    from its index), layer 2 its MLP; the others keep one KV group's heads or one head per group, and a random third
    of their FFN channels."""
    g = torch.Generator().manual_seed(seed)
    choices = [[], [0, 2], [2, 3], [1]]
    keeps = []
    for i, w in enumerate(layer_widths(model.config)):
        ffn = torch.randperm(w.intermediate_size, generator=g)[: w.intermediate_size // 3].tolist()
        keeps.append(LayerKeep(keep_heads=choices[i], keep_ffn=[] if i == 2 else ffn))
    return keeps


def genai_greedy(folder, prompt: str | list[int], new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, tokens onnxruntime-genai generates greedily); a text prompt goes through genai's own tokenizer."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    if isinstance(prompt, str):
        prompt = [int(t) for t in og.Tokenizer(model).encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return prompt, tokens


def load_without_tyr(folder: Path, ids: torch.Tensor, logits: torch.Tensor, tmp_path: Path) -> str:
    """In a process that cannot import tyr: AutoModelForCausalLM refuses ``folder`` without trust_remote_code and
    loads it with it, with logits on ``ids`` exactly ``logits``. Returns what it printed: "OK <class> <module>"."""
    expected = tmp_path / "expected.pt"
    torch.save({"ids": ids, "logits": logits}, expected)
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class NoTyr(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tyr" or name.startswith("tyr."):
                    raise ImportError("tyr is not installed here")
        sys.meta_path.insert(0, NoTyr())
        import torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
            sys.exit("loaded without trust_remote_code")
        except ValueError as err:
            assert "trust_remote_code" in str(err), err
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        expected = torch.load({str(expected)!r})
        with torch.no_grad():
            diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
        assert diff == 0.0, diff
        print("OK", type(model).__name__, type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_onnx_decodes_like_torch(model_path: Path, model, prompts: list[list[int]], new_tokens: int = 16):
    """The ONNX graph (onnxruntime, all graph optimizations) against the PyTorch model on a left-padded batch: the
    same greedy tokens, and logits within 1e-4 on the prompt (prefill) and on every cached decode step."""
    import numpy as np

    from tyr.exporters.onnx.decoding import OrtStepper, TorchStepper, decode
    from tyr.exporters.onnx.runner import OrtCausalLM

    reference = decode(TorchStepper(model), prompts, new_tokens)
    onnx_run = decode(OrtStepper(OrtCausalLM(model_path, opt_level="all")), prompts, new_tokens)
    assert np.array_equal(onnx_run.tokens, reference.tokens)
    real = reference.prompt_mask.astype(bool)
    assert np.abs(onnx_run.prefill_logits - reference.prefill_logits)[real].max() <= 1e-4
    assert np.abs(onnx_run.step_logits - reference.step_logits).max() <= 1e-4

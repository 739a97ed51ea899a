"""GGUF files as model sources: transformers dequantizes a GGUF file (for the architectures it reads: llama,
mistral, qwen2, qwen3, gemma3, ...) and the result is cached once as a plain HF folder (safetensors + tokenizer),
keyed by the file's contents, so every stage downstream reads an ordinary model folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tyr.atomic import atomic_dir
from tyr.errors import TyrError


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_config(gguf: Path):
    """The transformers config a GGUF file describes (metadata only, no tensors dequantized)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TyrError(f"transformers cannot read the GGUF file {gguf}: {err}") from err


def gguf_adds_bos(gguf: Path) -> bool:
    """The GGUF file's tokenizer.ggml.add_bos_token flag (False when the file does not set it)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return field is not None and bool(field.parts[field.data[0]][0])


def keep_bos_flag(gguf: Path, tokenizer) -> None:
    """Make ``tokenizer`` put BOS before every text when the GGUF file says so (Gemma's does: its perplexity
    without BOS is far worse), which the tokenizer transformers builds from a GGUF file does not carry over."""
    from tyr.data.blocks import adds_bos

    if gguf_adds_bos(gguf) and not adds_bos(tokenizer):
        tokenizer.add_bos_token = True  # rebuilds the post-processor, which tokenizer.json then saves


def convert_gguf(gguf: Path, final: Path) -> Path:
    """Dequantize ``gguf`` to fp32 and write it as an HF folder at ``final`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise TyrError(f"transformers cannot load the GGUF file {gguf}: {err}") from err
    keep_bos_flag(gguf, tokenizer)
    # save_pretrained refuses a model "quantized with gguf": copy the dequantized weights into a clean one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return final


def gguf_model_dir(gguf: Path, cache: Path, check=None) -> Path:
    """The cached HF folder of ``gguf`` under ``cache``, converted on first use. ``check(config_dict, where)`` runs on
    the file's config before anything is converted or written."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise TyrError(f"{gguf} is not a GGUF file")
    final = cache / f"{gguf.stem}-{file_digest(gguf)[:16]}"
    if (final / "config.json").is_file():
        return final
    if check is not None:
        check(gguf_config(gguf).to_dict(), str(gguf))
    return convert_gguf(gguf, final)

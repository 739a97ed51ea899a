"""Load dense or pruned models from folders or hub ids; save pruned models as self-describing HF folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from tyr.atomic import atomic_dir
from tyr.errors import TyrError
from tyr.models import register_auto_classes
from tyr.models.families import TYR_CAUSAL_LM_CLASSES, family_of, supported_model_types
from tyr.models.modeling_tyr_llama import TyrLlamaForCausalLM

# Dense architectures whose decoder layers are Llama-style layers (same tensor names), and tyr's pruned formats.
SUPPORTED_ARCHITECTURES = supported_model_types()


def resolve_model_path(spec: str | Path | None) -> str:
    """None or "default" -> the embedded SmolLM2 folder; another named model ("gemma3-270m", see
    tyr.models.default) -> its folder; an existing folder -> itself; a .gguf file -> its dequantized HF folder
    (converted once, cached by contents); a path that does not exist -> TyrError; anything else: a hub id."""
    from tyr.models.default import NAMED_MODELS, named_model_dir

    if spec is None or str(spec) in NAMED_MODELS:
        return str(named_model_dir(str(spec or "default")))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from tyr.models.default import cache_dir
        from tyr.models.gguf import gguf_model_dir

        return str(gguf_model_dir(path, cache_dir() / "models" / "gguf", check=check_supported))
    if path.exists():
        if not path.is_dir():
            raise TyrError(f"{path} is not a model folder (expected a directory with config.json and *.safetensors)")
        if not (path / "config.json").is_file():
            raise TyrError(f"{path} has no config.json: not a Hugging Face model folder")
        if not any(path.glob("*.safetensors")):
            raise TyrError(f"{path} has no *.safetensors weights (tyr loads only safetensors, never pickles)")
        return str(path)
    if _looks_like_path(str(spec)):
        raise TyrError(f"no model folder at {spec} (a hub id has the form org/name)")
    return str(spec)


def _looks_like_path(spec: str) -> bool:
    """A missing local folder, not a hub id: "./x", "../x", "/x", "~/x", "x/", "a/b/c", or "a/b" where a exists."""
    if spec.startswith(("./", "../", "/", "~")) or spec in (".", "..") or spec.endswith(("/", "\\")):
        return True
    parts = spec.replace("\\", "/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def check_supported(config_dict: dict, where: str) -> None:
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = "\n  ".join(SUPPORTED_ARCHITECTURES.values())
        raise TyrError(f"{where}: model_type {model_type!r} is not supported. Supported:\n  {supported}")
    if model_type == "mistral" and config_dict.get("sliding_window") not in (None, 0):
        if config_dict["sliding_window"] < config_dict.get("max_position_embeddings", 0):
            raise TyrError(f"{where}: Mistral sliding_window={config_dict['sliding_window']} is not supported")
    if family_of(config_dict).name in ("qwen2", "qwen3") and config_dict.get("use_sliding_window"):
        raise TyrError(f"{where}: {model_type} with use_sliding_window=true is not supported (tyr supports Qwen "
                       "models with full attention in every layer, as released)")
    if family_of(config_dict).name == "gemma3" and config_dict.get("use_bidirectional_attention"):
        raise TyrError(f"{where}: {model_type} with use_bidirectional_attention=true (an embedding model) is not "
                       "supported (tyr supports causal Gemma 3 language models)")


def load_model(spec: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """Load (model, tokenizer) from the default model, a local folder or a hub id, weights from safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    register_auto_classes()
    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise TyrError(f"cannot read the model config of {path}: {err}") from err
    check_supported(config.to_dict(), path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise TyrError(f"cannot load the model in {path}: {err}") from err
    return model.to(device).eval(), tokenizer


def save_model(model: TyrLlamaForCausalLM, tokenizer, out_dir: str | Path, overwrite: bool = False,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write a pruned model as an HF folder that loads with or without tyr (auto_map + modeling files)."""
    if not isinstance(model, TYR_CAUSAL_LM_CLASSES):
        raise TyrError(f"save_model expects a tyr model ({', '.join(c.__name__ for c in TYR_CAUSAL_LM_CLASSES)}), "
                       f"got {type(model).__name__} (use slicing.to_tyr)")
    family = family_of(model.config)
    model.config.architectures = [family.architecture]
    model.config.auto_map = family.auto_map()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for path in family.modeling_files:
            shutil.copy(path, tmp / path.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)

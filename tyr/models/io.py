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
from tyr.models.slicing import SlicedTensors

# Dense architectures whose decoder layers are Llama-style layers (same tensor names), and tyr's pruned formats.
SUPPORTED_ARCHITECTURES = supported_model_types()
# What a model folder needs from a hub repository: weights (safetensors only), configs, tokenizer, chat template.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
# The most tensor bytes save_sliced holds before writing them out as one safetensors shard.
SHARD_BYTES = 512 * 2 ** 20


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


def local_model_folder(spec: str | Path | None) -> Path:
    """The local folder of ``spec`` (see resolve_model_path); a hub id's files are fetched into the Hugging Face
    cache once (safetensors only, no pickles), so it can be read a tensor at a time like any folder."""
    path = resolve_model_path(spec)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as err:      # the hub's errors are OSErrors (HTTP, not cached) or ValueErrors
        raise TyrError(f"cannot fetch {path} from the hub ({type(err).__name__}: {err}); download it to a folder "
                       "and pass that folder") from err


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
    from transformers import AutoConfig, AutoModelForCausalLM

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
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise TyrError(f"cannot load the model in {path}: {err}") from err
    return model.to(device).eval(), load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder or hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise TyrError(f"cannot load the tokenizer of {path}: {err}") from err


def save_model(model: TyrLlamaForCausalLM, tokenizer, out_dir: str | Path, overwrite: bool = False,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write a pruned model as an HF folder that loads with or without tyr (auto_map + modeling files)."""
    if not isinstance(model, TYR_CAUSAL_LM_CLASSES):
        raise TyrError(f"save_model expects a tyr model ({', '.join(c.__name__ for c in TYR_CAUSAL_LM_CLASSES)}), "
                       f"got {type(model).__name__} (use slicing.to_tyr)")
    _describe(model.config)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_extras(tmp, model.config, tokenizer, extra_files)
    return Path(out_dir)


def save_sliced(sliced: SlicedTensors, tokenizer, out_dir: str | Path, generation_config=None,
                overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a pruned model given as a stream of tensors (slicing.sliced_tensors) into the same folder format as
    save_model, one safetensors shard of at most ``shard_bytes`` at a time: the whole model is never in memory."""
    config = sliced.config
    config.dtype = sliced.dtype
    _describe(config)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        shards, pending, size = [], {}, 0
        for part in sliced.parts:
            pending.update({name: tensor.to(sliced.dtype).contiguous() for name, tensor in part.items()})
            size += sum(t.numel() * t.element_size() for t in part.values())
            if size >= shard_bytes:
                shards.append(_write_shard(pending, tmp, len(shards)))
                pending, size = {}, 0
        if pending or not shards:
            shards.append(_write_shard(pending, tmp, len(shards)))
        _name_shards(tmp, shards)
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        _write_extras(tmp, config, tokenizer, None)
    return Path(out_dir)


def _describe(config) -> None:
    """The architecture and auto_map that let transformers load the folder without tyr."""
    family = family_of(config)
    config.architectures = [family.architecture]
    config.auto_map = family.auto_map()


def _write_extras(folder: Path, config, tokenizer, extra_files: dict[str, str] | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for path in family_of(config).modeling_files:
        shutil.copy(path, folder / path.name)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def _write_shard(tensors: dict[str, torch.Tensor], folder: Path, index: int) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, folder / f"part-{index}.safetensors", metadata={"format": "pt"})
    return list(tensors)


def _name_shards(folder: Path, shards: list[list[str]]) -> None:
    """Hugging Face's names: model.safetensors, or model-0000k-of-0000n.safetensors with an index."""
    if len(shards) == 1:
        (folder / "part-0.safetensors").rename(folder / "model.safetensors")
        return
    weight_map = {}
    for k, names in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{k}.safetensors").rename(folder / name)
        weight_map |= dict.fromkeys(names, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                    indent=2))

"""Check a model folder's safetensors against its config before anything is built from it.

vLLM and transformers report a wrong folder late and obscurely (a shape assert deep in a weight loader, a silently
re-initialized tensor). Here the folder is compared with the architecture its config describes, built on the meta
device: every tensor present, none extra, every shape as the config says, every file complete.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tyr.errors import TyrError

_SHOWN = 6  # how many offending tensors an error lists


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header; raise TyrError if the file is cut short or garbled."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise TyrError(f"{path} is not a readable safetensors file ({err})") from err
    header.pop("__metadata__", None)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise TyrError(f"{path} is truncated: its header describes {8 + header_len + data_end} bytes, "
                       f"the file has {size}")
    return {name: list(info["shape"]) for name, info in header.items()}


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise TyrError(f"{index} is not a valid safetensors index ({err})") from err
        files = [folder / name for name in names]
        if missing := [f.name for f in files if not f.is_file()]:
            raise TyrError(f"{folder}: weight files listed in {index.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TyrError(f"{folder} has no *.safetensors weights")
    return files


def stored_shapes(folder: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for path in weight_files(folder):
        shapes.update(read_safetensors_header(path))
    return shapes


def expected_shapes(config) -> dict[str, list[int]]:
    """Parameter name -> shape of the model ``config`` describes (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def check_weights(folder: str | Path, config) -> None:
    """Raise TyrError naming the tensors that are missing, unexpected or of the wrong shape for ``config``."""
    folder = Path(folder)
    stored, expected = stored_shapes(folder), expected_shapes(config)
    tied_head = "lm_head.weight" in stored and getattr(config, "tie_word_embeddings", False)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected) - ({"lm_head.weight"} if tied_head else set()))
    wrong = [f"{name}: file {stored[name]}, config {expected[name]}" for name in sorted(set(stored) & set(expected))
             if stored[name] != expected[name]]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors do not match the config's shapes: " + "; ".join(wrong[:_SHOWN]))
    if missing:
        problems.append(f"{len(missing)} tensors are missing: {missing[:_SHOWN]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not in the architecture: {unexpected[:_SHOWN]}")
    if problems:
        raise TyrError(f"{folder}: the weights do not fit config.json: " + " | ".join(problems))

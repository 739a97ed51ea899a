"""A dense model read from its safetensors folder on demand, in the dtype it is stored in.

Only the config, the rotary embedding and what a caller asks for are ever in memory: the compressor reads one
decoder module's tensors at a time (``tensor``), so a model larger than host or device memory can be pruned layer by
layer. Tensor names are the Hugging Face checkpoint names (``model.layers.<i>.self_attn.q_proj.weight``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from tyr.errors import TyrError
from tyr.models.facts import SAFETENSORS_DTYPES, StoredTensor, tensor_index


class StreamedModel:
    """A dense model folder whose weights stay on disk until a tensor is asked for."""

    def __init__(self, folder: str | Path, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        from tyr.models import register_auto_classes
        from tyr.models.io import check_supported, resolve_model_path

        register_auto_classes()
        self.folder = Path(resolve_model_path(folder))
        if not self.folder.is_dir():
            raise TyrError(f"streaming reads a local model folder; {folder} is not one")
        try:
            self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise TyrError(f"cannot read the model config of {self.folder}: {err}") from err
        check_supported(self.config.to_dict(), str(self.folder))
        self.index: dict[str, StoredTensor] = tensor_index(self.folder)
        self.shapes: dict[str, list[int]] = {name: list(t.shape) for name, t in self.index.items()}
        with torch.device("meta"):      # the model's own rotary embedding class, without its weights
            skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=trust_remote_code)
        self.rotary_emb = type(skeleton.model.rotary_emb)(config=self.config)
        # The embedding's stored dtype is every weight's in the folders tyr reads and writes.
        self.dtype = getattr(torch, SAFETENSORS_DTYPES[self.index["model.embed_tokens.weight"].dtype])
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.folder)
        except OSError:        # no generation_config.json: what transformers derives from the config
            self.generation_config = GenerationConfig.from_model_config(self.config)

    def has(self, name: str) -> bool:
        return name in self.index

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (its dtype), read from its file now."""
        stored = self.index.get(name)
        if stored is None:
            raise TyrError(f"{self.folder} holds no tensor {name}")
        with safe_open(stored.file, framework="pt") as f:
            return f.get_tensor(name)

    def state_dict(self) -> "LazyState":
        """The checkpoint as a read-only mapping whose tensors are read from the files when looked up."""
        return LazyState(self)

    def layer_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every decoder-layer tensor, one at a time, in checkpoint-name order."""
        for name in sorted(n for n in self.index if n.startswith("model.layers.")):
            yield name, self.tensor(name)


class LazyState(Mapping):
    """A StreamedModel's tensors by checkpoint name, each read from its file on lookup (nothing cached)."""

    def __init__(self, model: StreamedModel):
        self.model = model

    def __getitem__(self, name: str) -> torch.Tensor:
        if not self.model.has(name):
            raise KeyError(name)
        return self.model.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.model.index)

    def __len__(self) -> int:
        return len(self.model.index)

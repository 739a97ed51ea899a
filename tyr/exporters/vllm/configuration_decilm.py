# Copyright 2026 the tyr authors. Apache License 2.0.
"""Minimal configuration for DeciLM / nemotron-nas folders written by tyr (self-contained: imports transformers only).

Copied next to config.json and named in its ``auto_map``, so ``AutoConfig.from_pretrained(dir,
trust_remote_code=True)`` works although transformers does not know model_type "nemotron-nas". It carries only what
vLLM's DeciLMForCausalLM reads: per block ``attention.no_op`` and ``attention.n_heads_in_group`` (KV heads =
num_attention_heads // n_heads_in_group), ``ffn.no_op`` and ``ffn.intermediate_size`` (used exactly; ``ffn_mult`` is
refused because vLLM rounds it up to a multiple of 256). ``replace_with_linear`` is refused: vLLM ignores it.
"""

from __future__ import annotations

import dataclasses

from transformers.models.llama.configuration_llama import LlamaConfig


@dataclasses.dataclass
class AttentionConfig:
    no_op: bool = False
    n_heads_in_group: int | None = None

    def __post_init__(self):
        if not self.no_op and (self.n_heads_in_group is None or self.n_heads_in_group < 1):
            raise ValueError(f"attention block needs n_heads_in_group >= 1, got {self.n_heads_in_group}")


@dataclasses.dataclass
class FFNConfig:
    no_op: bool = False
    intermediate_size: int | None = None

    def __post_init__(self):
        if not self.no_op and (self.intermediate_size is None or self.intermediate_size < 1):
            raise ValueError(f"ffn block needs intermediate_size >= 1, got {self.intermediate_size}")


@dataclasses.dataclass
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, block: dict, index: int) -> BlockConfig:
        try:
            attention, ffn = dict(block["attention"]), dict(block["ffn"])
            for part in (attention, ffn):
                if part.pop("replace_with_linear", False):
                    raise ValueError("replace_with_linear is not supported (vLLM ignores it)")
            if "ffn_mult" in ffn:
                raise ValueError("ffn_mult is not supported: write ffn.intermediate_size (vLLM rounds ffn_mult up "
                                 "to a multiple of 256)")
            return cls(attention=AttentionConfig(**attention), ffn=FFNConfig(**ffn))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"block_configs[{index}]: {err}") from err


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs):
        super().__init__(**kwargs)
        blocks = block_configs or []
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b, i)
                              for i, b in enumerate(blocks)]
        if self.block_configs and len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"{len(self.block_configs)} block_configs for {self.num_hidden_layers} layers")

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [dataclasses.asdict(b) if isinstance(b, BlockConfig) else b
                                   for b in self.block_configs]
        return output


__all__ = ["DeciLMConfig"]

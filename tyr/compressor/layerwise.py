"""Functional decoder pieces that run one module from a weight dict, without building a model.

The supernet builder and the search evaluate arbitrary combinations of candidates this way: a module is a dict
of tensors (attention: q_proj, k_proj, v_proj, o_proj, its norms, and Qwen3's / Gemma 3's per-head q_norm / k_norm;
MLP: gate_proj, up_proj, down_proj, its norms; optional biases as "<name>.bias", e.g. Qwen2's q/k/v), and an empty
dict is a removed module. A block's norms are its family's (tyr.models.families): Llama-style layers norm the
block's input (attention: input_layernorm, MLP: post_attention_layernorm); Gemma 3 norms its input and its output
(attention: input_layernorm and post_attention_layernorm, MLP: pre_feedforward_layernorm and
post_feedforward_layernorm). The math is the HF Llama / Qwen2 / Qwen3 / Gemma 3 layer's (RMSNorm in fp32, rotary
embedding, causal SDPA with GQA and the layer's sliding window, gated MLP; ``LayerMath`` holds what Gemma 3 does
differently), so the result matches their decoder layers to fp32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from tyr.errors import TyrError
from tyr.models.families import family_of
from tyr.models.streaming import StreamedModel

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "input_layernorm")
HEAD_NORM_KEYS = ("q_norm", "k_norm")  # Qwen3, Gemma 3: RMSNorm over head_dim of every query / key head, before RoPE
MLP_KEYS = ("gate_proj", "up_proj", "down_proj", "post_attention_layernorm")
# The norm after a block's output projection, in the families that have one (Gemma 3); keyed by the block.
OUTPUT_NORMS = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
ModuleKind = Literal["attn", "mlp"]
KINDS: tuple[ModuleKind, ...] = ("attn", "mlp")      # the order of a layer's modules everywhere (supernet, search)


@dataclass(frozen=True)
class LayerMath:
    """What a family's layers compute besides their weights; the defaults are Llama's, Qwen2's and Qwen3's."""

    norm_offset: float = 0.0                # Gemma 3: RMSNorm scales by (1 + w), in fp32
    activation: str = "silu"                # Gemma 3: GELU with the tanh approximation (GeGLU)
    query_scale: float | None = None        # None: head_dim ** -0.5; Gemma 3: query_pre_attn_scalar ** -0.5
    embed_scale: float | None = None        # Gemma 3: sqrt(hidden_size), rounded to the embedding's dtype
    final_softcap: float | None = None      # Gemma 3 where set: logits = cap * tanh(logits / cap)


LLAMA_MATH = LayerMath()
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def layer_math(config) -> LayerMath:
    """The LayerMath of a dense or tyr config; TyrError for an activation the functional layers do not run."""
    if family_of(config).name != "gemma3":
        if getattr(config, "hidden_act", "silu") != "silu":
            raise TyrError(f"hidden_act {config.hidden_act!r} is not supported (SiLU-gated MLPs only)")
        return LLAMA_MATH
    if config.hidden_activation not in GELU_TANH:
        raise TyrError(f"Gemma 3 hidden_activation {config.hidden_activation!r} is not supported (GELU with the "
                       "tanh approximation only, as released)")
    return LayerMath(norm_offset=1.0, activation="gelu_tanh", query_scale=config.query_pre_attn_scalar ** -0.5,
                     embed_scale=math.sqrt(config.hidden_size), final_softcap=config.final_logit_softcapping)


def head_dim_of(config) -> int:
    """The attention head size: the config's head_dim where it sets one (Qwen3, Gemma 3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """LlamaRMSNorm: normalise in fp32, scale in the input dtype. With ``offset`` (Gemma3RMSNorm): scale by
    (offset + w) in fp32, then cast."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x32 * (offset + weight.to(torch.float32))).to(dtype)
    return weight * x32.to(dtype)


def sliding_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] boolean: query i sees keys i - window < j <= i (transformers' sliding-window causal mask)."""
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None]
    return (key <= query) & (key > query - window)


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[name], w.get(f"{name}.bias"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos + _rotate_half(x) * sin


def attention_heads(x: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int,
                    cos: torch.Tensor, sin: torch.Tensor, head_dim: int, eps: float, *,
                    style: LayerMath = LLAMA_MATH, window: int | None = None) -> torch.Tensor:
    """The input of o_proj: every query head's attention output, concatenated: [B, T, n_heads * head_dim].
    ``window``: the layer's sliding window (None: full causal attention)."""
    batch, seq, _ = x.shape
    if w["q_proj"].shape[0] != n_heads * head_dim or w["k_proj"].shape[0] != n_kv_heads * head_dim:
        raise TyrError(f"attention weights have {w['q_proj'].shape[0] // head_dim} query / "
                       f"{w['k_proj'].shape[0] // head_dim} KV heads, expected {n_heads} / {n_kv_heads}")
    h = rms_norm(x, w["input_layernorm"], eps, style.norm_offset)
    q = _linear(h, w, "q_proj").view(batch, seq, n_heads, head_dim)
    k = _linear(h, w, "k_proj").view(batch, seq, n_kv_heads, head_dim)
    if "q_norm" in w:
        q, k = rms_norm(q, w["q_norm"], eps, style.norm_offset), rms_norm(k, w["k_norm"], eps, style.norm_offset)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = _linear(h, w, "v_proj").view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = style.query_scale or head_dim ** -0.5
    if window is not None and window < seq:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_mask(seq, window, x.device), scale=scale,
                                             enable_gqa=n_heads != n_kv_heads)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_heads != n_kv_heads)
    return out.transpose(1, 2).reshape(batch, seq, n_heads * head_dim)


def output_norm(update: torch.Tensor, w: dict[str, torch.Tensor], kind: ModuleKind, eps: float,
                style: LayerMath = LLAMA_MATH) -> torch.Tensor:
    """A block's output projection result as the residual stream receives it: through the block's output norm
    where the family has one (Gemma 3), else unchanged."""
    name = OUTPUT_NORMS[kind]
    return rms_norm(update, w[name], eps, style.norm_offset) if name in w else update


def attention_delta(x: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int,
                    cos: torch.Tensor, sin: torch.Tensor, head_dim: int, eps: float, *,
                    style: LayerMath = LLAMA_MATH, window: int | None = None) -> torch.Tensor:
    """The residual update of an attention block (its norms included); zeros when ``w`` is empty (removed)."""
    if not w:
        return torch.zeros_like(x)
    heads = attention_heads(x, w, n_heads, n_kv_heads, cos, sin, head_dim, eps, style=style, window=window)
    return output_norm(_linear(heads, w, "o_proj"), w, "attn", eps, style)


def mlp_hidden(x: torch.Tensor, w: dict[str, torch.Tensor], eps: float, *,
               style: LayerMath = LLAMA_MATH) -> torch.Tensor:
    """The input of down_proj: act(gate(h)) * up(h) with h the normed input: [B, T, ffn]."""
    norm = w["pre_feedforward_layernorm"] if "pre_feedforward_layernorm" in w else w["post_attention_layernorm"]
    h = rms_norm(x, norm, eps, style.norm_offset)
    gate = _linear(h, w, "gate_proj")
    gate = F.gelu(gate, approximate="tanh") if style.activation == "gelu_tanh" else F.silu(gate)
    return gate * _linear(h, w, "up_proj")


def mlp_delta(x: torch.Tensor, w: dict[str, torch.Tensor], eps: float, *,
              style: LayerMath = LLAMA_MATH) -> torch.Tensor:
    """The residual update of an MLP block (its norms included); zeros when ``w`` is empty (removed)."""
    if not w:
        return torch.zeros_like(x)
    return output_norm(_linear(mlp_hidden(x, w, eps, style=style), w, "down_proj"), w, "mlp", eps, style)


def module_weights(model, layer: int, kind: ModuleKind) -> dict[str, torch.Tensor]:
    """The weights of one module of a (dense or pruned) HF Llama / TyrLlama model, as a weight dict ({} if absent);
    of a StreamedModel, read from its files now in their stored dtype."""
    if isinstance(model, StreamedModel):
        return _streamed_module_weights(model, layer, kind)
    decoder = model.model.layers[layer]
    block = decoder.self_attn if kind == "attn" else decoder.mlp
    if block is None:
        return {}
    names = ATTENTION_KEYS[:4] if kind == "attn" else MLP_KEYS[:3]
    w = {}
    for name in names:
        linear = getattr(block, name)
        w[name] = linear.weight.detach()
        if linear.bias is not None:
            w[f"{name}.bias"] = linear.bias.detach()
    for name in family_of(model.config).block_norms(kind):
        w[name] = getattr(decoder, name).weight.detach()
    for name in HEAD_NORM_KEYS if kind == "attn" else ():
        if (head_norm := getattr(block, name, None)) is not None:
            w[name] = head_norm.weight.detach()
    return w


def _streamed_module_weights(model: StreamedModel, layer: int, kind: ModuleKind) -> dict[str, torch.Tensor]:
    linears = ATTENTION_KEYS[:4] if kind == "attn" else MLP_KEYS[:3]
    keys = [*linears, *(f"{name}.bias" for name in linears), *family_of(model.config).block_norms(kind),
            *(HEAD_NORM_KEYS if kind == "attn" else ())]
    return {key: model.tensor(tensor_name(layer, kind, key)) for key in keys
            if model.has(tensor_name(layer, kind, key))}


def tensor_name(layer: int, kind: ModuleKind, key: str) -> str:
    """The Hugging Face checkpoint name of one entry of a module's weight dict (``module_weights``' keys)."""
    name, _, bias = key.partition(".")
    if name.endswith("layernorm"):  # a block's norms sit on the decoder layer, not in the block
        return f"model.layers.{layer}.{name}.weight"
    block = "self_attn" if kind == "attn" else "mlp"
    return f"model.layers.{layer}.{block}.{name}.{bias or 'weight'}"


def heads_of(w: dict[str, torch.Tensor], head_dim: int) -> tuple[int, int]:
    """(query heads, KV heads) of an attention weight dict; (0, 0) when removed."""
    if not w:
        return 0, 0
    return w["q_proj"].shape[0] // head_dim, w["k_proj"].shape[0] // head_dim


class LayerPositions(NamedTuple):
    """What one decoder layer's attention needs about positions: its rotary tables and its sliding window."""

    cos: torch.Tensor
    sin: torch.Tensor
    window: int | None


class DenseParts:
    """The parts of a model outside the decoder layers: embedding, rotary tables, final norm and LM head, and
    what the layers compute besides their weights (``style``, each layer's type: Gemma 3's sliding and global
    layers have their own rotary tables and windows)."""

    def __init__(self, embed_tokens: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor | None, rotary_emb,
                 head_dim: int, eps: float, num_heads: int, num_kv_heads: int, num_layers: int,
                 style: LayerMath = LLAMA_MATH, layer_types: list[str] | None = None,
                 sliding_window: int | None = None):
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head
        self.rotary_emb = rotary_emb
        self.head_dim, self.eps = head_dim, eps
        self.num_heads, self.num_kv_heads, self.num_layers = num_heads, num_kv_heads, num_layers
        self.style, self.layer_types, self.sliding_window = style, layer_types, sliding_window

    @classmethod
    def from_model(cls, model, with_head: bool = True) -> "DenseParts":
        """``with_head=False``: a StreamedModel's LM head is not read (its ``logits`` then cannot run)."""
        if isinstance(model, StreamedModel):
            return cls.from_streamed(model, with_head)
        config = model.config
        return cls(embed_tokens=model.model.embed_tokens.weight.detach(), norm=model.model.norm.weight.detach(),
                   lm_head=model.lm_head.weight.detach(), rotary_emb=model.model.rotary_emb,
                   **cls._config_parts(config))

    @classmethod
    def from_streamed(cls, model: StreamedModel, with_head: bool = True) -> "DenseParts":
        """The parts of a streamed model, read from its files (in their stored dtype)."""
        embed = model.tensor("model.embed_tokens.weight")
        head = model.tensor("lm_head.weight") if with_head and model.has("lm_head.weight") else embed
        return cls(embed_tokens=embed, norm=model.tensor("model.norm.weight"), lm_head=head if with_head else None,
                   rotary_emb=model.rotary_emb, **cls._config_parts(model.config))

    @staticmethod
    def _config_parts(config) -> dict:
        sliding = family_of(config).sliding_layers
        return dict(head_dim=head_dim_of(config),
                    eps=config.rms_norm_eps, num_heads=config.num_attention_heads,
                    num_kv_heads=config.num_key_value_heads, num_layers=config.num_hidden_layers,
                    style=layer_math(config), layer_types=list(config.layer_types) if sliding else None,
                    sliding_window=config.sliding_window if sliding else None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, hidden] on the ids' device (Gemma 3: times its scale,
        rounded to the embedding's dtype as transformers does)."""
        table = self.embed_tokens.to(ids.device)
        hidden = F.embedding(ids, table)
        if self.style.embed_scale is not None:
            hidden = hidden * torch.tensor(self.style.embed_scale, dtype=table.dtype, device=ids.device)
        return hidden

    @torch.no_grad()
    def rope(self, seq_len: int, device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [seq_len, head_dim], for positions 0 .. seq_len-1 (of ``layer_type``'s table where the
        family has one per layer type)."""
        device = torch.device(device) if device is not None else self.embed_tokens.device
        self.rotary_emb.to(device)
        positions = torch.arange(seq_len, device=device)[None]
        probe = torch.zeros(1, dtype=dtype, device=device)
        if self.layer_types is not None:
            cos, sin = self.rotary_emb(probe, positions, layer_type or "full_attention")
        else:
            cos, sin = self.rotary_emb(probe, positions)
        return cos[0].to(dtype), sin[0].to(dtype)

    def positions(self, seq_len: int, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> list[LayerPositions]:
        """Every decoder layer's rotary tables and window (one shared table when layers do not differ)."""
        if self.layer_types is None:
            cos, sin = self.rope(seq_len, device, dtype)
            return [LayerPositions(cos, sin, None)] * self.num_layers
        tables = {t: self.rope(seq_len, device, dtype, t) for t in set(self.layer_types)}
        return [LayerPositions(*tables[t], self.sliding_window if t == "sliding_attention" else None)
                for t in self.layer_types]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head in ``x``'s dtype: hidden states [B, T, hidden] -> logits [B, T, vocab]
        (soft-capped where the model caps them)."""
        normed = rms_norm(x, self.norm.to(x.device, x.dtype), self.eps, self.style.norm_offset)
        logits = F.linear(normed, self.lm_head.to(x.device, x.dtype))
        if (cap := self.style.final_softcap) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def with_head_on(self, device: str | torch.device, dtype: torch.dtype) -> "DenseParts":
        """A copy whose final norm and LM head already sit on ``device`` in ``dtype``, so ``logits`` on such
        inputs casts nothing per call."""
        return DenseParts(self.embed_tokens, self.norm.to(device, dtype), self.lm_head.to(device, dtype),
                          self.rotary_emb, self.head_dim, self.eps, self.num_heads, self.num_kv_heads, self.num_layers,
                          self.style, self.layer_types, self.sliding_window)

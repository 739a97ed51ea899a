"""Functional Llama decoder pieces that run one module from a weight dict, without building a model.

The supernet builder and the search evaluate arbitrary combinations of candidates this way: a module is a dict
of tensors (attention: q_proj, k_proj, v_proj, o_proj, input_layernorm, and Qwen3's per-head q_norm / k_norm; MLP:
gate_proj, up_proj, down_proj, post_attention_layernorm; optional biases as "<name>.bias", e.g. Qwen2's q/k/v), and
an empty dict is a removed module. The math is the HF Llama / Qwen2 / Qwen3 layer's (RMSNorm in fp32, rotary
embedding, causal SDPA with GQA, SiLU-gated MLP), so the result matches their decoder layers to fp32 rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tyr.errors import TyrError
from tyr.models.streaming import StreamedModel

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "input_layernorm")
HEAD_NORM_KEYS = ("q_norm", "k_norm")  # Qwen3: RMSNorm over head_dim of every query / key head, before RoPE
MLP_KEYS = ("gate_proj", "up_proj", "down_proj", "post_attention_layernorm")
ModuleKind = Literal["attn", "mlp"]
KINDS: tuple[ModuleKind, ...] = ("attn", "mlp")      # the order of a layer's modules everywhere (supernet, search)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in fp32, scale in the input dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[name], w.get(f"{name}.bias"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos + _rotate_half(x) * sin


def attention_heads(x: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int,
                    cos: torch.Tensor, sin: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    """The input of o_proj: every query head's attention output, concatenated: [B, T, n_heads * head_dim]."""
    batch, seq, _ = x.shape
    if w["q_proj"].shape[0] != n_heads * head_dim or w["k_proj"].shape[0] != n_kv_heads * head_dim:
        raise TyrError(f"attention weights have {w['q_proj'].shape[0] // head_dim} query / "
                       f"{w['k_proj'].shape[0] // head_dim} KV heads, expected {n_heads} / {n_kv_heads}")
    h = rms_norm(x, w["input_layernorm"], eps)
    q = _linear(h, w, "q_proj").view(batch, seq, n_heads, head_dim)
    k = _linear(h, w, "k_proj").view(batch, seq, n_kv_heads, head_dim)
    if "q_norm" in w:
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = _linear(h, w, "v_proj").view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim ** -0.5,
                                         enable_gqa=n_heads != n_kv_heads)
    return out.transpose(1, 2).reshape(batch, seq, n_heads * head_dim)


def attention_delta(x: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int,
                    cos: torch.Tensor, sin: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    """The residual update of an attention block (input norm included); zeros when ``w`` is empty (removed)."""
    if not w:
        return torch.zeros_like(x)
    return _linear(attention_heads(x, w, n_heads, n_kv_heads, cos, sin, head_dim, eps), w, "o_proj")


def mlp_hidden(x: torch.Tensor, w: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    """The input of down_proj: silu(gate(h)) * up(h) with h the normed input: [B, T, ffn]."""
    h = rms_norm(x, w["post_attention_layernorm"], eps)
    return F.silu(_linear(h, w, "gate_proj")) * _linear(h, w, "up_proj")


def mlp_delta(x: torch.Tensor, w: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    """The residual update of an MLP block (post-attention norm included); zeros when ``w`` is empty (removed)."""
    if not w:
        return torch.zeros_like(x)
    return _linear(mlp_hidden(x, w, eps), w, "down_proj")


def module_weights(model, layer: int, kind: ModuleKind) -> dict[str, torch.Tensor]:
    """The weights of one module of a (dense or pruned) HF Llama / TyrLlama model, as a weight dict ({} if absent);
    of a StreamedModel, read from its files now in their stored dtype."""
    if isinstance(model, StreamedModel):
        return _streamed_module_weights(model, layer, kind)
    decoder = model.model.layers[layer]
    if kind == "attn":
        block, norm = decoder.self_attn, decoder.input_layernorm
    else:
        block, norm = decoder.mlp, decoder.post_attention_layernorm
    if block is None:
        return {}
    names = ATTENTION_KEYS[:4] if kind == "attn" else MLP_KEYS[:3]
    w = {}
    for name in names:
        linear = getattr(block, name)
        w[name] = linear.weight.detach()
        if linear.bias is not None:
            w[f"{name}.bias"] = linear.bias.detach()
    w[ATTENTION_KEYS[4] if kind == "attn" else MLP_KEYS[3]] = norm.weight.detach()
    for name in HEAD_NORM_KEYS if kind == "attn" else ():
        if (head_norm := getattr(block, name, None)) is not None:
            w[name] = head_norm.weight.detach()
    return w


def _streamed_module_weights(model: StreamedModel, layer: int, kind: ModuleKind) -> dict[str, torch.Tensor]:
    linears = ATTENTION_KEYS[:4] if kind == "attn" else MLP_KEYS[:3]
    keys = [*linears, *(f"{name}.bias" for name in linears), ATTENTION_KEYS[4] if kind == "attn" else MLP_KEYS[3],
            *(HEAD_NORM_KEYS if kind == "attn" else ())]
    return {key: model.tensor(tensor_name(layer, kind, key)) for key in keys
            if model.has(tensor_name(layer, kind, key))}


def tensor_name(layer: int, kind: ModuleKind, key: str) -> str:
    """The Hugging Face checkpoint name of one entry of a module's weight dict (``module_weights``' keys)."""
    name, _, bias = key.partition(".")
    if name in (ATTENTION_KEYS[4], MLP_KEYS[3]):
        return f"model.layers.{layer}.{name}.weight"
    block = "self_attn" if kind == "attn" else "mlp"
    return f"model.layers.{layer}.{block}.{name}.{bias or 'weight'}"


def heads_of(w: dict[str, torch.Tensor], head_dim: int) -> tuple[int, int]:
    """(query heads, KV heads) of an attention weight dict; (0, 0) when removed."""
    if not w:
        return 0, 0
    return w["q_proj"].shape[0] // head_dim, w["k_proj"].shape[0] // head_dim


class DenseParts:
    """The parts of a model outside the decoder layers: embedding, rotary tables, final norm and LM head."""

    def __init__(self, embed_tokens: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, rotary_emb,
                 head_dim: int, eps: float, num_heads: int, num_kv_heads: int, num_layers: int):
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head
        self.rotary_emb = rotary_emb
        self.head_dim, self.eps = head_dim, eps
        self.num_heads, self.num_kv_heads, self.num_layers = num_heads, num_kv_heads, num_layers

    @classmethod
    def from_model(cls, model) -> "DenseParts":
        if isinstance(model, StreamedModel):
            return cls.from_streamed(model)
        config = model.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise TyrError(f"hidden_act {config.hidden_act!r} is not supported (Llama-style SiLU MLPs only)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(embed_tokens=model.model.embed_tokens.weight.detach(), norm=model.model.norm.weight.detach(),
                   lm_head=model.lm_head.weight.detach(), rotary_emb=model.model.rotary_emb, head_dim=head_dim,
                   eps=config.rms_norm_eps, num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads, num_layers=config.num_hidden_layers)

    @classmethod
    def from_streamed(cls, model: StreamedModel) -> "DenseParts":
        """The parts of a streamed model, read from its files (in their stored dtype)."""
        config = model.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise TyrError(f"hidden_act {config.hidden_act!r} is not supported (Llama-style SiLU MLPs only)")
        embed = model.tensor("model.embed_tokens.weight")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(embed_tokens=embed, norm=model.tensor("model.norm.weight"),
                   lm_head=model.tensor("lm_head.weight") if model.has("lm_head.weight") else embed,
                   rotary_emb=model.rotary_emb, head_dim=head_dim, eps=config.rms_norm_eps,
                   num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                   num_layers=config.num_hidden_layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, hidden] on the ids' device."""
        return F.embedding(ids, self.embed_tokens.to(ids.device))

    @torch.no_grad()
    def rope(self, seq_len: int, device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [seq_len, head_dim], for positions 0 .. seq_len-1."""
        device = torch.device(device) if device is not None else self.embed_tokens.device
        self.rotary_emb.to(device)
        positions = torch.arange(seq_len, device=device)[None]
        cos, sin = self.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
        return cos[0].to(dtype), sin[0].to(dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head in ``x``'s dtype: hidden states [B, T, hidden] -> logits [B, T, vocab]."""
        return F.linear(rms_norm(x, self.norm.to(x.device, x.dtype), self.eps), self.lm_head.to(x.device, x.dtype))

    def with_head_on(self, device: str | torch.device, dtype: torch.dtype) -> "DenseParts":
        """A copy whose final norm and LM head already sit on ``device`` in ``dtype``, so ``logits`` on such
        inputs casts nothing per call."""
        return DenseParts(self.embed_tokens, self.norm.to(device, dtype), self.lm_head.to(device, dtype),
                          self.rotary_emb, self.head_dim, self.eps, self.num_heads, self.num_kv_heads, self.num_layers)

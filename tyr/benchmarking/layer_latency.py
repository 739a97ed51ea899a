"""`tyr bench layers`: time each layer shape of a model on this device, for the search's cost model
(tyr.compressor.latency.LatencyTable).

What it measures (and no more): torch eager forwards of the Llama building blocks, on the target device and
dtype, for one decode step of `batch` sequences that attend to a KV context of `context` tokens:
- attention(heads, kv_heads): input RMSNorm, q/k/v projections, rotary embedding, scaled-dot-product attention
  over the context (GQA), o projection. Each pair is timed separately: cost is not linear in heads.
- mlp(ffn): post-attention RMSNorm and the SwiGLU MLP, for a grid of widths (linear interpolation in between;
  an MLP's cost is close to linear in its width).
- lm_head: the vocabulary projection (fixed per model).
It is a proxy for a serving engine's decode step: vLLM's fused kernels, paged KV cache, batching and scheduling
add their own costs, so use the table to rank and budget shapes, and check the end result with `tyr bench`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tyr.compressor.latency import LatencyTable
from tyr.errors import TyrError


class _DecodeAttention(nn.Module):
    """One decode step of Llama attention against a preallocated KV context (the new token goes in the last slot)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, batch: int, context: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.register_buffer("k_cache", torch.randn(batch, kv_heads, context + 1, head_dim))
        self.register_buffer("v_cache", torch.randn(batch, kv_heads, context + 1, head_dim))
        angles = torch.rand(head_dim // 2)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()]))
        self.register_buffer("sin", torch.cat([angles.sin(), angles.sin()]))

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rotated * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 1, hidden]
        b = x.shape[0]
        h = self.norm(x)
        q = self._rope(self.q_proj(h).view(b, 1, self.heads, self.head_dim).transpose(1, 2))
        k = self._rope(self.k_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2))
        v = self.v_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache[:, :, -1:] = k
        self.v_cache[:, :, -1:] = v
        out = nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache,
                                                         enable_gqa=self.heads != self.kv_heads)
        return x + self.o_proj(out.transpose(1, 2).reshape(b, 1, -1))


class _MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    # Best of N: the run least disturbed by other work on the machine (the median is far noisier on shared CPUs).
    return min(times)


def default_grids(config: dict, ffn_steps: int = 8) -> tuple[list[tuple[int, int]], list[int]]:
    """Every GQA-valid (heads, kv_heads) up to the dense sizes, and `ffn_steps` evenly spaced FFN widths."""
    heads, kv_heads, ffn = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    group = heads // kv_heads
    pairs = sorted({(h, kv) for kv in range(1, kv_heads + 1) for h in range(kv, kv * group + 1, kv)})
    ffns = sorted({max(1, round(ffn * i / ffn_steps)) for i in range(1, ffn_steps + 1)})
    return pairs, ffns


def measure_latency_table(config: dict, batch: int = 8, context: int = 256, device: str | None = None,
                          dtype: torch.dtype = torch.float32, repeats: int = 30, warmup: int = 5,
                          pairs: list[tuple[int, int]] | None = None, ffns: list[int] | None = None) -> LatencyTable:
    """Time every block shape of a Llama-style config (a config.json dict) on `device` (default: the accelerator)."""
    from tyr.device import resolve_device

    device = str(resolve_device(device))
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    eps = config.get("rms_norm_eps", 1e-6)
    default_pairs, default_ffns = default_grids(config)
    pairs, ffns = pairs or default_pairs, ffns or default_ffns
    x = torch.randn(batch, 1, hidden, device=device, dtype=dtype)
    torch.manual_seed(0)
    attention_ms, mlp_ms = {}, {}
    with tqdm(total=len(pairs) + len(ffns) + 1, desc="latency table", unit="shape") as bar:
        for heads, kv_heads in pairs:
            block = _DecodeAttention(hidden, heads, kv_heads, head_dim, batch, context, eps).to(device, dtype)
            attention_ms[f"{heads},{kv_heads}"] = _time_ms(block, x, repeats, warmup)
            bar.update()
        for ffn in ffns:
            mlp_ms[str(ffn)] = _time_ms(_MLP(hidden, ffn, eps).to(device, dtype), x, repeats, warmup)
            bar.update()
        lm_head = nn.Linear(hidden, config["vocab_size"], bias=False).to(device, dtype)
        lm_head_ms = _time_ms(lm_head, x, repeats, warmup)
        bar.update()
    device_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    return LatencyTable(device=device, device_name=device_name, dtype=str(dtype).removeprefix("torch."),
                        torch_version=torch.__version__, hidden_size=hidden, head_dim=head_dim,
                        vocab_size=config["vocab_size"], batch=batch, context=context, repeats=repeats,
                        attention_ms=attention_ms, mlp_ms=mlp_ms, lm_head_ms=lm_head_ms)


def latency_table_for_model(model_dir: str | Path, **kwargs) -> LatencyTable:
    """measure_latency_table for the dense shapes of a model folder's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TyrError(f"cannot read {path}: {err}") from err
    return measure_latency_table(config, **kwargs)

"""The network as torch.onnx.export should see it: flat inputs and outputs, and a lean graph.

Tracing transformers' own forward (with a DynamicCache rebuilt from flat tensors) also works and is as exact, but
gives about 100 ONNX nodes per decoder layer after onnxruntime's optimizations (SmolLM2: 2994 nodes), most of them
shape arithmetic (Shape/Gather/Unsqueeze/Concat before every Reshape), per-layer mask handling and repeat_kv
copies. At one thread a decode step then spends a large share of its time in those small nodes; that cost does
not shrink when a layer is pruned, so it eats the pruned model's speed-up. This graph has 40 nodes per layer
(SmolLM2: 1199). This module reuses the
model's own weights and submodules (embedding, rotary embedding, norms, projections, MLPs) and rewrites only
what bloats the graph:

- reshapes use constant target shapes with ONNX's 0 (copy this dimension) and one -1 (infer it);
- the attention mask bias is built once per forward, not once per layer;
- GQA broadcasts query groups over their KV head ([batch, kv_heads, group, seq, head_dim]) instead of copying
  the keys and values (repeat_kv);
- rotate_half is a multiplication by a constant signed permutation matrix (exact: one nonzero per column).

The math is transformers' eager attention: scores * scaling + mask bias (dtype min where masked), softmax in
float32. Export validation compares the result with the original PyTorch model.
"""

from __future__ import annotations

import torch
from torch import nn

from tyr.exporters.onnx.layout import GraphLayout


class _ReshapeConst(torch.autograd.Function):
    """Reshape to a constant shape where 0 copies the input's dimension (ONNX Reshape semantics): one ONNX node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.shape[i] if size == 0 else size for i, size in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return _ReshapeConst.apply(x, tuple(shape))


def rotate_half_matrix(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """R with x @ R == cat(-x[..., half:], x[..., :half]) (transformers' rotate_half)."""
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim, dtype=dtype)
    rotation[torch.arange(half) + half, torch.arange(half)] = -1
    rotation[torch.arange(half), torch.arange(half) + half] = 1
    return rotation


def mask_bias(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype,
              window: int | None = None) -> torch.Tensor:
    """Additive bias [batch, 1, 1, query, total]: 0 where a query may attend (causal, not padding and, with a
    sliding ``window``, one of the last ``window`` positions up to itself, as transformers counts them), else min."""
    total = attention_mask.shape[1]
    query_positions = torch.arange(query_length, device=attention_mask.device) + (total - query_length)
    key_positions = torch.arange(total, device=attention_mask.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        visible = visible & (key_positions[None, :] > query_positions[:, None] - window)
    allowed = visible[None] & attention_mask[:, None, :].bool()
    bias = torch.where(allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    return bias[:, None, None]


class Rope:
    """Rotary position embedding of this forward's positions: x * cos + rotate_half(x) * sin."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor):
        self.cos, self.sin, self.rotation = cos, sin, rotation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cos + torch.matmul(x, self.rotation) * self.sin


class ExportAttention(nn.Module):
    def __init__(self, attention: nn.Module, heads: int, kv_heads: int, head_dim: int, typed: bool):
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scaling = attention.scaling
        # Qwen3, Gemma 3: RMSNorm over head_dim of every query / key head, before RoPE (None for Llama and Qwen2).
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        # Gemma 3 (``typed``): the layer's type picks its rotary table and sliding window. Other families: one
        # table and full attention (Qwen2 and Mistral run with their window off, refused otherwise).
        self.layer_type = attention.layer_type if typed else None
        self.window = attention.sliding_window if typed else None

    def forward(self, hidden: torch.Tensor, rope: Rope, bias: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor):
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        query = reshape(self.q_proj(hidden), 0, -1, heads, head_dim)  # [b, s, h, d]
        key = reshape(self.k_proj(hidden), 0, -1, kv_heads, head_dim)  # [b, s, kv, d]
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # [b, h, s, d], [b, kv, s, d]
        value = reshape(self.v_proj(hidden), 0, -1, kv_heads, head_dim).transpose(1, 2)
        query, key = rope(query), rope(key)
        key = torch.cat([past_key, key], dim=2)  # [b, kv, total, d]: the present cache
        value = torch.cat([past_value, value], dim=2)
        grouped = reshape(query, 0, kv_heads, heads // kv_heads, -1, head_dim)  # [b, kv, group, s, d]
        # float32 from here to the softmax (a no-op in fp32 exports): fp16 scores plus the mask's dtype min
        # could overflow to -inf and turn a fully padded row into NaN.
        scores = torch.matmul(grouped, key.unsqueeze(2).transpose(3, 4)).float() * self.scaling + bias
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        out = torch.matmul(probs, value.unsqueeze(2))  # [b, kv, group, s, d]
        out = reshape(reshape(out, 0, heads, -1, head_dim).transpose(1, 2), 0, -1, heads * head_dim)
        return self.o_proj(out), key, value


class ExportDecoderLayer(nn.Module):
    """A decoder layer's blocks with the norms around them: Llama-style layers norm each block's input (input and
    post-attention norms); Gemma 3 norms each block's input and output (four norms)."""

    def __init__(self, layer: nn.Module, attention: ExportAttention | None):
        super().__init__()
        self.attention = attention
        self.mlp = getattr(layer, "mlp", None)
        four_norms = hasattr(layer, "pre_feedforward_layernorm")
        has_attention, has_mlp = attention is not None, self.mlp is not None
        self.attention_in = layer.input_layernorm if has_attention else None
        self.attention_out = layer.post_attention_layernorm if has_attention and four_norms else None
        mlp_in = layer.pre_feedforward_layernorm if four_norms else getattr(layer, "post_attention_layernorm", None)
        self.mlp_in = mlp_in if has_mlp else None
        self.mlp_out = layer.post_feedforward_layernorm if has_mlp and four_norms else None

    def forward(self, hidden, ropes, biases, past_key=None, past_value=None):
        key = value = None
        if self.attention is not None:
            kind = self.attention.layer_type
            out, key, value = self.attention(self.attention_in(hidden), ropes[kind], biases[kind], past_key,
                                             past_value)
            hidden = hidden + (self.attention_out(out) if self.attention_out is not None else out)
        if self.mlp is not None:
            out = self.mlp(self.mlp_in(hidden))
            hidden = hidden + (self.mlp_out(out) if self.mlp_out is not None else out)
        return hidden, key, value


class ExportCausalLM(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present flat and in
    ``layout.kv_layers`` order (key, value per layer)."""

    def __init__(self, model: nn.Module, layout: GraphLayout):
        super().__init__()
        body = model.model
        self.embed_tokens, self.rotary_emb, self.norm, self.lm_head = (body.embed_tokens, body.rotary_emb,
                                                                       body.norm, model.lm_head)
        dtype = self.embed_tokens.weight.dtype
        # Traced as a Constant node per use (constant-folded by onnxruntime); int8 quantization leaves it out.
        self.register_buffer("rotation", rotate_half_matrix(layout.kv_layers[0].head_dim if layout.kv_layers else 2,
                                                            dtype), persistent=False)
        kv_by_layer = {kv.layer: kv for kv in layout.kv_layers}
        layers = []
        for i, layer in enumerate(body.layers):
            attention = None
            if i in kv_by_layer:
                kv = kv_by_layer[i]
                heads = layer.self_attn.q_proj.out_features // kv.head_dim
                attention = ExportAttention(layer.self_attn, heads, kv.kv_heads, kv.head_dim,
                                            typed=hasattr(body.rotary_emb, "layer_types"))
            layers.append(ExportDecoderLayer(layer, attention))
        self.layers = nn.ModuleList(layers)
        # Gemma 3 where set: logits = cap * tanh(logits / cap).
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # layer type -> its sliding window (None for full attention and for the families without layer types).
        self.windows = {a.layer_type: a.window for layer in layers if (a := layer.attention) is not None}

    def _rope(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None) -> Rope:
        if layer_type is None:
            cos, sin = self.rotary_emb(hidden, position_ids)
        else:
            cos, sin = self.rotary_emb(hidden, position_ids, layer_type)
        return Rope(cos.unsqueeze(1), sin.unsqueeze(1), self.rotation)  # [b, 1, s, d]: broadcast over heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.embed_tokens(input_ids)  # Gemma 3's embedding module scales by sqrt(hidden) itself
        # One rotary table and mask bias per layer type, built once per forward, not once per layer.
        ropes = {kind: self._rope(hidden, position_ids, kind) for kind in self.windows}
        biases = {kind: mask_bias(attention_mask, input_ids.shape[1], torch.float32, window)
                  for kind, window in self.windows.items()}
        present, slot = [], 0
        for layer in self.layers:
            if layer.attention is None:
                hidden, _, _ = layer(hidden, ropes, biases)
            else:
                hidden, key, value = layer(hidden, ropes, biases, past[2 * slot], past[2 * slot + 1])
                present += [key, value]
                slot += 1
        logits = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return (logits, *present)


def example_inputs(layout: GraphLayout, dtype: torch.dtype, batch: int = 2, sequence: int = 5,
                   past: int = 3) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: a non-empty past (the traced graph must concatenate) and a left-padded row."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, layout.vocab_size, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.long)
    attention_mask[0, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    tensors = []
    for kv in layout.kv_layers:
        tensors += [torch.randn(batch, kv.kv_heads, past, kv.head_dim, generator=generator).to(dtype)
                    for _ in range(2)]
    return (input_ids, attention_mask, position_ids, *tensors)

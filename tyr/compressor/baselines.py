"""Baselines for comparison with Týr: uniform sparsity with simple saliency metrics, no search.

- ``magnitude``: every layer keeps the same share; heads and FFN channels are ranked by the L2 norm of their weights
  (a head: its q_proj rows and o_proj columns, a KV group: its k/v rows plus its heads); no weight update.
- ``flap``: FLAP's fluctuation metric (An et al., 2024): the variance of an output projection's input feature over
  the calibration tokens times the squared norm of its weight column, summed over a head's columns; uniform
  sparsity per layer (FLAP's adaptive structure search is not used), with FLAP's bias compensation: the removed
  columns' mean contribution W[:, removed] · mean(X[:, removed]) becomes a bias of o_proj / down_proj. Statistics
  come from one pass of the dense model over the calibration tokens.
- ``uniform`` (the same local pruner as Týr at one level everywhere) lives in prune.py: it is a one-candidate
  supernet.

All baselines share Týr's width rules (``tyr.models.facts.gqa_widths`` and ``ffn_width``), so at a given sparsity
they have the same per-layer widths and parameter counts as Týr's uniform start.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from tyr.errors import TyrError
from tyr.models.facts import WidthRules, ffn_width, gqa_widths, layer_widths
from tyr.models.families import family_of
from tyr.models.slicing import LayerKeep, slice_model, to_tyr


def _choose_heads(head_scores: torch.Tensor, group_extra: torch.Tensor, kv_heads: int,
                  configs: list[tuple[int, int]]) -> list[int]:
    """The best-scoring GQA-consistent head set among ``configs`` (highest total kept score)."""
    per_group = head_scores.numel() // kv_heads
    by_group = head_scores.view(kv_heads, per_group)
    best, best_score = [], float("-inf")
    for groups, per in configs:
        if groups == 0:
            return []
        top = by_group.topk(per, dim=1)
        group_score = top.values.sum(1) + group_extra
        kept_groups = group_score.topk(groups).indices.sort().values.tolist()
        heads = sorted(g * per_group + int(i) for g in kept_groups for i in top.indices[g].tolist())
        score = float(group_score[kept_groups].sum())
        if score > best_score:
            best, best_score = heads, score
    return best


@torch.no_grad()
def uniform_magnitude_keeps(model, level: float, rules: WidthRules = WidthRules()) -> list[LayerKeep]:
    """Uniform L2-norm keep sets: heads (GQA-consistent) and FFN channels, every layer at sparsity ``level`` (the
    widths ``rules`` allow)."""
    head_dim = model.config.head_dim
    keeps = []
    for layer, width in zip(model.model.layers, layer_widths(model.config)):
        keep_heads: list[int] = []
        if layer.self_attn is not None:
            attn = layer.self_attn
            q = attn.q_proj.weight.view(width.num_attention_heads, head_dim, -1).float().pow(2).sum((1, 2))
            o = attn.o_proj.weight.view(-1, width.num_attention_heads, head_dim).float().pow(2).sum((0, 2))
            kv = (attn.k_proj.weight.view(width.num_key_value_heads, head_dim, -1).float().pow(2).sum((1, 2))
                  + attn.v_proj.weight.view(width.num_key_value_heads, head_dim, -1).float().pow(2).sum((1, 2)))
            configs = gqa_widths(width.num_attention_heads, width.num_key_value_heads, level, rules)
            keep_heads = _choose_heads((q + o).sqrt(), kv.sqrt(), width.num_key_value_heads, configs)
        keep_ffn: list[int] = []
        if layer.mlp is not None:
            mlp = layer.mlp
            score = (mlp.gate_proj.weight.float().pow(2).sum(1) + mlp.up_proj.weight.float().pow(2).sum(1)
                     + mlp.down_proj.weight.float().pow(2).sum(0)).sqrt()
            n = ffn_width(width.intermediate_size, level, rules)
            keep_ffn = score.topk(n).indices.sort().values.tolist() if n else []
        keeps.append(LayerKeep(keep_heads=keep_heads, keep_ffn=keep_ffn))
    return keeps


def magnitude_prune(model, level: float, rules: WidthRules = WidthRules()):
    """The magnitude baseline as a physically smaller TyrLlamaForCausalLM."""
    return slice_model(to_tyr(model), uniform_magnitude_keeps(model, level, rules))


class _InputStats:
    """Running mean and variance of a linear layer's input features (float64 sums)."""

    def __init__(self):
        self.count, self.sum, self.sumsq = 0, None, None

    def __call__(self, module, args, output=None):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        if self.sum is None:
            self.sum, self.sumsq = x.sum(0), x.pow(2).sum(0)
        else:
            self.sum += x.sum(0)
            self.sumsq += x.pow(2).sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.sumsq / self.count - self.mean.pow(2)).clamp_min(0)


@torch.no_grad()
def flap_prune(model, calibration_ids: torch.LongTensor, level: float, batch_sequences: int = 4,
               progress: bool = True, rules: WidthRules = WidthRules()):
    """The FLAP baseline: fluctuation metric, uniform per layer, bias compensation on o_proj and down_proj.

    The result carries biases (config attention_bias and mlp_bias; q/k/v/gate/up biases are zero), which the
    tyr_llama format and its loaders support.
    """
    if family_of(model.config).name == "qwen2":
        raise TyrError("FLAP compensates pruned heads with an o_proj bias, which Qwen2 attention does not have: "
                       "use method tyr, uniform or magnitude for Qwen2 models")
    if family_of(model.config).name == "gemma3":
        raise TyrError("FLAP compensates pruned heads and channels with a constant bias on o_proj and down_proj, but "
                       "Gemma 3 normalizes each block's output after that projection (post_attention_layernorm, "
                       "post_feedforward_layernorm), so the bias no longer restores the mean output: use method tyr, "
                       "uniform or magnitude for Gemma 3 models")
    model = to_tyr(model)
    stats = _output_projection_inputs(model, calibration_ids, batch_sequences, progress)
    head_dim = model.config.head_dim
    keeps, biases = [], {}
    for i, (layer, width) in enumerate(zip(model.model.layers, layer_widths(model.config))):
        keep_heads: list[int] = []
        if layer.self_attn is not None:
            s, w = stats[i, "attn"], layer.self_attn.o_proj.weight.to(torch.float64)
            metric = s.variance * w.pow(2).sum(0)
            heads = metric.view(width.num_attention_heads, head_dim).sum(1)
            configs = gqa_widths(width.num_attention_heads, width.num_key_value_heads, level, rules)
            keep_heads = _choose_heads(heads, torch.zeros(width.num_key_value_heads, dtype=heads.dtype),
                                       width.num_key_value_heads, configs)
            kept = torch.zeros(w.shape[1], dtype=torch.bool)
            for h in keep_heads:
                kept[h * head_dim:(h + 1) * head_dim] = True
            biases[f"model.layers.{i}.self_attn.o_proj.bias"] = _compensation(w, s, kept)
        keep_ffn: list[int] = []
        if layer.mlp is not None:
            s, w = stats[i, "mlp"], layer.mlp.down_proj.weight.to(torch.float64)
            metric = s.variance * w.pow(2).sum(0)
            n = ffn_width(width.intermediate_size, level, rules)
            keep_ffn = metric.topk(n).indices.sort().values.tolist() if n else []
            kept = torch.zeros(w.shape[1], dtype=torch.bool)
            kept[keep_ffn] = True
            biases[f"model.layers.{i}.mlp.down_proj.bias"] = _compensation(w, s, kept)
        keeps.append(LayerKeep(keep_heads=keep_heads, keep_ffn=keep_ffn))
    return slice_model(with_output_biases(model, biases), keeps)


def _output_projection_inputs(model, calibration_ids: torch.LongTensor, batch_sequences: int,
                              progress: bool) -> dict[tuple[int, str], _InputStats]:
    """Mean and variance of every o_proj and down_proj input over the calibration tokens, from one dense pass."""
    stats: dict[tuple[int, str], _InputStats] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if layer.self_attn is not None:
            stats[i, "attn"] = _InputStats()
            hooks.append(layer.self_attn.o_proj.register_forward_hook(stats[i, "attn"]))
        if layer.mlp is not None:
            stats[i, "mlp"] = _InputStats()
            hooks.append(layer.mlp.down_proj.register_forward_hook(stats[i, "mlp"]))
    device = next(model.parameters()).device
    try:
        for batch in tqdm(calibration_ids.split(batch_sequences), desc="FLAP statistics", unit="batch",
                          disable=not progress, leave=False):
            model.model(input_ids=batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _compensation(weight: torch.Tensor, stats: _InputStats, kept: torch.Tensor) -> torch.Tensor:
    """The removed columns' mean contribution, W[:, removed] · mean(X[:, removed]): the bias that replaces them."""
    return weight[:, ~kept] @ stats.mean[~kept]


def with_output_biases(model, biases: dict[str, torch.Tensor]):
    """A copy of ``model`` with attention_bias and mlp_bias set: the given biases, every other bias zero."""
    config = copy.deepcopy(model.config)
    config.attention_bias, config.mlp_bias = True, True
    param = next(model.parameters())
    biased = type(model)(config).to(dtype=param.dtype, device=param.device)
    state = model.state_dict()
    for name, tensor in biased.state_dict().items():
        if name.endswith(".bias"):
            state[name] = biases[name].to(tensor) if name in biases else torch.zeros_like(tensor)
    missing, unexpected = biased.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise TyrError(f"bias compensation: weights do not fit ({missing}, {unexpected})")
    biased.generation_config = copy.deepcopy(model.generation_config)
    return biased.eval()

"""The search's fitness: sparse KL divergence of a candidate network's next-token distribution from the dense one's.

The dense model's top-k log-probs on the selection sequences are computed once. A candidate network (one supernet
candidate per module) is then run functionally, module by module, and scored with

    KL ≈ Σ_{i ∈ top-k} p_i (log p_i − log q_i)

per token position (p the dense distribution, q the candidate's full log-softmax), summed per sequence. Sequences
are grouped in fixed batches; per-batch sums are cached per choice, so re-scoring a survivor on more tokens
(later stages use the earlier stages' batches plus new ones) only runs the new batches.

Activation reuse: an offspring equals its parent up to its first mutated module. The parent ("anchor") keeps its
hidden states at module boundaries (every ``stride``-th boundary, within a memory cap), per batch of sequences,
so an offspring's forward starts at the last stored boundary before its first change. Sequences are always run
in the same fixed batches, so a restarted forward is bit-identical to a full one. When the parent changes, its
stored states stay valid up to the first module where old and new parent differ; the rest is refreshed lazily,
and only when the offspring that need that batch save more module evaluations than the refresh costs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from tqdm.auto import tqdm

from tyr.compressor import distributed
from tyr.compressor.layerwise import KINDS, DenseParts, attention_delta, heads_of, mlp_delta, module_weights
from tyr.compressor.search import Choice

# Positions per LM-head chunk of the fitness (see sparse_kl), and rows per float32 logsumexp over the vocabulary.
POSITIONS_PER_CHUNK = 128
ROWS_PER_NORMALIZER = 16
# The search's caches take at most this share of the memory left beside the LM head and one evaluation.
CACHE_SHARE = 0.75


@dataclass
class SelectionTargets:
    """Selection sequences and the dense model's top-k next-token log-probs on them (computed once)."""

    ids: torch.LongTensor          # [N, L]
    top_logp: torch.Tensor         # [N, L, k] float32
    top_index: torch.Tensor        # [N, L, k] int32 (half the memory of int64 at the paper's k = 8192)

    @property
    def num_sequences(self) -> int:
        return self.ids.shape[0]


@torch.no_grad()
def dense_targets(model, ids: torch.LongTensor, top_k: int, batch_sequences: int = 1, progress: bool = True,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> SelectionTargets:
    """Run the dense model once over ``ids`` and keep its top-k log-probs per position.

    The model runs one decoder module at a time over all the sequences, in ``dtype`` on ``device`` (default: where
    a loaded model is), with the same functional layers as the candidates' fitness; a StreamedModel reads each
    module's weights from its files when it is reached, so only one module and the sequences' hidden states are
    ever in memory. Under torchrun each rank runs its share of the batches and all ranks receive the rest.
    """
    parts = DenseParts.from_model(model)
    device = torch.device(device) if device is not None else parts.embed_tokens.device
    top_k = min(top_k, parts.lm_head.shape[0])
    top_logp = torch.empty(*ids.shape, top_k)
    top_index = torch.empty(*ids.shape, top_k, dtype=torch.int32)
    batches = [slice(start, start + batch_sequences) for start in range(0, ids.shape[0], batch_sequences)]
    rows = torch.tensor([r for k in distributed.owned(len(batches)) for r in range(ids.shape[0])[batches[k]]],
                        dtype=torch.long)      # empty on a rank that owns no batch
    hidden = parts.embed(ids[rows].to(device)).to(dtype)
    positions = parts.positions(ids.shape[1], device=device, dtype=dtype)
    chunks = [slice(start, start + batch_sequences) for start in range(0, len(rows), batch_sequences)]
    modules = [(layer, kind) for layer in range(parts.num_layers) for kind in KINDS]
    for layer, kind in tqdm(modules, desc="dense targets", unit="module", disable=not progress, leave=False):
        w = {k: v.to(device, dtype) for k, v in module_weights(model, layer, kind).items()}
        for chunk in chunks:
            x = hidden[chunk]
            if kind == "attn":
                heads, kv_heads = heads_of(w, parts.head_dim)
                cos, sin, window = positions[layer]
                x += attention_delta(x, w, heads, kv_heads, cos, sin, parts.head_dim, parts.eps, style=parts.style,
                                     window=window)
            else:
                x += mlp_delta(x, w, parts.eps, style=parts.style)
    head = parts.with_head_on(device, dtype)
    # The LM head a few positions at a time (as in sparse_kl): no vocab-sized logits for a whole batch, and no
    # small kept tensors allocated between large transient ones, which fragments the heap.
    step = max(1, POSITIONS_PER_CHUNK // batch_sequences)
    for chunk in chunks:
        out = rows[chunk]
        for position in range(0, ids.shape[1], step):
            span = slice(position, position + step)
            logits = head.logits(hidden[chunk, span].flatten(0, 1))     # 2-D: see sparse_kl
            rows_per = _normalizer_rows(logits)
            tops = [F.log_softmax(logits[i:i + rows_per].float(), dim=-1).topk(top_k, dim=-1)
                    for i in range(0, logits.shape[0], rows_per)]
            top_logp[out, span] = torch.cat([t.values for t in tops]).view(len(out), -1, top_k).cpu()
            top_index[out, span] = torch.cat([t.indices for t in tops]).view(len(out), -1, top_k).cpu().to(torch.int32)
    distributed.share_rows(top_logp, batches)
    distributed.share_rows(top_index, batches)
    return SelectionTargets(ids=ids.cpu(), top_logp=top_logp, top_index=top_index)


def sparse_kl(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], top_logp: torch.Tensor,
              top_index: torch.Tensor) -> torch.Tensor:
    """Σ over positions of Σ_{i∈top-k} p_i (log p_i − log q_i), per sequence [B] (float64).

    ``head`` maps hidden states [N, D] to logits [N, V] (the identity if ``hidden`` already holds logits). It runs
    on a few positions at a time, so the full [B, L, V] logits never exist: a small chunk's buffers are reused by
    the allocator, where a fresh [L, V] buffer per forward costs page faults (``POSITIONS_PER_CHUNK`` positions
    per chunk). The head gets a 2-D input: a [1, n, D] slice of a longer sequence can send the CPU matmul down a
    much slower path.
    """
    batch, length = hidden.shape[:2]
    out = torch.zeros(batch, dtype=torch.float64, device=hidden.device)
    step = max(1, POSITIONS_PER_CHUNK // batch)
    for start in range(0, length, step):
        chunk = slice(start, start + step)
        logits = head(hidden[:, chunk].flatten(0, 1))
        logits = logits.view(batch, -1, logits.shape[-1])
        log_p = top_logp[:, chunk].to(logits.device)
        # log q_i = logit_i - logsumexp(logits): only the top-k entries are needed, not a full log-softmax.
        top = logits.gather(-1, top_index[:, chunk].to(logits.device, torch.int64)).float()
        log_q_top = top - _log_normalizer(logits)
        out += (log_p.exp() * (log_p - log_q_top)).sum(dim=(1, 2), dtype=torch.float64)
    return out


def _log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary in float32, [..., V] -> [..., 1], a few rows at a time (_normalizer_rows)."""
    rows = logits.reshape(-1, logits.shape[-1])
    step = _normalizer_rows(rows)
    sums = [torch.logsumexp(rows[i:i + step].float(), dim=-1) for i in range(0, rows.shape[0], step)]
    return torch.cat(sums).view(*logits.shape[:-1], 1)


def _normalizer_rows(rows: torch.Tensor) -> int:
    """Rows of logits per float32 pass over the vocabulary: ``ROWS_PER_NORMALIZER`` on a CPU, where the float32
    copy of a whole chunk would fall out of its cache (row by row, the results are the same bits); all elsewhere."""
    return ROWS_PER_NORMALIZER if rows.device.type == "cpu" else max(rows.shape[0], 1)


def evaluation_bytes(vocab_size: int, hidden_size: int, batch_tokens: int, batch_sequences: int,
                     compute_bytes: int, on_cpu: bool) -> int:
    """One fitness evaluation's transient memory, beside the LM head and the caches: a batch's residual stream and
    its working copies, one head chunk's logits, and the float32 rows of their normalizer (see sparse_kl)."""
    positions = max(batch_sequences, POSITIONS_PER_CHUNK)
    rows = ROWS_PER_NORMALIZER if on_cpu else positions
    return 4 * batch_tokens * hidden_size * 4 + positions * vocab_size * compute_bytes + rows * vocab_size * 8


def fitted_caches_mb(activation_mb: float, weight_mb: float, free_bytes: int | None,
                     resident_bytes: int) -> tuple[float, float]:
    """The search caches' caps (MiB): the recipe's, both scaled down by the same factor where together they would
    take more than ``CACHE_SHARE`` of what ``free_bytes`` leaves beside ``resident_bytes`` (the LM head and one
    evaluation). The caches only save recomputation, so smaller ones change the time, not the result."""
    asked = (activation_mb + weight_mb) * 2 ** 20
    if free_bytes is None or asked == 0:
        return activation_mb, weight_mb
    room = max(0.0, CACHE_SHARE * (free_bytes - resident_bytes))
    scale = min(1.0, room / asked)
    return activation_mb * scale, weight_mb * scale


class ReuseStats(BaseModel):
    """Work done by the fitness, in decoder-module evaluations (one attention or MLP block on one batch)."""

    module_evaluations: int = 0
    module_evaluations_without_reuse: int = 0
    forwards: int = 0                      # candidate-batch forwards (each ends in the LM head)
    cached_results: int = 0                # choice-batch results taken from the per-choice cache
    anchor_refresh_modules: int = 0        # module evaluations spent refreshing the parent's states (included above)
    seconds: float = 0.0
    compute_dtype: str = "float32"

    def across_ranks(self) -> "ReuseStats":
        """The work of all torchrun ranks together: counts added, the slowest rank's seconds."""
        counts = [name for name, field in type(self).model_fields.items() if field.annotation is int]
        ranks = distributed.gather_floats([getattr(self, name) for name in counts] + [self.seconds])
        return self.model_copy(update={name: int(sum(row[i] for row in ranks)) for i, name in enumerate(counts)}
                               | {"seconds": max(row[-1] for row in ranks)})

    @property
    def saving(self) -> float:
        """Fraction of decoder-module evaluations avoided by restarting from cached states."""
        full = self.module_evaluations_without_reuse
        return 1 - self.module_evaluations / full if full else 0.0


class SupernetKL:
    """Fitness = mean sparse KL per token over the given selection batches (lower is better).

    The residual stream (and the parent's stored states) stay in ``dtype``; each module and the LM head compute in
    ``compute_dtype`` (bfloat16 where matmuls are faster in it), with the module's update added back in ``dtype``.

    Batch b holds selection sequences [b · batch_sequences, (b + 1) · batch_sequences). The parent's hidden states
    are kept for at most ``cached_batches`` batches (least recently used dropped), at every ``stride``-th module
    boundary so that they fit in ``activation_cache_mb``.
    """

    def __init__(self, parts: DenseParts, weights: Callable[[int, int], dict[str, torch.Tensor]], kinds: list[str],
                 targets: SelectionTargets, batch_sequences: int, reuse_activations: bool = True,
                 activation_cache_mb: float = 1024, weight_cache_mb: float = 1024, cached_batches: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None):
        if targets.num_sequences % batch_sequences:
            raise ValueError(f"{targets.num_sequences} selection sequences do not split into batches of "
                             f"{batch_sequences}")
        self.parts, self.kinds, self.targets = parts, kinds, targets
        self._weights = weights
        self.device, self.dtype = torch.device(device), dtype
        self.compute_dtype = compute_dtype or dtype
        self.head_parts = parts.with_head_on(self.device, self.compute_dtype)
        self.batch = batch_sequences
        self.num_modules = len(kinds)
        self.seq_len = targets.ids.shape[1]
        self.positions = parts.positions(self.seq_len, device=self.device, dtype=self.compute_dtype)
        self.reuse = reuse_activations
        hidden = parts.embed_tokens.shape[1]
        self.num_batches = targets.num_sequences // batch_sequences
        self.cached_batches = min(cached_batches or self.num_batches, self.num_batches)
        state_bytes = batch_sequences * self.seq_len * hidden * torch.finfo(dtype).bits // 8
        full = self.num_modules * self.cached_batches * state_bytes
        cap = activation_cache_mb * 2 ** 20
        self.stride = max(1, -(-full // int(cap))) if cap > 0 else self.num_modules + 1
        if self.stride > self.num_modules:
            self.reuse = False
        self.weight_cache: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self.weight_cache_bytes, self.weight_cache_cap = 0, weight_cache_mb * 2 ** 20
        self.results: dict[Choice, dict[int, torch.Tensor]] = {}    # choice -> batch -> per-sequence KL sums
        self.anchor: Choice | None = None
        self.anchor_states: OrderedDict[int, dict[int, torch.Tensor]] = OrderedDict()  # batch -> boundary -> states
        self.anchor_valid: dict[int, int] = {}                       # batch -> boundaries <= this are the anchor's
        self.stats = ReuseStats(compute_dtype=str(self.compute_dtype).removeprefix("torch."))

    # -- the Fitness protocol --

    def set_parent(self, choice: Choice) -> None:
        if self.anchor is not None and choice != self.anchor:
            first = _first_difference(choice, self.anchor)
            for b in self.anchor_valid:
                self.anchor_valid[b] = min(self.anchor_valid[b], first)
        self.anchor = choice

    @torch.no_grad()
    def evaluate(self, choices: list[Choice], batches: Sequence[int]) -> list[float]:
        started = time.perf_counter()
        if not batches or any(not 0 <= b < self.num_batches for b in batches):
            raise ValueError(f"selection batches {list(batches)} must be non-empty indices below {self.num_batches}")
        for b in batches:
            todo = [c for c in dict.fromkeys(choices) if b not in self.results.get(c, {})]
            self.stats.cached_results += len(choices) - len(todo)
            if self.reuse and self.anchor is not None and todo:
                self._maybe_refresh(b, todo)
                todo = [c for c in todo if b not in self.results.get(c, {})]
            for choice in todo:
                self.results.setdefault(choice, {})[b] = self._run(choice, b)
        tokens = len(batches) * self.batch * self.seq_len
        scores = [float(sum(self.results[c][b].sum().item() for b in batches) / tokens) for c in choices]
        self.stats.seconds += time.perf_counter() - started
        return scores

    # -- internals --

    def weights(self, module: int, candidate: int) -> dict[str, torch.Tensor]:
        key = (module, candidate)
        if key in self.weight_cache:
            self.weight_cache.move_to_end(key)
            return self.weight_cache[key]
        w = {k: v.to(device=self.device, dtype=self.compute_dtype)
             for k, v in self._weights(module, candidate).items()}
        size = sum(v.numel() * v.element_size() for v in w.values())
        self.weight_cache[key] = w
        self.weight_cache_bytes += size
        while self.weight_cache_bytes > self.weight_cache_cap and len(self.weight_cache) > 1:
            _, old = self.weight_cache.popitem(last=False)
            self.weight_cache_bytes -= sum(v.numel() * v.element_size() for v in old.values())
        return w

    def _module(self, m: int, candidate: int, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(m, candidate)
        self.stats.module_evaluations += 1
        h = x.to(self.compute_dtype)
        if self.kinds[m] == "attn":
            heads, kv_heads = heads_of(w, self.parts.head_dim)
            cos, sin, window = self.positions[m // len(KINDS)]
            delta = attention_delta(h, w, heads, kv_heads, cos, sin, self.parts.head_dim, self.parts.eps,
                                    style=self.parts.style, window=window)
        else:
            delta = mlp_delta(h, w, self.parts.eps, style=self.parts.style)
        return x + delta.to(x.dtype)

    def _batch_ids(self, b: int) -> torch.Tensor:
        return self.targets.ids[b * self.batch:(b + 1) * self.batch].to(self.device)

    def _restart_point(self, choice: Choice, b: int) -> int:
        """The last stored boundary of the anchor's batch ``b`` that ``choice`` shares (0 = from the embedding)."""
        if not self.reuse or self.anchor is None or b not in self.anchor_valid:
            return 0
        self.anchor_states.move_to_end(b)
        return self._floor(min(_first_difference(choice, self.anchor), self.anchor_valid[b]))

    def _run(self, choice: Choice, b: int, start: int | None = None) -> torch.Tensor:
        start = self._restart_point(choice, b) if start is None else start
        x = self.anchor_states[b][start] if start else self.parts.embed(self._batch_ids(b)).to(self.dtype)
        for m in range(start, self.num_modules):
            x = self._module(m, choice[m], x)
        self.stats.module_evaluations_without_reuse += self.num_modules
        self.stats.forwards += 1
        return self._kl(x, b)

    def _kl(self, x: torch.Tensor, b: int) -> torch.Tensor:
        rows = slice(b * self.batch, (b + 1) * self.batch)
        return sparse_kl(x, self._head, self.targets.top_logp[rows], self.targets.top_index[rows]).cpu()

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_parts.logits(x.to(self.compute_dtype))

    def _maybe_refresh(self, b: int, todo: list[Choice]) -> None:
        """Recompute the anchor's states of batch ``b`` from its last valid boundary, if that saves work."""
        others = [c for c in todo if c != self.anchor]
        if b not in self.anchor_valid:
            # First use of this batch: store the anchor's states if the offspring then skip more than they cost.
            gain = sum(self._floor(_first_difference(c, self.anchor)) for c in others)
            if self.anchor in todo or gain > self.num_modules:
                self._store_anchor(b, 0, needed=self.anchor in todo)
            return
        if self.anchor_valid[b] >= self.num_modules:
            return
        valid = self._floor(self.anchor_valid[b])
        now = sum(self._restart_point(c, b) for c in others)
        after = sum(self._floor(_first_difference(c, self.anchor)) for c in others)
        if self.anchor in todo or after - now > self.num_modules - valid:
            self._store_anchor(b, valid, needed=self.anchor in todo)

    def _floor(self, boundary: int) -> int:
        """The last stored boundary at or before ``boundary``."""
        return (min(boundary, self.num_modules - 1) // self.stride) * self.stride

    def _store_anchor(self, b: int, start: int, needed: bool) -> None:
        """Run the anchor on batch ``b`` from boundary ``start``, storing states at every stride-th boundary."""
        states = self.anchor_states.setdefault(b, {})
        self.anchor_states.move_to_end(b)
        while len(self.anchor_states) > self.cached_batches:
            old, _ = self.anchor_states.popitem(last=False)
            self.anchor_valid.pop(old, None)
        for k in [k for k in states if k > start]:
            del states[k]
        x = states[start] if start else self.parts.embed(self._batch_ids(b)).to(self.dtype)
        before = self.stats.module_evaluations
        for m in range(start, self.num_modules):
            if m % self.stride == 0 and m:
                states[m] = x
            x = self._module(m, self.anchor[m], x)
        self.stats.anchor_refresh_modules += self.stats.module_evaluations - before
        # Without reuse the anchor runs only when its own result is wanted.
        self.stats.module_evaluations_without_reuse += self.num_modules if needed else 0
        self.stats.forwards += 1
        self.anchor_valid[b] = self.num_modules
        self.results.setdefault(self.anchor, {})[b] = self._kl(x, b)


def _first_difference(a: Choice, b: Choice) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return len(a)

"""`tyr plan`: what a prune needs before it runs, from a Hugging Face config alone (no weights).

Per stage (loading, supernet building, search, the final build, an evaluation pass) it gives the peak device and
host memory, the disk in use, the bytes written and the work in FLOPs. Every figure comes from what the run uses:
tyr.models.facts for widths and parameter counts, the recipe for token counts and caches, the coarse-to-fine
ladders of the search module, and the supernet's own sizing of what it stores. It plans the run as implemented:
the dense model is read from its folder one decoder module at a time (in float32 on the compute device while that
module works), its embedding and LM head stay on the host in their stored dtype, the calibration hidden states stay
on the compute device (or the host: recipe ``memory.hidden_states``), and the pruned model is written from the host
a shard at a time in the stored dtype.

Assumptions it cannot read from a config are named in the plan: the sustained FLOP rate (it sets how many
hidden-state checkpoints a build writes), a process baseline, and the work a search saves by reusing activations
(none counted: its FLOPs are an upper bound).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, Field

from tyr.errors import TyrError
from tyr.models.facts import LayerWidth, decoder_params, layer_params, layer_widths

GiB = 2 ** 30
BASELINE_BYTES = GiB // 2           # Python, torch, transformers and a tokenizer in a process, before any tensor
MANIFEST_BYTES_PER_INDEX = 16       # a kept head / channel in the supernet manifest (indented JSON)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
EVAL_TOKENS, EVAL_BATCH, EVAL_SEQ = 32 * 512, 4, 512     # `tyr eval`'s defaults: 32 blocks of 512, batches of 4


class StagePlan(BaseModel):
    name: str
    device_bytes: int = Field(description="peak memory on the compute device")
    host_bytes: int = Field(description="peak host memory (the same memory as the device's on a CPU)")
    disk_bytes: int = Field(description="peak size of the work and output folders")
    written_bytes: int = Field(description="bytes written to disk during the stage")
    flops: float
    notes: list[str] = []
    in_prune: bool = Field(True, description="part of `tyr prune` (the evaluation pass is a separate `tyr eval`)")


class RunPlan(BaseModel):
    model: str
    recipe: str
    sparsity: float
    device: str = Field(description="cpu, or a GPU of device_memory bytes")
    device_memory: int | None
    host_memory: int | None
    weights_dtype: str
    total_params: int
    decoder_params: int
    throughput_tflops: float
    supernet_bytes: list[int] = Field(description="each coarse-to-fine iteration's supernet on disk")
    stages: list[StagePlan]
    fits: bool
    advice: list[str]

    @property
    def peak_device(self) -> int:
        """The prune's peak device memory (its stages, not the evaluation)."""
        return max(s.device_bytes for s in self.stages if s.in_prune)

    @property
    def peak_host(self) -> int:
        return max(s.host_bytes for s in self.stages if s.in_prune)


# ----- the model, from its config -----

def read_config(path: str | Path):
    """A dense model's transformers config from a config.json or a folder holding one; TyrError otherwise."""
    from tyr.models import register_auto_classes
    from tyr.models.io import check_supported

    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise TyrError(f"no model config at {path}: give a config.json or a folder holding one")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TyrError(f"{file} is not a readable JSON config ({err})") from err
    if not isinstance(data, dict):
        raise TyrError(f"{file} must hold a JSON object, got {type(data).__name__}")
    check_supported(data, str(file))
    from transformers import AutoConfig

    register_auto_classes()
    try:
        config = AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items() if k != "model_type"})
        widths = layer_widths(config)
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as err:
        raise TyrError(f"{file} is not a complete {data['model_type']} config ({err})") from err
    if len(set(widths)) > 1:
        raise TyrError(f"{file} describes an already pruned model (layers of different widths); plan the prune of "
                       "the dense model")
    return config


def weights_dtype(config) -> str:
    """The dtype the config says the weights are stored in (float32 when it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


class _Sizes(SimpleNamespace):
    """The parameter counts of a dense model and of its pruned form, from tyr.models.facts."""

    @classmethod
    def of(cls, config, sparsity: float) -> "_Sizes":
        decoder = decoder_params(config)
        embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        return cls(decoder=decoder, total=decoder + embeddings + config.hidden_size,
                   pruned=round(decoder * (1 - sparsity)) + embeddings + config.hidden_size,
                   head=config.vocab_size * config.hidden_size)


# ----- the plan -----

def plan_prune(config_path: str | Path, recipe="fast", sparsity: float = 0.5, device_memory: int | None = None,
               host_memory: int | None = None, throughput_tflops: float | None = None,
               tokenizer_bytes: int | None = None) -> RunPlan:
    """The plan of `tyr prune --model <the config's model> --recipe recipe --sparsity sparsity` on a GPU of
    ``device_memory`` bytes (None: on the CPU), with ``host_memory`` bytes of RAM (None: not checked)."""
    from tyr.compressor.recipes import load_recipe

    if not 0 < sparsity < 1:
        raise TyrError(f"sparsity must be a fraction strictly between 0 and 1, got {sparsity}")
    recipe = load_recipe(recipe)
    config = read_config(config_path)
    gpu = device_memory is not None
    tflops = throughput_tflops or (100.0 if gpu else 0.2)
    folder = Path(config_path).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    if tokenizer_bytes is None:
        tokenizer_bytes = sum(p.stat().st_size for p in folder.glob("tokenizer*") if p.is_file())
    context = _Context(config, recipe, sparsity, device_memory, host_memory, tflops, tokenizer_bytes)
    stages = [context.load(), context.supernet(), context.search(), context.final(), context.evaluation()]
    plan = RunPlan(model=str(config_path), recipe=recipe.name, sparsity=sparsity, device="gpu" if gpu else "cpu",
                   device_memory=device_memory, host_memory=host_memory, weights_dtype=context.stored,
                   total_params=context.sizes.total, decoder_params=context.sizes.decoder,
                   throughput_tflops=tflops, supernet_bytes=[s.disk for s in context.supernets], stages=stages,
                   fits=True, advice=[])
    plan.advice = context.advice(plan)
    plan.fits = not any(a.startswith("does not fit") for a in plan.advice)
    plan.advice += context.evaluation_advice(plan)
    return plan


class _Context:
    """One plan's inputs and the sizes every stage shares."""

    def __init__(self, config, recipe, sparsity: float, device_memory: int | None, host_memory: int | None,
                 tflops: float, tokenizer_bytes: int):
        import torch

        from tyr.compressor.supernet import hidden_dtype, narrower

        self.config, self.recipe, self.sparsity = config, recipe, sparsity
        self.device_memory, self.gpu, self.host_memory = device_memory, device_memory is not None, host_memory
        self.rate, self.tokenizer_bytes = tflops * 1e12, tokenizer_bytes
        self.sizes = _Sizes.of(config, sparsity)
        self.stored = weights_dtype(config)
        self.store = narrower(torch.float32, getattr(torch, self.stored, torch.float32))
        self.hidden_itemsize = hidden_dtype(self.store).itemsize
        self.store_bytes = self.store.itemsize
        # Streamed: only one decoder module is resident (in float32 while it works), plus the embedding and LM head
        # in their stored dtype on the host.
        self.module_bytes = 4 * max(max(layer_params(config, width)) for width in layer_widths(config))
        self.parts_bytes = self.store_bytes * (self.sizes.total - self.sizes.decoder)
        calibration = recipe.calibration
        self.tokens = calibration.tokens
        self.hidden_bytes = self.tokens * config.hidden_size * self.hidden_itemsize
        self.supernets = [self._supernet(i) for i in range(recipe.iterations)]

    # ----- stages -----

    def load(self) -> StagePlan:
        return StagePlan(name="load model", device_bytes=0, host_bytes=BASELINE_BYTES + self.largest_tensor,
                         disk_bytes=0, written_bytes=0, flops=0.0,
                         notes=["config, tokenizer and tensor headers; every tensor is read once, one at a time, "
                                "to fingerprint the weights"])

    def supernet(self) -> StagePlan:
        """The largest iteration's build: the model, the hidden states and one module's working set on the
        device; the previous best supernet and a checkpoint beside the new one on disk."""
        work = max(self._module_work(kind, levels) for s in self.supernets for kind, levels in s.ladders)
        on_host = self.hidden_on_host
        device = self.module_bytes + (0 if on_host else self.hidden_bytes) + work
        checkpointing = any(s.checkpoints for s in self.supernets)
        # The embedding (not the head) is read to embed the tokens, and freed before the first module.
        embedding = self.store_bytes * self.sizes.head
        host = (BASELINE_BYTES + self.tokens * 8 + (self.hidden_bytes if checkpointing or on_host else 0)
                + (embedding if self.gpu else max(embedding, device)))
        disk = self.supernets_on_disk + (2 * self.checkpoint_bytes if checkpointing else 0)
        notes = [f"{len(self.supernets)} supernets of {', '.join(_gib(s.disk) for s in self.supernets)} "
                 f"({self.stored_name}); hidden states {_gib(self.hidden_bytes)} "
                 f"({self.tokens:,} tokens, {'in host memory' if on_host else 'on the device'}); "
                 f"{sum(s.checkpoints for s in self.supernets)} checkpoints of "
                 f"{_gib(self.checkpoint_bytes)} at {self.rate / 1e12:g} TFLOP/s"]
        return StagePlan(name="calibration + supernet", device_bytes=device, host_bytes=host,
                         disk_bytes=disk, written_bytes=sum(s.written for s in self.supernets),
                         flops=sum(s.flops for s in self.supernets), notes=notes)

    def search(self) -> StagePlan:
        from tyr.compressor.fitness import POSITIONS_PER_CHUNK, evaluation_bytes, fitted_caches_mb
        from tyr.compressor.recipes import fitness_dtype

        search, config = self.recipe.search, self.config
        # The GPU's compute dtype, or what this machine's CPU computes the fitness in.
        cbytes = 2 if self.gpu else fitness_dtype(search.dtype, "cpu").itemsize
        positions = max(search.batch_sequences, POSITIONS_PER_CHUNK)
        logits = positions * config.vocab_size * (cbytes + 8)     # a chunk's logits, float32 copy, log-softmax
        evaluation = evaluation_bytes(config.vocab_size, config.hidden_size, search.batch_tokens,
                                      search.batch_sequences, cbytes, on_cpu=not self.gpu)
        head = 0 if cbytes == self.store_bytes and not self.gpu else self.sizes.head * cbytes
        targets = search.pool_size * min(search.kl_top_k, config.vocab_size) * 8
        # The caches fill up to their caps, or to all there is: every module's anchor states on the last stage's
        # batches, every candidate's weights in the compute dtype. Their caps shrink to fit the memory beside the
        # head and one evaluation (and, on the CPU, the process and the targets), as the run's do.
        modules = 2 * config.num_hidden_layers
        activations = modules * search.stage_batches()[-1] * search.batch_tokens * config.hidden_size * 4
        weights = max(sum(sum(1 - level for level in levels) for _, levels in s.ladders) / 2 for s in self.supernets)
        weights = weights * self.sizes.decoder * cbytes
        resident = head + evaluation + (0 if self.gpu else BASELINE_BYTES + self.parts_bytes + targets)
        caps = fitted_caches_mb(search.activation_cache_mb, search.weight_cache_mb,
                                self.device_memory if self.gpu else self.host_memory, resident)
        caches = min(caps[0] * 2 ** 20, activations) + min(caps[1] * 2 ** 20, weights)
        # The dense targets run all pool sequences through one module at a time (float32); the search then holds
        # the LM head in its compute dtype, its caches and one evaluation.
        dense_pass = search.pool_size * config.hidden_size * 4 + self.module_bytes + logits
        device = max(dense_pass, head + caches + evaluation)
        host = BASELINE_BYTES + self.parts_bytes + targets + (0 if self.gpu else device)
        capped = ([f"search caches capped at {caps[0]:.0f} + {caps[1]:.0f} MiB (recipe: {search.activation_cache_mb}"
                   f" + {search.weight_cache_mb}) to fit the {'device' if self.gpu else 'host memory'}"]
                  if caps != (search.activation_cache_mb, search.weight_cache_mb) else [])
        per_token = 2 * ((1 - self.sparsity) * self.sizes.decoder + self.sizes.head) + self._attention_flops(
            search.seq_len)
        scored = sum(self._scored_tokens(i) for i in range(self.recipe.iterations))
        dense = 2 * search.pool_size * (self.sizes.decoder + self.sizes.head)
        generations = [search.generations_of(i) for i in range(self.recipe.iterations)]
        written = sum(sum(1024 + 400 * g for g in range(1, n + 1)) + 4096 for n in generations)
        disk = self.supernets_on_disk
        return StagePlan(name="search", device_bytes=device, host_bytes=host, disk_bytes=disk,
                         written_bytes=written, flops=dense + scored * per_token,
                         notes=[f"dense top-{search.kl_top_k} targets {_gib(targets)} on the host; FLOPs without "
                                "the savings of activation reuse", *capped])

    def final(self) -> StagePlan:
        from tyr.models.io import SHARD_BYTES

        pruned = self.store_bytes * self.sizes.pruned     # written in the stored dtype
        output = pruned + self.tokenizer_bytes + 64 * 1024
        # Written a shard at a time: the shard being filled, plus the dense layer being sliced into it.
        layer = self.store_bytes * max(sum(layer_params(self.config, w)) for w in layer_widths(self.config))
        host = BASELINE_BYTES + min(pruned, SHARD_BYTES + max(self.largest_tensor, layer)) + layer
        return StagePlan(name="final build", device_bytes=0, host_bytes=host,
                         disk_bytes=max(s.disk for s in self.supernets) + output, written_bytes=output, flops=0.0,
                         notes=[f"the pruned model is written in {self.stored_name}, in shards of at most "
                                f"{_gib(SHARD_BYTES)}"])

    def evaluation(self) -> StagePlan:
        device = 4 * (self.sizes.total + self.sizes.pruned) + 3 * EVAL_BATCH * EVAL_SEQ * self.config.vocab_size * 4
        host = BASELINE_BYTES + (0 if self.gpu else device)
        flops = EVAL_TOKENS * (2 * (self.sizes.total + self.sizes.pruned) + 2 * self._attention_flops(EVAL_SEQ))
        return StagePlan(name="eval (perplexity + KL)", in_prune=False, device_bytes=device, host_bytes=host,
                         disk_bytes=0,
                         written_bytes=0, flops=flops,
                         notes=[f"`tyr eval` defaults: {EVAL_TOKENS:,} tokens, dense reference beside the pruned "
                                "model, both in float32"])

    @property
    def hidden_on_host(self) -> bool:
        """Where the builder keeps the hidden states (supernet.hidden_device; a GPU starts the build nearly empty)."""
        setting = self.recipe.memory.hidden_states
        if not self.gpu or setting == "device":
            return False
        return setting == "host" or self.hidden_bytes > self.device_memory // 2

    @property
    def largest_tensor(self) -> int:
        """Bytes of the largest stored tensor (the embedding, or an FFN projection): the most read at once."""
        c = self.config
        return self.store_bytes * max(c.vocab_size * c.hidden_size, c.intermediate_size * c.hidden_size)

    @property
    def stored_name(self) -> str:
        return str(self.store).removeprefix("torch.")

    # ----- the supernets -----

    @property
    def supernets_on_disk(self) -> int:
        """Most supernet bytes on disk at once: an iteration's and the best earlier one (the others are dropped)."""
        return max(s.disk + max((t.disk for t in self.supernets[:i]), default=0)
                   for i, s in enumerate(self.supernets))

    @property
    def checkpoint_bytes(self) -> int:
        return self.hidden_bytes + 256

    def _supernet(self, iteration: int) -> SimpleNamespace:
        """One iteration's supernet: ladders, bytes on disk, FLOPs, checkpoints and bytes written."""
        from tyr.compressor.search import grid_ticks, level_of
        from tyr.compressor.supernet import candidate_columns, module_file_bytes

        recipe, config, target = self.recipe, self.config, self.sparsity
        unit = recipe.initial_spacing / 2 ** (recipe.iterations - 1)
        step = 2 ** (recipe.iterations - 1 - iteration)
        half = None if iteration == 0 else recipe.ladder_size // 2
        levels = [level_of(target, unit, t) for t in grid_ticks(target, unit, step, 0, half)]
        rules = recipe.local_pruner.width_rules
        ladders = [("attn", levels), ("mlp", levels)]
        files = sum(module_file_bytes(kind, lv, config, rules, self.store) for kind, lv in ladders)
        kept = sum(sum(candidate_columns(kind, lv, config, rules)) // (config.head_dim if kind == "attn" else 1)
                   for kind, lv in ladders)
        manifest = config.num_hidden_layers * (kept * MANIFEST_BYTES_PER_INDEX + 2048) + 2048
        disk = config.num_hidden_layers * files + manifest
        flops = config.num_hidden_layers * sum(self._module_flops(kind, lv) for kind, lv in ladders)
        modules = 2 * config.num_hidden_layers
        memory = self.recipe.memory
        by_time = int(flops / self.rate // memory.checkpoint_seconds) if memory.checkpoint_seconds else modules
        by_share = (int(memory.checkpoint_share * config.num_hidden_layers * files // self.checkpoint_bytes)
                    if memory.checkpoint_share is not None else modules)
        checkpoints = min(modules - 1, by_time, by_share)
        written = disk + 1024 + checkpoints * (self.checkpoint_bytes + manifest)
        return SimpleNamespace(ladders=ladders, disk=disk, flops=flops, checkpoints=checkpoints, written=written)

    def _width(self, kind: str) -> int:
        c = self.config
        return c.num_attention_heads * c.head_dim if kind == "attn" else c.intermediate_size

    def _module_work(self, kind: str, levels: list[float]) -> int:
        """Device bytes one module's build adds: its Hessian, the solver's matrices, its candidates, and the
        activations (kept whole when they fit the calibration module's cache, else a chunk at a time)."""
        from tyr.compressor import calibration

        c, width = self.config, self._width(kind)
        solver = DTYPE_BYTES[self.recipe.local_pruner.solver_dtype]
        keep = sum(1 - s for s in levels)
        activations = self.tokens * width * 4
        chunk = calibration.sequence_chunks(self.recipe.calibration.num_sequences, self.recipe.calibration.seq_len,
                                            width)[0]
        chunk_bytes = (chunk.stop - chunk.start) * self.recipe.calibration.seq_len * width * 4
        cached = activations if activations <= calibration.CACHE_BYTES else 0
        return (width ** 2 * (4 + 4 * solver) + (keep + 3) * c.hidden_size * width * 4 + cached + 3 * chunk_bytes)

    def _module_flops(self, kind: str, levels: list[float]) -> float:
        """One module's build: its activations (twice when not cached), the Hessian, the propagation and the OBS
        solves (a Cholesky inverse and one refit per level)."""
        from tyr.compressor import calibration

        c, width, tokens = self.config, self._width(kind), self.tokens
        attn, mlp = layer_params(c, LayerWidth(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size))
        forward = 2 * tokens * (attn if kind == "attn" else mlp)
        if kind == "attn":
            forward += tokens * self._attention_flops(self.recipe.calibration.seq_len) / c.num_hidden_layers
        passes = 1 if tokens * width * 4 <= calibration.CACHE_BYTES else 2
        solves = (1 + len(levels)) * width ** 3 / 3
        if kind == "mlp":
            solves += width / self.recipe.local_pruner.channel_step * 2 * c.hidden_size * width
        return passes * forward + 2 * tokens * width ** 2 + 2 * tokens * width * c.hidden_size + solves

    def _attention_flops(self, seq_len: int) -> float:
        """Per token, all layers: causal scores and weighted values (half of a full T x T)."""
        c = self.config
        return c.num_hidden_layers * 2 * seq_len * c.num_attention_heads * c.head_dim

    def _scored_tokens(self, iteration: int) -> int:
        """Tokens the search forwards in one iteration: every stage's candidates on its tokens, every generation,
        the start and result on the pool, and the sensitivity scans."""
        search = self.recipe.search
        per_generation, candidates = 0, search.offspring
        for i, stage in enumerate(search.stages):
            last = i == len(search.stages) - 1
            per_generation += (candidates + (1 if last else 0)) * stage.tokens
            candidates = stage.survivors
        generations = search.generations_of(iteration)
        scans = 0
        if search.scan_levels:
            count = 1 + (generations // search.scan_every if search.scan_every else 0)
            moves = 2 * self.config.num_hidden_layers * 2 * search.scan_levels
            scans = count * (moves * search.scan_batches * search.batch_tokens + search.pool_size * 2)
        return generations * per_generation + 2 * search.pool_size + scans

    # ----- what makes it fit -----

    def advice(self, plan: RunPlan) -> list[str]:
        out = []
        if plan.device_memory is not None and plan.peak_device > plan.device_memory:
            out.append(f"does not fit the device: {_gib(plan.peak_device)} needed, {_gib(plan.device_memory)} given")
            out += self._device_advice(plan)
        if plan.host_memory is not None and plan.peak_host > plan.host_memory:
            out.append(f"does not fit host memory: {_gib(plan.peak_host)} needed, {_gib(plan.host_memory)} given")
            search = self.recipe.search
            targets = search.pool_size * min(search.kl_top_k, self.config.vocab_size) * 8
            if targets > plan.host_memory / 4:
                out.append(f"  search.pool_tokens or search.kl_top_k smaller: the dense targets take "
                           f"{_gib(targets)} of host memory")
        return out

    def _device_advice(self, plan: RunPlan) -> list[str]:
        """For each stage over the device budget, the setting that brings it within (when one does)."""
        budget, out = plan.device_memory, []
        stages = {s.name: s for s in plan.stages}
        supernet = stages["calibration + supernet"]
        if supernet.device_bytes > budget:
            spare = budget - (supernet.device_bytes - self.hidden_bytes)
            per_sequence = self.hidden_bytes // self.recipe.calibration.num_sequences
            if not self.hidden_on_host and spare >= 0:
                out.append(f"  memory.hidden_states: host keeps the {_gib(self.hidden_bytes)} of hidden states in host "
                           "memory and brings the supernet build within the device")
            if not self.hidden_on_host and spare >= per_sequence:
                out.append(f"  or fewer calibration tokens: calibration.num_sequences <= {spare // per_sequence} (of "
                           f"{self.recipe.calibration.num_sequences})")
            elif spare < 0 or self.hidden_on_host:
                out.append("  the supernet build's working set (one module's weights, Hessian, solver and "
                           "activations) exceeds the device even without hidden states")
        if stages["search"].device_bytes > budget:     # its caches already shrank to what fits
            out.append("  the search's LM head and one evaluation exceed the device even without caches: "
                       "search.seq_len or search.batch_sequences smaller, or a larger device")
        return out

    def evaluation_advice(self, plan: RunPlan) -> list[str]:
        evaluation = next(s for s in plan.stages if not s.in_prune)
        if plan.device_memory is None or evaluation.device_bytes <= plan.device_memory:
            return []
        return [f"note: `tyr eval` of the dense and pruned models in float32 needs {_gib(evaluation.device_bytes)} of "
                "device memory: run it with --device cpu"]


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2 ** 20:.1f} MiB"


def parse_bytes(text: str | None) -> int | None:
    """'80GB', '80GiB', '512MB' or a plain number of bytes (GB and GiB both mean 2^30 here, as GPUs are sold)."""
    if text is None:
        return None
    units = {"": 1, "B": 1, "K": 2 ** 10, "KB": 2 ** 10, "KIB": 2 ** 10, "M": 2 ** 20, "MB": 2 ** 20, "MIB": 2 ** 20,
             "G": GiB, "GB": GiB, "GIB": GiB, "T": 2 ** 40, "TB": 2 ** 40, "TIB": 2 ** 40}
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    try:
        result = float(number) * units[value[len(number):]]
    except (ValueError, KeyError):
        raise TyrError(f"cannot read the size {text!r}; write e.g. 80GB or 512MB") from None
    if not math.isfinite(result) or result <= 0:
        raise TyrError(f"a memory size must be positive, got {text!r}")
    return int(result)


def render(plan: RunPlan) -> str:
    """The human table: one row per stage, then the assumptions and what makes it fit."""
    head = (f"tyr plan: {plan.model}, recipe {plan.recipe}, sparsity {plan.sparsity:g}, weights {plan.weights_dtype},"
            f" {plan.total_params / 1e9:.2f}B parameters ({plan.decoder_params / 1e9:.2f}B in decoder layers); "
            + (f"a {_gib(plan.device_memory)} GPU" if plan.device_memory else "on the CPU")
            + (f", {_gib(plan.host_memory)} host memory" if plan.host_memory else ""))
    rows = [("stage", "device peak", "host peak", "disk peak", "written", "PFLOPs")]
    rows += [(s.name, _gib(s.device_bytes), _gib(s.host_bytes), _gib(s.disk_bytes), _gib(s.written_bytes),
              f"{s.flops / 1e15:.3g}") for s in plan.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                    enumerate(zip(row, widths))) for row in rows]
    lines += ["", *(f"- {s.name}: {note}" for s in plan.stages for note in s.notes)]
    lines += [f"- assumed: {plan.throughput_tflops:g} TFLOP/s sustained, {_gib(BASELINE_BYTES)} per process"]
    if plan.device_memory is None and plan.host_memory is None:
        lines += ["", "no memory budget given (--device-memory, --host-memory): nothing checked"]
    else:
        lines += ["", "fits." if plan.fits else "DOES NOT FIT", *plan.advice]
    return "\n".join(lines)

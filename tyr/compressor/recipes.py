"""Budgets of a Týr-the-Pruner run as validated recipes (YAML or JSON files; `paper`, `gpu` and `fast` ship).

A recipe fixes everything about *how much work* the compressor does: calibration tokens for the supernet,
iterations of the coarse-to-fine loop, generations and offspring of the evolutionary search, and the staged
selection (tokens scored per stage, survivors kept). The target sparsity, the model and the seed are not part of
a recipe: they come from the command line. Unknown fields are rejected so a typo never silently falls back to a
default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tyr.errors import TyrError
from tyr.models.facts import WidthRules

if TYPE_CHECKING:
    import torch

RECIPES_DIR = Path(__file__).with_name("recipes")
EEAMode = Literal["expectation", "current", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationRecipe(_Strict):
    """Token blocks the supernet's local pruner sees (Hessians, expectation error accumulation)."""

    num_sequences: int = Field(ge=1, le=1_000_000, description="calibration blocks drawn from the calibration text")
    seq_len: int = Field(ge=16, le=131_072, description="tokens per calibration block")
    batch_sequences: int = Field(4, ge=1, le=4096, description="blocks per forward batch when collecting calibration "
                                 "statistics with the full model (FLAP); the supernet builder chunks by memory")

    @property
    def tokens(self) -> int:
        return self.num_sequences * self.seq_len


class LocalPrunerRecipe(_Strict):
    """Settings of the local (layer-wise OBS) pruner that builds every candidate of the supernet; the supernet
    records them in its manifest."""

    damp: float = Field(0.01, gt=0, le=1, description="Hessian dampening, as a fraction of its mean diagonal")
    channel_step: int = Field(16, ge=1, le=4096, description="FFN channels removed per OBS step (a coarser path is "
                              "faster; widths are still exact)")
    refit: bool = Field(True, description="least-squares refit of the kept weights after the OBS path")
    solver_dtype: Literal["float32", "float64"] = Field("float32", description="precision of the OBS solver")
    tensor_parallel: int = Field(1, ge=1, le=64, description="every candidate is servable by vLLM with this "
                                 "tensor-parallel size: query heads divide by it, KV heads divide by it or divide "
                                 "it, FFN widths divide by it times ffn_multiple (or the block is removed); "
                                 "`tyr prune --tensor-parallel` sets it")
    ffn_multiple: int = Field(1, ge=1, le=4096, description="FFN widths are multiples of this on each "
                              "tensor-parallel device (64 keeps GPU matmul shapes tensor-core friendly; 1 = exact "
                              "widths)")

    @property
    def width_rules(self) -> WidthRules:
        return WidthRules(tensor_parallel=self.tensor_parallel, ffn_multiple=self.ffn_multiple)


class SelectionStage(_Strict):
    """One stage of the staged selection: score every remaining candidate on `tokens`, keep the best `survivors`."""

    tokens: int = Field(ge=16, le=100_000_000, description="selection tokens scored in this stage")
    survivors: int = Field(ge=1, le=100_000, description="candidates that go on to the next stage")


class SearchRecipe(_Strict):
    """The evolutionary search over per-module sparsity levels: the settings `run_search` takes."""

    generations: list[int] = Field(min_length=1, description="generations of evolution in each coarse-to-fine "
                                   "iteration (one entry per iteration, or one entry used for all)")
    offspring: int = Field(ge=1, le=100_000, description="offspring mutated from the parent each generation")
    max_shifts: int = Field(4, ge=1, le=64, description="a mutation applies min(U[1,n], U[1,n]) sparsity shifts "
                            "(each: one module one level down, another of the same kind one level up)")
    stages: list[SelectionStage] = Field(min_length=1, description="staged selection; tokens must grow and "
                                         "survivors shrink; the parent joins the last stage (elitism)")
    seq_len: int = Field(ge=16, le=131_072, description="tokens per selection sequence; every stage's tokens "
                         "are a whole number of sequences, and stage k's sequences are the first ones of stage k+1")
    pool_tokens: int | None = Field(None, ge=16, le=1_000_000_000, description="selection pool: the dense model's "
                                    "top-k log-probs are computed once on this many tokens, and every generation "
                                    "draws its stages' sequences from it at random (fresh tokens keep the search "
                                    "from overfitting a small fixed set); the start and the result of each "
                                    "iteration are scored on the whole pool. Default: the last stage's tokens")
    batch_sequences: int = Field(1, ge=1, le=4096, description="selection sequences per forward batch; must divide "
                                 "every stage's sequence count (results do not depend on the stage)")
    kl_top_k: int = Field(ge=1, le=1_000_000, description="the dense model's top-k next-token log-probs kept for "
                          "the sparse KL fitness: sum over top-k of p_i (log p_i - log q_i)")
    scan_levels: int = Field(0, ge=0, le=64, description="warm start (not in the paper; 0 = off): before evolving, "
                             "score every single-module move of the start up to this many levels either way, "
                             "combine the moves under the parameter budget by an additive model (a knapsack solved "
                             "exactly, with and without a penalty per level moved), and start from whichever of "
                             "the start and those combinations scores lowest on the pool")
    scan_tokens: int | None = Field(None, ge=16, le=100_000_000, description="selection tokens each move of the "
                                    "warm start's scan is scored on (default: the last stage's tokens)")
    scan_penalties: list[float] = Field([0.0, 0.5, 1.0], min_length=1, max_length=16, description="the warm "
                                        "start's knapsack is solved once per penalty per level moved (in units of "
                                        "the scan's median |change|; 0 = trust every scanned change)")
    scan_every: int = Field(0, ge=0, le=1_000_000, description="with scan_levels: scan again from the parent "
                            "every this many generations (0 = only the warm start)")
    fresh_final_stage: bool = Field(False, description="the parent meets the survivors on the last stage's new "
                                    "tokens only (those no earlier stage selected on): a survivor's luck on the "
                                    "tokens it was selected by then cannot carry it past a better parent")
    pool_rescore_every: int = Field(0, ge=0, le=1_000_000, description="not in the paper (0 = off): every this "
                                    "many generations, score the parent on the whole pool, and end the iteration "
                                    "at the lowest parent so scored (the start included) rather than the last one: "
                                    "selection on a few fresh tokens can accept lucky, slightly worse children")
    budget_tolerance: float = Field(0.0025, ge=0, le=0.1, description="the parameter budget is held in real "
                                    "parameters (candidates rounded to whole heads and channels): every distribution "
                                    "the search visits removes target ± this share of the decoder parameters")
    reuse_activations: bool = Field(True, description="restart an offspring's forward at its first mutated module "
                                    "from the parent's cached hidden states (same results, less compute)")
    activation_cache_mb: int = Field(1024, ge=0, le=10_000_000, description="memory cap of the parent's cached "
                                     "hidden states; above it only every k-th module boundary is kept")
    weight_cache_mb: int = Field(1024, ge=0, le=10_000_000, description="memory for supernet candidates kept "
                                 "loaded between evaluations (least recently used ones are dropped)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="precision of the fitness forward's matmuls (the residual stream and the KL stay in "
        "float32): auto = bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX), where it is faster "
        "and ranks candidates the same up to near-ties; float32 elsewhere")

    @model_validator(mode="after")
    def _stages_are_staged(self) -> "SearchRecipe":
        for i, stage in enumerate(self.stages):
            if stage.tokens % self.seq_len:
                raise ValueError(f"stages[{i}].tokens={stage.tokens} is not a whole number of selection sequences "
                                 f"of seq_len={self.seq_len}")
            if (stage.tokens // self.seq_len) % self.batch_sequences:
                raise ValueError(f"stages[{i}] has {stage.tokens // self.seq_len} sequences, not a multiple of "
                                 f"batch_sequences={self.batch_sequences}")
        for i, (a, b) in enumerate(zip(self.stages, self.stages[1:])):
            if b.tokens < a.tokens:
                raise ValueError(f"stages[{i + 1}].tokens={b.tokens} < stages[{i}].tokens={a.tokens}: "
                                 "later stages score the survivors on more tokens")
            if b.survivors > a.survivors:
                raise ValueError(f"stages[{i + 1}].survivors={b.survivors} > stages[{i}].survivors={a.survivors}")
        if any(not 0 <= penalty <= 100 for penalty in self.scan_penalties):
            raise ValueError(f"scan_penalties={self.scan_penalties} must lie in [0, 100]")
        pool = self.pool_size
        if self.scan_tokens is not None and (self.scan_tokens % (self.seq_len * self.batch_sequences)
                                             or self.scan_tokens > pool):
            raise ValueError(f"scan_tokens={self.scan_tokens} must be a whole number of batches of "
                             f"{self.batch_sequences} x {self.seq_len} tokens, within the pool's {pool}")
        if self.scan_every and not self.scan_levels:
            raise ValueError(f"scan_every={self.scan_every} repeats the scan, but scan_levels=0 turns it off")
        if self.fresh_final_stage and len(self.stages) > 1 and self.stages[-1].tokens <= self.stages[-2].tokens:
            raise ValueError("fresh_final_stage needs a last stage with more tokens than the one before it")
        if pool < self.stages[-1].tokens:
            raise ValueError(f"pool_tokens={pool} is smaller than the last stage's {self.stages[-1].tokens} tokens")
        if pool % (self.seq_len * self.batch_sequences):
            raise ValueError(f"pool_tokens={pool} is not a whole number of batches of {self.batch_sequences} "
                             f"sequences x {self.seq_len} tokens")
        if self.stages[0].survivors > self.offspring:
            raise ValueError(f"stages[0].survivors={self.stages[0].survivors} exceeds offspring={self.offspring}")
        return self

    @property
    def pool_size(self) -> int:
        """Tokens in the selection pool."""
        return self.pool_tokens if self.pool_tokens is not None else self.stages[-1].tokens

    @property
    def selection_sequences(self) -> int:
        """Sequences in the selection pool."""
        return self.pool_size // self.seq_len

    @property
    def pool_batches(self) -> int:
        """Selection batches in the pool; every generation draws its stages' batches from them."""
        return self.selection_sequences // self.batch_sequences

    @property
    def batch_tokens(self) -> int:
        return self.seq_len * self.batch_sequences

    @property
    def scan_batches(self) -> int:
        """Selection batches the warm start's scan scores each move on."""
        tokens = self.scan_tokens if self.scan_tokens is not None else self.stages[-1].tokens
        return tokens // self.batch_tokens

    def stage_batches(self) -> list[int]:
        return [s.tokens // self.batch_tokens for s in self.stages]

    def generations_of(self, iteration: int) -> int:
        return self.generations[min(iteration, len(self.generations) - 1)]


class MemoryRecipe(_Strict):
    """How a run uses memory and disk; none of it changes the result, so a run resumes under other values."""

    hidden_states: Literal["auto", "device", "host"] = Field(
        "auto", description="where the supernet builder keeps the calibration hidden states: on the compute device, "
        "or in host memory with one chunk at a time on the device (auto: the device while they take at most half "
        "of its free memory)")

    checkpoint_seconds: float = Field(300, ge=0, le=86_400, description="the supernet builder checkpoints its "
                                      "hidden states at most this often (0: after every module); a killed build "
                                      "redoes the modules since the last checkpoint")
    checkpoint_share: float | None = Field(0.5, gt=0, le=100, description="and only once the candidates written "
                                           "since the last checkpoint are at least 1/share times its size, so "
                                           "checkpoints add at most this share to a supernet's bytes written "
                                           "(None: time alone decides)")


class Recipe(_Strict):
    """A complete compressor budget. See recipes/paper.yaml, gpu.yaml and fast.yaml."""

    name: str = Field(min_length=1, max_length=64, description="recipe name, recorded in reports")
    description: str = Field("", max_length=2000, description="what the recipe is for")
    iterations: int = Field(ge=1, le=8, description="coarse-to-fine iterations: supernet, then search; the level "
                            "spacing halves every iteration")
    initial_spacing: float = Field(0.125, gt=0, le=0.5, description="sparsity spacing of the first iteration's "
                                   "ladder (every module: target + k * spacing within [0, 1])")
    ladder_size: int = Field(9, ge=3, le=65, description="candidates per module in later iterations: this many "
                             "levels at the new spacing centred on the module's current level, clipped to [0, 1]")
    eea: EEAMode = Field(
        "expectation", description="error accumulation while building the supernet: the next module's input is the "
        "(1 - level)-weighted mean of the candidates' outputs (expectation, the paper's EEA), the output of the "
        "module's current level (current), or the dense output (none)")
    calibration: CalibrationRecipe
    local_pruner: LocalPrunerRecipe = LocalPrunerRecipe()
    search: SearchRecipe
    keep_supernets: bool = Field(False, description="keep every iteration's supernet on disk (otherwise an "
                                 "iteration's supernet is deleted once the next iteration no longer needs it)")
    memory: MemoryRecipe = MemoryRecipe()

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if len(self.search.generations) not in (1, self.iterations):
            raise ValueError(f"search.generations has {len(self.search.generations)} entries; give one, or one per "
                             f"iteration ({self.iterations})")
        if self.ladder_size % 2 == 0:
            raise ValueError(f"ladder_size={self.ladder_size} must be odd (centred on the current level)")
        return self

    def spacing(self, iteration: int) -> float:
        return self.initial_spacing / 2 ** iteration

    def with_tensor_parallel(self, size: int) -> "Recipe":
        """This recipe with its candidates' widths servable at tensor-parallel ``size`` (`--tensor-parallel`)."""
        data = self.model_dump()
        data["local_pruner"]["tensor_parallel"] = size
        return _validated(data, f"--tensor-parallel {size}")


def fitness_dtype(setting: str, device: str | torch.device) -> torch.dtype:
    """The fitness forward's compute dtype for a recipe's ``search.dtype`` on ``device``."""
    import torch  # here, so reading a recipe (tyr --help, validation) does not load torch

    if setting != "auto":
        return getattr(torch, setting)
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(spec: str | Path | Recipe) -> Recipe:
    """A recipe by name ("paper", "gpu", "fast") or from a YAML/JSON file; raise TyrError naming every bad field."""
    if isinstance(spec, Recipe):
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        named = RECIPES_DIR / f"{spec}.yaml"
        if not named.is_file():
            raise TyrError(f"recipe {str(spec)!r} is neither a file nor one of {', '.join(available_recipes())}")
        path = named
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, yaml.YAMLError) as err:
        raise TyrError(f"cannot read recipe {path}: {err}") from err
    if not isinstance(data, dict):
        raise TyrError(f"recipe {path} must be a mapping of fields, got {type(data).__name__}")
    return _validated(data, f"recipe {path}")


def _validated(data: dict, source: str) -> Recipe:
    """A Recipe from ``data``; TyrError naming every bad field otherwise."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in err.errors())
        raise TyrError(f"{source} is invalid: {problems}") from err

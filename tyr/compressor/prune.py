"""`prune(...)`: the coarse-to-fine Týr-the-Pruner driver, and the baselines behind the same entry point.

Týr (method "tyr"), per iteration i of the recipe:
  1. ladders: iteration 0 gives every module the levels target + k · spacing within [0, 1] (the paper's 0, 12.5,
     ..., 100% at targets that are multiples of 12.5%); later iterations halve the spacing and give each module
     ``ladder_size`` levels centred on its current level, clipped to [0, 1];
  2. build the supernet for those ladders (local OBS pruning with expectation error accumulation; resumable);
  3. evolutionary search from the current distribution (the uniform one at first, moved into the real-parameter
     band: candidates are rounded to whole heads and channels), checkpointed every generation.
The best iteration's supernet (lowest KL on the selection pool) assembles the pruned model. Everything lands in
``work_dir`` (supernets, search checkpoints, per-iteration results), so rerunning the same command after a crash
continues where it stopped.

Under torchrun (tyr.compressor.distributed) every rank runs this driver on the same inputs: calibration chunks,
dense targets and offspring are shared out, so every rank reaches the same decisions; rank 0 alone writes.

Sparsity counts decoder-layer parameters (attention and MLP blocks with their norms); embeddings and the LM head
are excluded, as in the paper.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import BaseModel, Field

from tyr.atomic import (WriteCounter, atomic_save_tensors, atomic_write_json, check_output_path, count_written,
                        counting_writes, exclusive, publish_dir, tree_bytes)
from tyr.compressor import distributed
from tyr.compressor.layerwise import KINDS
from tyr.compressor.recipes import Recipe, fitness_dtype, load_recipe
from tyr.compressor.report import (REPORT_JSON, IterationReport, LayerReport, PruneReport, StageMeter,
                                   max_rss_mb, write_report)
from tyr.compressor.search import (GenerationRecord, ModuleLadder, SearchSpace, SharedFitness,
                                   grid_ticks, level_of, repair_budget, run_search, tick_of)
from tyr.errors import TyrError
from tyr.fingerprint import fingerprint
from tyr.models.facts import check_width_rules, layer_widths, module_params, total_params
from tyr.models.slicing import SlicedTensors
from tyr.models.streaming import StreamedModel
from tyr.compressor.latency import LatencyTable

if TYPE_CHECKING:
    from tyr.data import TextSource

log = logging.getLogger(__name__)

METHODS = ("tyr", "uniform", "magnitude", "flap")
# Methods that read a local dense model a module at a time instead of loading it (the baselines load it whole).
STREAMED_METHODS = ("tyr", "uniform")


@dataclass
class PruneResult:
    out_dir: Path
    report: PruneReport
    report_paths: dict[str, Path] = field(default_factory=dict)
    model: object | None = None          # the pruned TyrLlamaForCausalLM, when asked for


class LatencyBudget(BaseModel):
    """Hardware-aware search: the pruned model's predicted decode step (from a per-layer-shape latency table,
    `tyr bench layers`) must stay within ``max_ms``, on top of the parameter budget."""

    table: LatencyTable
    max_ms: float = Field(gt=0)

    def module_costs(self, record) -> tuple[float, ...]:
        """Predicted ms of each candidate of one supernet module, from its widths in the manifest."""
        block = self.table.attention if record.kind == "attn" else self.table.mlp
        return tuple(block(*width) for width in record.widths)


@dataclass
class PruneJob:
    """One run of `prune`: its inputs, checked, and the loaded dense model; every method reads what it needs here."""

    model: torch.nn.Module | StreamedModel  # the dense input: loaded (on ``device``, eval mode) or read from disk
    tokenizer: object
    model_name: str
    method: str
    sparsity: float
    recipe: Recipe
    text: TextSource
    out_dir: Path
    work_dir: Path
    seed: int
    device: str
    meter: StageMeter
    progress: bool = True
    on_generation: Callable[[int, GenerationRecord], None] | None = None
    latency: LatencyBudget | None = None
    supernet_cache: Path | None = None
    overwrite: bool = False
    calibration: torch.LongTensor | None = None   # drawn by draw_tokens() before anything is written
    selection: torch.LongTensor | None = None
    model_folder: Path | None = None   # the safetensors folder the model came from: supernets read weights there
    written: WriteCounter = field(default_factory=WriteCounter)

    @cached_property
    def model_digest(self) -> str:
        """SHA-256 of what the dense model computes: its config (names aside) and every weight's bytes."""
        from tyr.compressor.calibration import tensors_digest

        config = {k: v for k, v in self.model.config.to_dict().items()
                  if k not in ("_name_or_path", "transformers_version", "architectures", "auto_map")}
        state = self.model.state_dict()
        return fingerprint({"config": config, "weights": tensors_digest(state[name] for name in state)})

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the dense model runs in here: a loaded model's own; float32 for a streamed one, whose
        weights are cast a module at a time."""
        return torch.float32 if isinstance(self.model, StreamedModel) else next(self.model.parameters()).dtype

    def supernet_options(self) -> dict:
        """What every supernet build of this job shares: where it runs, and how it reads weights and uses disk."""
        return dict(device=self.device, progress=self.progress, dense_folder=self.model_folder,
                    memory=self.recipe.memory, block_sequences=self.recipe.calibration.batch_sequences)

    def draw_tokens(self) -> None:
        """Read and tokenize the text the method needs, so a bad text file fails before the work folder is claimed."""
        from tyr.compressor.calibration import calibration_ids

        if self.method == "magnitude":
            return
        calibration, search = self.recipe.calibration, self.recipe.search
        with self.meter.stage("calibration data"):
            self.calibration = calibration_ids(self.tokenizer, self.text, calibration.num_sequences,
                                               calibration.seq_len, self.seed, "calibration")
            if self.method == "tyr":
                self.selection = calibration_ids(self.tokenizer, self.text, search.selection_sequences,
                                                 search.seq_len, self.seed + 1, "selection")


@dataclass
class Pruned:
    """What a method returns: the pruned model (built, or for a streamed dense model its tensors, written a layer
    at a time) and what the report says about how it was made."""

    model: torch.nn.Module | None = None     # a TyrLlamaForCausalLM
    tensors: SlicedTensors | None = None
    levels: list[float] | None = None        # per module (layer 0 attn, layer 0 mlp, ...) when a supernet made it
    nominal: float | None = None             # the searched distribution's nominal sparsity
    iterations: list[IterationReport] = field(default_factory=list)
    calibration_tokens: int = 0
    selection_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def config(self):
        return self.model.config if self.model is not None else self.tensors.config


class IterationOutcome(BaseModel):
    """One finished coarse-to-fine iteration, as stored in work_dir/iter{i}/result.json (levels as grid ticks)."""

    ticks: list[int]
    choice: list[int]
    start_ticks: list[int]
    ladders: list[list[int]]
    report: IterationReport


def prune(model=None, sparsity: float = 0.5, recipe: str | Path | Recipe = "fast", out_dir: str | Path = "pruned",
          work_dir: str | Path | None = None, text: str | None = None, method: str = "tyr", seed: int = 0,
          device: str = "cpu", tokenizer=None, overwrite: bool = False, progress: bool = True,
          on_generation: Callable[[int, GenerationRecord], None] | None = None,
          keep_model: bool = False, latency: LatencyBudget | None = None,
          supernet_cache: str | Path | None = None) -> PruneResult:
    """Prune ``model`` (a folder, "default", a hub id or a loaded model with ``tokenizer``) to ``sparsity``.

    Writes the pruned model folder ``out_dir`` (tyr_llama format, with prune_report.json/.md/.png inside) and
    keeps resumable state in ``work_dir`` (default: ``<out_dir>.work``). ``on_generation(iteration, record)`` runs
    after every search generation's checkpoint (tests interrupt there). ``latency`` adds a latency budget to the
    search (method "tyr" only). ``supernet_cache``: a folder that keeps the first iteration's supernet by its
    inputs, so pruning one model to several sparsities on the same 12.5% grid builds it once (its owner deletes it).
    """
    from tyr.data import TextSource

    if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise TyrError(f"sparsity must be a fraction strictly between 0 and 1, got {sparsity}")
    if method not in METHODS:
        raise TyrError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if latency is not None and method != "tyr":
        raise TyrError(f"a latency budget needs the search (method 'tyr'), not {method!r}")
    recipe = load_recipe(recipe)
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    if out_dir.exists() and not overwrite:
        raise TyrError(f"{out_dir} already exists; choose another output folder or pass overwrite (--overwrite)")
    check_output_path(out_dir)
    check_output_path(work_dir)
    try:
        with _outputs_claimed(out_dir, work_dir), counting_writes() as written:
            started, meter = time.perf_counter(), StageMeter(device, folders=(work_dir, out_dir))
            with meter.stage("load model"):
                model, tokenizer, model_name, model_folder = _load(model, tokenizer, device,
                                                                   stream=method in STREAMED_METHODS)
            check_width_rules(layer_widths(model.config)[0], recipe.local_pruner.width_rules)
            job = PruneJob(model=model, tokenizer=tokenizer, model_name=model_name, method=method,
                           sparsity=float(sparsity), recipe=recipe, text=TextSource.parse(text), out_dir=out_dir,
                           work_dir=work_dir, seed=seed, device=device, meter=meter, progress=progress,
                           on_generation=on_generation, latency=latency,
                           supernet_cache=Path(supernet_cache) if supernet_cache is not None else None,
                           overwrite=overwrite, model_folder=model_folder, written=written)
            job.draw_tokens()
            return _run(job, started, keep_model)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TyrError(f"the disk is full ({err}); free space under {work_dir} / {out_dir.parent} and rerun the "
                           "same command to resume") from err
        raise


@contextlib.contextmanager
def _outputs_claimed(out_dir: Path, work_dir: Path) -> Iterator[None]:
    """Hold the locks of the output and work folders; under torchrun rank 0 holds them for all ranks."""
    if not distributed.is_main():
        yield
        return
    with exclusive(out_dir), exclusive(work_dir):
        yield


def _load(model, tokenizer, device: str, stream: bool):
    """(model, tokenizer, name, folder) from a folder, "default", a hub id, or an already loaded model and its
    tokenizer; folder: the local safetensors folder the weights came from (None for a loaded model). With
    ``stream``, the folder (a hub id's fetched into the hub cache) is not loaded but read a module at a time (a
    StreamedModel, in its stored dtype)."""
    from tyr.models.io import load_model, load_tokenizer, local_model_folder, resolve_model_path

    if model is None or isinstance(model, (str, Path)):
        name = str(model or "default")
        if stream:
            folder = local_model_folder(model)
            return StreamedModel(folder), load_tokenizer(folder), name, folder
        path = resolve_model_path(model)
        model, tokenizer = load_model(path, dtype=torch.float32, device=device)
        return model, tokenizer, name, Path(path) if Path(path).is_dir() else None
    if tokenizer is None:
        raise TyrError("a loaded model needs its tokenizer (pass tokenizer=...)")
    return (model.to(device).eval(), tokenizer, getattr(model.config, "_name_or_path", "") or "in-memory model",
            None)


def _run(job: PruneJob, started: float, keep_model: bool) -> PruneResult:
    if distributed.is_main():
        _claim_work_dir(job)
    distributed.barrier()      # the other ranks read the work folder once rank 0 has claimed (or cleared) it
    with torch.no_grad():
        pruned = _METHOD_RUNS[job.method](job)
        if distributed.world_size() > 1:
            pruned.notes.append(f"pruned by {distributed.world_size()} processes under torchrun "
                                f"({distributed.backend()})")
        if distributed.is_main():
            report, paths = _save(job, pruned, started)
        distributed.barrier()      # the folder is published before any rank returns
        if not distributed.is_main():
            report = PruneReport.model_validate_json((job.out_dir / REPORT_JSON).read_text(encoding="utf-8"))
            paths = {}
    if not job.recipe.keep_supernets:
        log.info("pruned model written to %s; work files stay in %s (delete them when done)", job.out_dir,
                 job.work_dir)
    model = pruned.model
    if keep_model and model is None:
        from tyr.models.io import load_model

        model = load_model(job.out_dir, dtype=pruned.tensors.dtype)[0]
    return PruneResult(out_dir=job.out_dir, report=report, report_paths=paths, model=model if keep_model else None)


# ----- the methods -----

def _calibration(job: PruneJob) -> torch.LongTensor:
    return job.calibration


def _prune_magnitude(job: PruneJob) -> Pruned:
    from tyr.compressor.baselines import magnitude_prune

    with job.meter.stage("magnitude pruning"):
        return Pruned(model=magnitude_prune(job.model, job.sparsity, job.recipe.local_pruner.width_rules))


def _prune_flap(job: PruneJob) -> Pruned:
    from tyr.compressor.baselines import flap_prune

    calibration = _calibration(job)
    with job.meter.stage("FLAP pruning"):
        model = flap_prune(job.model, calibration, job.sparsity, job.recipe.calibration.batch_sequences, job.progress,
                           job.recipe.local_pruner.width_rules)
    return Pruned(model=model, calibration_tokens=calibration.numel(),
                  notes=["FLAP: fluctuation metric with bias compensation, uniform per layer (no adaptive structure "
                         "search); q/k/v/gate/up carry zero biases because the format's bias flags are per block"])


def _prune_uniform(job: PruneJob) -> Pruned:
    """Týr without search: a one-level supernet (every module at the target) assembled as it is."""
    from tyr.compressor.supernet import Supernet, build_supernet

    calibration = _calibration(job)
    levels = [job.sparsity] * len(_module_list(job.model))
    supernet_dir = job.work_dir / "uniform" / "supernet"
    with job.meter.stage("uniform: supernet"):
        build_supernet(job.model, calibration, supernet_dir, ladders=[[level] for level in levels],
                       eea=job.recipe.eea, current_levels=levels, settings=job.recipe.local_pruner,
                       **job.supernet_options())
    with job.meter.stage("assemble"):
        chosen = _assembled(job, Supernet.open(supernet_dir, cache_size=0), [0] * len(levels))
    return Pruned(**chosen, levels=levels, calibration_tokens=calibration.numel())


def _prune_tyr(job: PruneJob) -> Pruned:
    calibration = _calibration(job)
    selection = job.selection
    pruned = _CoarseToFine(job, calibration, selection).run()
    pruned.calibration_tokens, pruned.selection_tokens = calibration.numel(), selection.numel()
    if job.latency is not None:
        table = job.latency.table
        pruned.notes.append(f"latency budget {job.latency.max_ms:.3f} ms per decode step ({table.method}, "
                            f"{table.device_name}); predicted for the output: "
                            f"{table.predict_latency(layer_widths(pruned.config)):.3f} ms, dense "
                            f"{table.predict_latency(layer_widths(job.model.config)):.3f} ms")
    return pruned


_METHOD_RUNS: dict[str, Callable[[PruneJob], Pruned]] = {
    "tyr": _prune_tyr, "uniform": _prune_uniform, "magnitude": _prune_magnitude, "flap": _prune_flap}


# ----- Týr: supernet and search, coarse to fine -----

class _CoarseToFine:
    """The iterations of a Týr run: each builds a supernet around the best distribution so far and searches it.

    Levels are integer ticks on the finest grid of the run (``unit``); iteration i's ladders step by
    2^(iterations - 1 - i) ticks. Every iteration's result is stored (work_dir/iter{i}/result.json), so a rerun
    skips finished iterations.
    """

    def __init__(self, job: PruneJob, calibration: torch.LongTensor, selection: torch.LongTensor):
        self.job, self.recipe = job, job.recipe
        self.calibration, self.selection = calibration, selection
        self.modules = _module_list(job.model)
        self.unit = self.recipe.initial_spacing / 2 ** (self.recipe.iterations - 1)
        self.targets = None                  # the dense model's top-k log-probs, computed once when first needed

    def run(self) -> Pruned:
        ticks = [0] * len(self.modules)      # the uniform distribution: every module at the target
        outcomes: list[IterationOutcome] = []
        supernet_dirs: list[Path] = []
        best = 0
        for iteration in range(self.recipe.iterations):
            ladders = self.ladders(iteration, ticks)
            supernet_dirs.append(self.supernet_dir(iteration, ladders))
            outcomes.append(self.finished(iteration)
                            or self.iteration(iteration, ladders, ticks, supernet_dirs[-1]))
            # Every iteration's fitness is measured on the same selection tokens, so results compare across
            # supernets: the next iteration starts from the best distribution so far, and the best one is the output.
            if outcomes[-1].report.fitness < outcomes[best].report.fitness:
                best = iteration
            ticks = outcomes[best].ticks
            if not self.recipe.keep_supernets:
                self.drop_supernets(supernet_dirs, best)
        chosen = outcomes[best]
        assembled = self.assemble(supernet_dirs[best], chosen)
        for outcome in outcomes:
            outcome.report.selected = outcome.report.iteration == best
        dense_params = [p for _, _, p in self.modules]
        nominal = (self.job.sparsity
                   + self.unit * sum(p * t for p, t in zip(dense_params, chosen.ticks)) / sum(dense_params))
        return Pruned(**assembled, levels=[self.level(t) for t in chosen.ticks], nominal=nominal,
                      iterations=[o.report for o in outcomes])

    def level(self, tick: int) -> float:
        return level_of(self.job.sparsity, self.unit, tick)

    def step(self, iteration: int) -> int:
        return 2 ** (self.recipe.iterations - 1 - iteration)

    def ladders(self, iteration: int, ticks: list[int]) -> list[list[int]]:
        """Iteration 0: every level of the grid; later: ``ladder_size`` levels around each module's current one."""
        target, step = self.job.sparsity, self.step(iteration)
        if iteration == 0:
            return [list(grid_ticks(target, self.unit, step, 0, None)) for _ in self.modules]
        return [list(grid_ticks(target, self.unit, step, t, self.recipe.ladder_size // 2)) for t in ticks]

    def supernet_dir(self, iteration: int, ladders: list[list[int]]) -> Path:
        if iteration == 0 and self.job.supernet_cache is not None:
            return self.job.supernet_cache / _first_supernet_key(self.job, self.calibration,
                                                                 [[self.level(t) for t in ladder] for ladder in ladders])
        return self.job.work_dir / f"iter{iteration}" / "supernet"

    def finished(self, iteration: int) -> IterationOutcome | None:
        path = self.job.work_dir / f"iter{iteration}" / "result.json"
        if not path.is_file():
            return None
        outcome = IterationOutcome.model_validate_json(path.read_text(encoding="utf-8"))
        log.info("iteration %d: done in an earlier run (KL %.4f)", iteration, outcome.report.fitness)
        return outcome

    def iteration(self, iteration: int, ladders: list[list[int]], ticks: list[int],
                  supernet_dir: Path) -> IterationOutcome:
        meter, search = self.job.meter, self.recipe.search
        started = time.perf_counter()
        with meter.stage(f"iteration {iteration}: supernet"):
            manifest = self.build(supernet_dir, ladders, ticks)
        supernet_seconds = time.perf_counter() - started
        space = _space(manifest, self.modules, self.job.sparsity, self.unit, self.step(iteration),
                       search.budget_tolerance, self.job.latency)
        start, repair = repair_budget(space, space.choice_at(ticks))
        if repair is not None:
            log.info("iteration %d: the start removes %.3f%% of the decoder parameters; %d level moves bring it to "
                     "%.3f%%", iteration, 100 * repair.before, len(repair.moves), 100 * repair.after)
        if self.targets is None:
            with meter.stage("dense targets"):
                self.targets = _dense_targets(self.job, self.selection)
        started = time.perf_counter()
        with meter.stage(f"iteration {iteration}: search"):
            # In a function, so the fitness and its caches are freed before the next supernet is built.
            result, stats = _search(self.job, supernet_dir, space, start, self.targets, iteration)
        report = IterationReport(
            iteration=iteration, spacing=self.recipe.spacing(iteration), generations=len(result.history),
            start_fitness=result.start_fitness, fitness=result.fitness, history=result.history,
            supernet_seconds=supernet_seconds, search_seconds=time.perf_counter() - started,
            resumed_from_generation=result.resumed_from, module_evaluations=stats.module_evaluations,
            module_evaluations_without_reuse=stats.module_evaluations_without_reuse,
            activation_reuse_saving=stats.saving, fitness_seconds=stats.seconds, fitness_dtype=stats.compute_dtype,
            warm_start=result.warm_start, rescans=result.rescans, pool_scores=result.pool_scores,
            start_sparsity=space.achieved_sparsity(start), budget_repair=repair,
            achieved_sparsity=space.achieved_sparsity(result.choice))
        outcome = IterationOutcome(ticks=space.ticks_of(result.choice), choice=result.choice, start_ticks=list(ticks),
                                   ladders=ladders, report=report)
        if distributed.is_main():
            atomic_write_json(self.job.work_dir / f"iter{iteration}" / "result.json",
                              outcome.model_dump(mode="json"))
        return outcome

    def build(self, directory: Path, ladders: list[list[int]], current: list[int]):
        from tyr.compressor.supernet import build_supernet

        job = self.job
        return build_supernet(job.model, self.calibration, directory,
                              ladders=[[self.level(t) for t in ladder] for ladder in ladders], eea=self.recipe.eea,
                              current_levels=[self.level(t) for t in current], settings=self.recipe.local_pruner,
                              **job.supernet_options())

    def drop_supernets(self, supernet_dirs: list[Path], best: int) -> None:
        """Delete the supernets no later iteration needs (a shared cached one belongs to the cache's owner)."""
        if not distributed.is_main():
            return
        for j, directory in enumerate(supernet_dirs):
            if j != best and directory.exists() and directory.is_relative_to(self.job.work_dir):
                shutil.rmtree(directory, ignore_errors=True)

    def assemble(self, directory: Path, chosen: IterationOutcome) -> dict:
        from tyr.compressor.supernet import MANIFEST, Supernet

        with self.job.meter.stage("assemble"):
            if not (directory / MANIFEST).is_file():   # removed by hand: rebuild it (deterministic)
                self.build(directory, chosen.ladders, chosen.start_ticks)
            return _assembled(self.job, Supernet.open(directory, cache_size=0), chosen.choice)


def _assembled(job: PruneJob, supernet, choice: list[int]) -> dict:
    """Pruned's model fields for a choice: the model built from a loaded dense model, or a streamed dense model's
    pruned tensors (written a layer at a time by _save)."""
    if isinstance(job.model, StreamedModel):
        return {"tensors": supernet.pruned_tensors(job.model, choice)}
    return {"model": supernet.assemble(job.model, choice)}


def _search(job: PruneJob, supernet_dir: Path, space: SearchSpace, start: tuple[int, ...], targets, iteration: int):
    from tyr.compressor.fitness import SupernetKL
    from tyr.compressor.layerwise import DenseParts
    from tyr.compressor.supernet import Supernet

    settings, device = job.recipe.search, torch.device(job.device)
    supernet = Supernet.open(supernet_dir, cache_size=0)     # the fitness keeps its own cache, capped in bytes
    parts, compute_dtype = DenseParts.from_model(job.model), fitness_dtype(settings.dtype, device)
    activation_mb, weight_mb = _search_caches_mb(settings, parts, compute_dtype, device)
    fitness = SupernetKL(parts, supernet.weights, [m.kind for m in space.modules], targets,
                         settings.batch_sequences, reuse_activations=settings.reuse_activations,
                         activation_cache_mb=activation_mb, weight_cache_mb=weight_mb,
                         cached_batches=settings.stage_batches()[-1], device=device,
                         dtype=job.dtype, compute_dtype=compute_dtype)
    on_generation = job.on_generation
    callback = (lambda record: on_generation(iteration, record)) if on_generation else None
    result = run_search(space, SharedFitness(fitness), settings, start,
                        seed=iteration_seed(job.seed, iteration), iteration=iteration,
                        checkpoint=job.work_dir / f"iter{iteration}" / "search.json", on_generation=callback,
                        progress=job.progress, description=f"search {iteration + 1}/{job.recipe.iterations}")
    return result, fitness.stats.across_ranks()


def _search_caches_mb(settings, parts, compute_dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """The recipe's search cache caps, scaled down where they would not fit the device's free memory beside the
    LM head and one evaluation (fitness.fitted_caches_mb)."""
    from tyr.compressor.fitness import evaluation_bytes, fitted_caches_mb
    from tyr.device import free_memory

    vocab, hidden = parts.lm_head.shape
    resident = vocab * hidden * compute_dtype.itemsize + evaluation_bytes(
        vocab, hidden, settings.batch_tokens, settings.batch_sequences, compute_dtype.itemsize,
        on_cpu=device.type == "cpu")
    caches = fitted_caches_mb(settings.activation_cache_mb, settings.weight_cache_mb, free_memory(device), resident)
    if caches != (settings.activation_cache_mb, settings.weight_cache_mb):
        log.info("search caches capped at %.0f + %.0f MiB (recipe: %d + %d) to fit %s's free memory", *caches,
                 settings.activation_cache_mb, settings.weight_cache_mb, device)
    return caches


def iteration_seed(seed: int, iteration: int) -> int:
    """The search seed of one iteration, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


def _first_supernet_key(job: PruneJob, calibration, levels: list[list[float]]) -> str:
    """A name for the first iteration's supernet that depends only on what builds it (its levels, not the target).

    The supernet's own fingerprint still checks model weights and every input when the folder is reused."""
    from tyr.compressor.calibration import ids_digest

    recipe, model = job.recipe, job.model
    current = [round(job.sparsity, 9)] * len(levels) if recipe.eea == "current" else None
    parts = {"model": job.model_digest, "layers": [list(w) for w in layer_widths(model.config)],
             "ids": ids_digest(calibration), "levels": [[round(level, 9) for level in ladder] for ladder in levels],
             "eea": recipe.eea, "current": current, "settings": recipe.local_pruner.model_dump()}
    return "iter0-" + fingerprint(parts, 16)


def _dense_targets(job: PruneJob, selection: torch.LongTensor):
    """The dense model's top-k on the selection tokens. With a supernet cache they are kept there too: the
    sparsities of one run draw the same selection tokens, so only the first computes them."""
    from safetensors.torch import load_file

    from tyr.compressor.calibration import ids_digest
    from tyr.compressor.fitness import SelectionTargets, dense_targets

    search = job.recipe.search
    path = None
    if job.supernet_cache is not None:
        key = fingerprint({"model": job.model_digest, "ids": ids_digest(selection), "top_k": search.kl_top_k,
                           "dtype": str(job.dtype), "device": torch.device(job.device).type}, 16)
        path = job.supernet_cache / f"targets-{key}.safetensors"
        if path.is_file():
            log.info("dense targets: reusing %s", path)
            return SelectionTargets(**load_file(path))
    targets = dense_targets(job.model, selection, search.kl_top_k, search.batch_sequences, progress=job.progress,
                            device=job.device, dtype=job.dtype)
    if path is not None and distributed.is_main():
        atomic_save_tensors(vars(targets), path)
    return targets


def _space(manifest, modules, target: float, unit: float, step: int, tolerance: float,
           latency: LatencyBudget | None = None) -> SearchSpace:
    """The search space of a supernet: every module's ladder as ticks, its candidates' real parameters (from the
    manifest) and a band of ``tolerance`` · the decoder parameters around the target."""
    ladders = []
    for (layer, kind, params), candidates in zip(modules, manifest.modules, strict=True):
        if (candidates.layer, candidates.kind) != (layer, kind):
            raise TyrError(f"supernet module order differs: expected layers.{layer}.{kind}, found "
                           f"layers.{candidates.layer}.{candidates.kind}")
        ticks = tuple(tick_of(target, unit, level) for level in candidates.levels)
        ladders.append(ModuleLadder(f"layers.{layer}.{kind}", layer, kind, params, ticks))
    params = [tuple(record.params) for record in manifest.modules]
    band = tolerance * sum(ladder.dense_params for ladder in ladders)
    if latency is None:
        return SearchSpace(target=target, unit=unit, step=step, modules=ladders, params=params, tolerance=band)
    costs = [latency.module_costs(record) for record in manifest.modules]
    return SearchSpace(target=target, unit=unit, step=step, modules=ladders, params=params, tolerance=band,
                       costs=costs, max_cost=latency.max_ms - latency.table.lm_head_ms)


# ----- shared helpers -----

def _module_list(model) -> list[tuple[int, str, int]]:
    """(layer, kind, dense parameters) of every prunable module, in supernet order."""
    return [(i, kind, params) for i, pair in enumerate(module_params(model)) for kind, params in zip(KINDS, pair)]


def _claim_work_dir(job: PruneJob) -> None:
    """Record what this work directory is for. Its work is reused only when made from the same contents (model
    weights, the tokens drawn from the text, settings); work from other inputs is discarded with overwrite, else
    refused."""
    from tyr.compressor.calibration import ids_digest

    identity = dict(method=job.method, weights=job.model_digest, sparsity=job.sparsity, seed=job.seed,
                    recipe=job.recipe.model_dump(exclude={"memory"}) if job.method in ("tyr", "uniform", "flap")
                    else None,
                    calibration=ids_digest(job.calibration) if job.calibration is not None else None,
                    selection=ids_digest(job.selection) if job.selection is not None else None)
    if job.latency is not None:
        identity["latency"] = job.latency.model_dump(mode="json")
    path = job.work_dir / "run.json"
    digest = fingerprint(identity, 16)
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
        if stored.get("digest") == digest:
            return
        if not job.overwrite:
            raise TyrError(f"work directory {job.work_dir} holds a different run (model weights, sparsity, recipe, "
                           "method, seed or calibration text differ); pass --overwrite to discard it, another "
                           "--work-dir, or delete it")
        log.warning("discarding the earlier work in %s: it was made from different inputs (model weights, sparsity, "
                    "recipe, method, seed or calibration text)", job.work_dir)
        shutil.rmtree(job.work_dir)
    atomic_write_json(path, {"digest": digest, "model": job.model_name, "text": job.text.describe(), **identity})


def _report(job: PruneJob, pruned: Pruned, written: StreamedModel) -> PruneReport:
    """The report of a pruned model, counted from the folder it was written to."""
    dense_modules, pruned_modules = module_params(job.model), module_params(written)
    levels = pruned.levels
    layers = []
    for i, ((da, dm), (pa, pm), (h, kv, ffn)) in enumerate(zip(dense_modules, pruned_modules,
                                                               layer_widths(written.config))):
        layers.append(LayerReport(layer=i, heads=h, kv_heads=kv, ffn=ffn, attn_params=pa, mlp_params=pm,
                                  attn_sparsity=1 - pa / da if da else 0.0, mlp_sparsity=1 - pm / dm if dm else 0.0,
                                  attn_level=levels[2 * i] if levels else None,
                                  mlp_level=levels[2 * i + 1] if levels else None))
    dense_decoder = sum(a + m for a, m in dense_modules)
    pruned_decoder = sum(a + m for a, m in pruned_modules)
    return PruneReport(
        method=job.method, model=job.model_name, out_dir=str(job.out_dir), target_sparsity=job.sparsity,
        achieved_sparsity=1 - pruned_decoder / dense_decoder, nominal_sparsity=pruned.nominal,
        budget_tolerance=job.recipe.search.budget_tolerance if job.method == "tyr" else None,
        dense_decoder_params=dense_decoder, pruned_decoder_params=pruned_decoder,
        dense_total_params=total_params(job.model), pruned_total_params=total_params(written),
        recipe=job.recipe.model_dump() if job.method != "magnitude" else None, seed=job.seed, device=str(job.device),
        text_source=job.text.describe(), calibration_tokens=pruned.calibration_tokens,
        selection_tokens=pruned.selection_tokens, layers=layers, iterations=pruned.iterations, notes=pruned.notes)


def _save(job: PruneJob, pruned: Pruned, started: float) -> tuple[PruneReport, dict[str, Path]]:
    """Write the model into work_dir/final, report on it there, then move it to out_dir in one rename."""
    from tyr.models.io import save_model, save_sliced

    staging, out_dir = job.work_dir / "final", job.out_dir
    with job.meter.stage("write model"):
        if pruned.model is not None:
            save_model(pruned.model, job.tokenizer, staging, overwrite=True)
        else:
            save_sliced(pruned.tensors, job.tokenizer, staging, job.model.generation_config, overwrite=True)
    report = _report(job, pruned, StreamedModel(staging))
    count_written(tree_bytes(staging))
    report.stages = list(job.meter.stages)
    report.bytes_written = job.written.bytes
    report.peak_disk_mb = max(max((s.peak_disk_mb or 0 for s in report.stages), default=0),
                              (tree_bytes(job.work_dir) + tree_bytes(job.out_dir)) / 2 ** 20)
    report.wall_seconds = time.perf_counter() - started
    report.peak_rss_mb = max_rss_mb()
    if torch.cuda.is_available() and str(report.device).startswith("cuda"):
        report.peak_gpu_mb = max(s.peak_gpu_mb or 0 for s in job.meter.stages)
    paths = write_report(report, staging)
    publish_dir(staging, out_dir)
    return report, {k: out_dir / p.name for k, p in paths.items()}

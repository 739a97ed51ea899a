"""`prune(...)`: the coarse-to-fine Týr-the-Pruner driver, and the baselines behind the same entry point.

Týr (method "tyr"), per iteration i of the recipe:
  1. ladders: iteration 0 gives every module the levels target + k · spacing within [0, 1] (the paper's 0, 12.5,
     ..., 100% at targets that are multiples of 12.5%); later iterations halve the spacing and give each module
     ``ladder_size`` levels centred on its current level, clipped to [0, 1];
  2. build the supernet for those ladders (local OBS pruning with expectation error accumulation; resumable);
  3. evolutionary search from the current distribution (the uniform one at first), checkpointed every generation.
The last iteration's supernet assembles the pruned model. Everything lands in ``work_dir`` (supernets, search
checkpoints, per-iteration results), so rerunning the same command after a crash continues where it stopped.

Sparsity counts decoder-layer parameters (attention and MLP blocks with their norms); embeddings and the LM head
are excluded, as in the paper.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.compressor.recipes import Recipe, fitness_dtype, load_recipe
from tyr.compressor.report import (IterationReport, LayerReport, PruneReport, StageMeter, max_rss_mb,
                                   write_report)
from tyr.compressor.search import (GenerationRecord, ModuleLadder, SearchResult, SearchSettings, SearchSpace,
                                   SharedFitness, Stage, grid_ticks, level_of, run_search, tick_of)
from tyr.errors import TyrError
from tyr.compressor.latency import LatencyTable

log = logging.getLogger(__name__)

METHODS = ("tyr", "uniform", "magnitude", "flap")
KINDS = ("attn", "mlp")


@dataclass
class PruneResult:
    out_dir: Path
    report: PruneReport
    report_paths: dict[str, Path] = field(default_factory=dict)
    model: object | None = None          # the pruned TyrLlamaForCausalLM, when asked for


class LatencyBudget(BaseModel):
    """Hardware-aware search: the pruned model's predicted decode step (from a per-layer-shape latency table,
    `tyr bench layers`) must stay within ``max_ms``, on top of the exact parameter budget."""

    table: LatencyTable
    max_ms: float = Field(gt=0)

    def module_costs(self, record) -> tuple[float, ...]:
        """Predicted ms of each candidate of one supernet module, from its widths in the manifest."""
        block = self.table.attention if record.kind == "attn" else self.table.mlp
        return tuple(block(*width) for width in record.widths)


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
    try:
        return _prune(model, float(sparsity), recipe, out_dir, work_dir, text, method, seed, device, tokenizer,
                      progress, on_generation, keep_model, latency, supernet_cache)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TyrError(f"the disk is full ({err}); free space under {work_dir} / {out_dir.parent} and rerun the "
                           "same command to resume") from err
        raise


def _prune(model, sparsity, recipe, out_dir, work_dir, text, method, seed, device, tokenizer, progress,
           on_generation, keep_model, latency, supernet_cache) -> PruneResult:
    from tyr.data import TextSource
    from tyr.models.io import load_model

    started = time.perf_counter()
    meter = StageMeter(device)
    with meter.stage("load model"):
        if model is None or isinstance(model, (str, Path)):
            model_name = str(model or "default")
            model, tokenizer = load_model(model, dtype=torch.float32, device=device)
        else:
            if tokenizer is None:
                raise TyrError("a loaded model needs its tokenizer (pass tokenizer=...)")
            model_name = getattr(model.config, "_name_or_path", "") or "in-memory model"
            model = model.to(device).eval()
    source = TextSource.parse(text)
    identity = dict(method=method, model=model_name, sparsity=sparsity, seed=seed, text=source.model_dump(),
                    recipe=recipe.model_dump() if method in ("tyr", "uniform", "flap") else None,
                    layers=[list(w) for w in _layer_widths(model)])
    if latency is not None:
        identity["latency"] = latency.model_dump(mode="json")
    _claim_work_dir(work_dir, identity)
    notes: list[str] = []
    calibration_tokens = selection_tokens = 0
    iterations: list[IterationReport] = []
    levels: list[float] | None = None
    nominal = None
    with torch.no_grad():
        if method == "magnitude":
            from tyr.compressor.baselines import magnitude_prune

            with meter.stage("magnitude pruning"):
                pruned = magnitude_prune(model, sparsity)
        else:
            with meter.stage("calibration data"):
                calibration = _blocks(tokenizer, source, recipe.calibration.seq_len, recipe.calibration.num_sequences,
                                      seed, "calibration")
            calibration_tokens = calibration.numel()
            if method == "flap":
                from tyr.compressor.baselines import flap_prune

                with meter.stage("FLAP pruning"):
                    pruned = flap_prune(model, calibration, sparsity, recipe.calibration.batch_sequences, progress)
                notes.append("FLAP: fluctuation metric with bias compensation, uniform per layer (no adaptive "
                             "structure search); q/k/v/gate/up carry zero biases because the format's bias flags "
                             "are per block")
            elif method == "uniform":
                pruned, levels = _prune_uniform(model, calibration, sparsity, recipe, work_dir, device, meter, progress)
            else:
                selection = _blocks(tokenizer, source, recipe.search.seq_len, recipe.search.selection_sequences,
                                    seed + 1, "selection")
                selection_tokens = selection.numel()
                pruned, levels, iterations, nominal = _prune_tyr(model, calibration, selection, sparsity, recipe,
                                                                 work_dir, seed, device, meter, progress,
                                                                 on_generation, latency, supernet_cache)
                if latency is not None:
                    notes.append(f"latency budget {latency.max_ms:.3f} ms per decode step ({latency.table.method}, "
                                 f"{latency.table.device_name}); predicted for the output: "
                                 f"{latency.table.predict_latency(_layer_widths(pruned)):.3f} ms, dense "
                                 f"{latency.table.predict_latency(_layer_widths(model)):.3f} ms")
        report = _report(model, pruned, model_name, out_dir, method, sparsity, recipe, seed, device, source,
                         calibration_tokens, selection_tokens, levels, nominal, iterations, notes)
        paths = _save(pruned, tokenizer, out_dir, work_dir, report, meter, started)
    if not recipe.keep_supernets:
        log.info("pruned model written to %s; work files stay in %s (delete them when done)", out_dir, work_dir)
    return PruneResult(out_dir=out_dir, report=report, report_paths=paths, model=pruned if keep_model else None)


# ----- Týr -----

def _prune_tyr(model, calibration, selection, target, recipe: Recipe, work_dir: Path, seed: int, device: str,
               meter: StageMeter, progress: bool, on_generation, latency: LatencyBudget | None = None,
               supernet_cache: Path | None = None):
    from tyr.compressor.fitness import dense_targets
    from tyr.compressor.supernet import Supernet

    modules = _module_list(model)
    dense_params = [p for _, _, p in modules]
    unit = recipe.initial_spacing / 2 ** (recipe.iterations - 1)
    ticks = [0] * len(modules)                 # the uniform distribution: every module at the target
    targets = None
    outcomes: list[IterationOutcome] = []
    supernet_dirs: list[Path] = []
    best = 0
    for iteration in range(recipe.iterations):
        step = 2 ** (recipe.iterations - 1 - iteration)
        if iteration == 0:
            ladders = [list(grid_ticks(target, unit, step, 0, None)) for _ in modules]
        else:
            ladders = [list(grid_ticks(target, unit, step, t, recipe.ladder_size // 2)) for t in ticks]
        iteration_dir = work_dir / f"iter{iteration}"
        supernet_dir = iteration_dir / "supernet"
        if iteration == 0 and supernet_cache is not None:
            supernet_dir = Path(supernet_cache) / _first_supernet_key(model, calibration, target, unit, ladders, recipe)
        supernet_dirs.append(supernet_dir)
        result_path = iteration_dir / "result.json"
        if result_path.is_file():
            outcome = IterationOutcome.model_validate_json(result_path.read_text(encoding="utf-8"))
            log.info("iteration %d: done in an earlier run (KL %.4f)", iteration, outcome.report.fitness)
        else:
            stage_started = time.perf_counter()
            with meter.stage(f"iteration {iteration}: supernet"):
                manifest = _build(model, calibration, supernet_dir, target, unit, ladders, ticks, recipe, device,
                                  progress)
            supernet_seconds = time.perf_counter() - stage_started
            space = _space(manifest, modules, dense_params, target, unit, step, latency)
            if targets is None:
                with meter.stage("dense targets"):
                    targets = dense_targets(model, selection, recipe.search.kl_top_k, recipe.search.batch_sequences,
                                            progress=progress)
            stage_started = time.perf_counter()
            with meter.stage(f"iteration {iteration}: search"):
                # In a function, so the fitness and its caches are freed before the next supernet is built.
                result, stats = _search(model, supernet_dir, space, ticks, targets, recipe, iteration, seed, device,
                                        iteration_dir, on_generation, progress)
            outcome = _outcome(iteration, recipe, space, result, stats, supernet_seconds,
                               time.perf_counter() - stage_started, ticks, ladders)
            atomic_write_json(result_path, outcome.model_dump(mode="json"))
        outcomes.append(outcome)
        # Every iteration's fitness is measured on the same selection tokens, so results compare across supernets:
        # the next iteration starts from the best distribution so far, and the best one is the output.
        if outcome.report.fitness < outcomes[best].report.fitness:
            best = iteration
        ticks = outcomes[best].ticks
        if not recipe.keep_supernets:
            for j, directory in enumerate(supernet_dirs):
                # A shared first supernet (supernet_cache) belongs to the cache's owner.
                if j != best and directory.exists() and directory.is_relative_to(work_dir):
                    shutil.rmtree(directory, ignore_errors=True)
    chosen = outcomes[best]
    with meter.stage("assemble"):
        if not (supernet_dirs[best] / "manifest.json").is_file():   # removed by hand: rebuild it (deterministic)
            _build(model, calibration, supernet_dirs[best], target, unit, chosen.ladders, chosen.start_ticks, recipe,
                   device, progress)
        pruned = Supernet.open(supernet_dirs[best]).assemble(model, chosen.choice)
    for outcome in outcomes:
        outcome.report.selected = outcome.report.iteration == best
    levels = [level_of(target, unit, t) for t in chosen.ticks]
    nominal = target + unit * sum(p * t for p, t in zip(dense_params, chosen.ticks)) / sum(dense_params)
    return pruned, levels, [o.report for o in outcomes], nominal


def _search(model, supernet_dir: Path, space: SearchSpace, ticks: list[int], targets, recipe: Recipe, iteration: int,
            seed: int, device: str, iteration_dir: Path, on_generation, progress: bool):
    from tyr.compressor.fitness import SupernetKL
    from tyr.compressor.layerwise import DenseParts
    from tyr.compressor.supernet import Supernet

    supernet = Supernet.open(supernet_dir)
    fitness = SupernetKL(DenseParts.from_model(model), supernet.weights, [m.kind for m in space.modules], targets,
                         recipe.search.batch_sequences, reuse_activations=recipe.search.reuse_activations,
                         activation_cache_mb=recipe.search.activation_cache_mb,
                         weight_cache_mb=recipe.search.weight_cache_mb,
                         cached_batches=recipe.search.stage_batches()[-1], device=device,
                         dtype=next(model.parameters()).dtype,
                         compute_dtype=fitness_dtype(recipe.search.dtype, device))
    settings = search_settings(recipe, iteration, seed)
    callback = (lambda record: on_generation(iteration, record)) if on_generation else None
    result = run_search(space, SharedFitness(fitness), settings, space.choice_at(ticks),
                        checkpoint=iteration_dir / "search.json", on_generation=callback, progress=progress,
                        description=f"search {iteration + 1}/{recipe.iterations}")
    return result, fitness.stats


def _first_supernet_key(model, calibration, target: float, unit: float, ladders: list[list[int]],
                        recipe: Recipe) -> str:
    """A name for the first iteration's supernet that depends only on what builds it (its levels, not the target).

    The supernet's own fingerprint still checks model weights and every input when the folder is reused."""
    from tyr.compressor.calibration import ids_digest

    levels = [[round(level_of(target, unit, t), 9) for t in ladder] for ladder in ladders]
    current = [round(target, 9)] * len(ladders) if recipe.eea == "current" else None
    parts = {"model": getattr(model.config, "_name_or_path", ""), "layers": [list(w) for w in _layer_widths(model)],
             "ids": ids_digest(calibration), "levels": levels, "eea": recipe.eea, "current": current,
             "settings": recipe.local_pruner.model_dump()}
    return "iter0-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def search_settings(recipe: Recipe, iteration: int, seed: int) -> SearchSettings:
    """The search settings of one iteration (its seed derives from the run's seed and the iteration)."""
    search = recipe.search
    return SearchSettings(generations=search.generations_of(iteration), offspring=search.offspring,
                          max_shifts=search.max_shifts,
                          stages=[Stage(b, s.survivors, s.tokens) for b, s in zip(search.stage_batches(), search.stages)],
                          pool_batches=search.selection_sequences // search.batch_sequences,
                          seed=int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0]),
                          scan_levels=search.scan_levels, scan_batches=search.scan_batches,
                          scan_tokens=search.scan_batches * search.batch_sequences * search.seq_len,
                          scan_penalties=tuple(search.scan_penalties), fresh_final=search.fresh_final_stage,
                          rescore_every=search.pool_rescore_every, scan_every=search.scan_every)


def _build(model, calibration, directory: Path, target: float, unit: float, ladders: list[list[int]],
           current: list[int], recipe: Recipe, device: str, progress: bool):
    from tyr.compressor.supernet import build_supernet

    return build_supernet(model, calibration, directory,
                          ladders=[[level_of(target, unit, t) for t in ladder] for ladder in ladders],
                          eea=recipe.eea, current_levels=[level_of(target, unit, t) for t in current],
                          settings=_local_settings(recipe), device=device, progress=progress)


def _prune_uniform(model, calibration, target, recipe: Recipe, work_dir: Path, device: str, meter: StageMeter,
                   progress: bool):
    """Týr without search: a one-level supernet (every module at the target) assembled as it is."""
    from tyr.compressor.supernet import Supernet, build_supernet

    modules = _module_list(model)
    supernet_dir = work_dir / "uniform" / "supernet"
    with meter.stage("uniform: supernet"):
        build_supernet(model, calibration, supernet_dir, ladders=[[target]] * len(modules), eea=recipe.eea,
                       current_levels=[target] * len(modules), settings=_local_settings(recipe), device=device,
                       progress=progress)
    with meter.stage("assemble"):
        pruned = Supernet.open(supernet_dir).assemble(model, [0] * len(modules))
    return pruned, [target] * len(modules)


def _local_settings(recipe: Recipe):
    from tyr.compressor.supernet import LocalPruneSettings

    return LocalPruneSettings(**recipe.local_pruner.model_dump())


def _space(manifest, modules, dense_params, target, unit, step, latency: LatencyBudget | None = None) -> SearchSpace:
    ladders = []
    for (layer, kind, params), candidates in zip(modules, manifest.modules, strict=True):
        if (candidates.layer, candidates.kind) != (layer, kind):
            raise TyrError(f"supernet module order differs: expected layers.{layer}.{kind}, found "
                           f"layers.{candidates.layer}.{candidates.kind}")
        ticks = tuple(tick_of(target, unit, level) for level in candidates.levels)
        ladders.append(ModuleLadder(f"layers.{layer}.{kind}", layer, kind, params, ticks))
    if latency is None:
        return SearchSpace(target=target, unit=unit, step=step, modules=ladders)
    costs = [latency.module_costs(record) for record in manifest.modules]
    return SearchSpace(target=target, unit=unit, step=step, modules=ladders, costs=costs,
                       max_cost=latency.max_ms - latency.table.lm_head_ms)


def _outcome(iteration: int, recipe: Recipe, space: SearchSpace, result: SearchResult, stats, supernet_seconds: float,
             search_seconds: float, start_ticks: list[int], ladders: list[list[int]]) -> IterationOutcome:
    report = IterationReport(
        iteration=iteration, spacing=recipe.spacing(iteration), generations=len(result.history),
        start_fitness=result.start_fitness, fitness=result.fitness, history=result.history,
        supernet_seconds=supernet_seconds, search_seconds=search_seconds, resumed_from_generation=result.resumed_from,
        module_evaluations=stats.module_evaluations,
        module_evaluations_without_reuse=stats.module_evaluations_without_reuse,
        activation_reuse_saving=stats.saving, fitness_seconds=stats.seconds, fitness_dtype=stats.compute_dtype,
        warm_start=result.warm_start, rescans=result.rescans, pool_scores=result.pool_scores)
    return IterationOutcome(ticks=space.ticks_of(result.choice), choice=result.choice, start_ticks=list(start_ticks),
                            ladders=ladders, report=report)


# ----- shared helpers -----

def _layer_widths(model) -> list[tuple[int, int, int]]:
    from tyr.models.slicing import layer_widths

    if getattr(model.config, "per_layer_config", None) is None:
        c = model.config
        return [(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)] * c.num_hidden_layers
    return [(w.num_attention_heads, w.num_key_value_heads, w.intermediate_size) for w in layer_widths(model.config)]


def _module_params(model) -> list[tuple[int, int]]:
    """(attention, MLP) parameters of every decoder layer, norms included, as the modules hold them."""
    out = []
    for layer in model.model.layers:
        attn = sum(p.numel() for m in (layer.self_attn, layer.input_layernorm) if m is not None for p in m.parameters())
        mlp = sum(p.numel() for m in (layer.mlp, layer.post_attention_layernorm) if m is not None for p in m.parameters())
        out.append((attn, mlp))
    return out


def _module_list(model) -> list[tuple[int, str, int]]:
    """(layer, kind, dense parameters) of every prunable module, in supernet order."""
    return [(i, kind, params) for i, pair in enumerate(_module_params(model)) for kind, params in zip(KINDS, pair)]


def _blocks(tokenizer, source, seq_len: int, num_blocks: int, seed: int, purpose: str) -> torch.LongTensor:
    from tyr.data import load_text, token_blocks

    documents = load_text(source, split="calibration")
    try:
        return token_blocks(tokenizer, documents, seq_len, num_blocks, seed)
    except ValueError as err:
        raise TyrError(f"{purpose} text ({source.describe()}): {err}") from err


def _claim_work_dir(work_dir: Path, identity: dict) -> None:
    """Record what this work directory is for; refuse to mix two different runs in one."""
    path = work_dir / "run.json"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
        if stored.get("digest") != digest:
            raise TyrError(f"work directory {work_dir} holds a different run (model, sparsity, recipe, method, seed "
                           "or text differ); pass another --work-dir or delete it")
        return
    atomic_write_json(path, {"digest": digest, **identity})


def _report(dense, pruned, model_name, out_dir, method, target, recipe, seed, device, source, calibration_tokens,
            selection_tokens, levels, nominal, iterations, notes) -> PruneReport:
    from tyr.evaluation.run import count_parameters

    dense_modules, pruned_modules = _module_params(dense), _module_params(pruned)
    widths = _layer_widths(pruned)
    layers = []
    for i, ((da, dm), (pa, pm), (h, kv, ffn)) in enumerate(zip(dense_modules, pruned_modules, widths)):
        layers.append(LayerReport(layer=i, heads=h, kv_heads=kv, ffn=ffn, attn_params=pa, mlp_params=pm,
                                  attn_sparsity=1 - pa / da if da else 0.0, mlp_sparsity=1 - pm / dm if dm else 0.0,
                                  attn_level=levels[2 * i] if levels else None,
                                  mlp_level=levels[2 * i + 1] if levels else None))
    dense_decoder = sum(a + m for a, m in dense_modules)
    pruned_decoder = sum(a + m for a, m in pruned_modules)
    return PruneReport(
        method=method, model=model_name, out_dir=str(out_dir), target_sparsity=target,
        achieved_sparsity=1 - pruned_decoder / dense_decoder, nominal_sparsity=nominal,
        dense_decoder_params=dense_decoder, pruned_decoder_params=pruned_decoder,
        dense_total_params=count_parameters(dense).total, pruned_total_params=count_parameters(pruned).total,
        recipe=recipe.model_dump() if method != "magnitude" else None, seed=seed, device=str(device),
        text_source=source.describe(), calibration_tokens=calibration_tokens, selection_tokens=selection_tokens,
        layers=layers, iterations=iterations, notes=notes)


def _save(pruned, tokenizer, out_dir: Path, work_dir: Path, report: PruneReport, meter: StageMeter,
          started: float) -> dict[str, Path]:
    """Save model + report into work_dir/final, then move it to out_dir in one rename."""
    from tyr.models.io import save_model

    staging = work_dir / "final"
    save_model(pruned, tokenizer, staging, overwrite=True)
    report.stages = list(meter.stages)
    report.wall_seconds = time.perf_counter() - started
    report.peak_rss_mb = max_rss_mb()
    if torch.cuda.is_available() and str(report.device).startswith("cuda"):
        report.peak_gpu_mb = max(s.peak_gpu_mb or 0 for s in meter.stages)
    paths = write_report(report, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, out_dir)
    except OSError:
        shutil.move(str(staging), str(out_dir))
    return {k: out_dir / p.name for k, p in paths.items()}

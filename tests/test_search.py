"""The evolutionary search: budgets, staged selection, improvement, resume, activation reuse, recipes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tyr.compressor.fitness import SupernetKL, dense_targets, sparse_kl
from tyr.compressor.layerwise import DenseParts, module_weights
from tyr.compressor.recipes import Recipe, SearchRecipe, SelectionStage, fitness_dtype, load_recipe
from tyr.compressor.search import (ModuleLadder, SearchSpace, SharedFitness, additive_optimum, grid_ticks,
                                   make_offspring, mutate, repair_budget, run_search, scan_variants,
                                   staged_selection)
from tyr.errors import TyrError
from tyr.testing import tiny_llama


def search_settings(generations: int, stages: list[tuple[int, int]], pool_batches: int, seq_len: int = 16,
                    **fields) -> SearchRecipe:
    """A recipe's search section on a pool of one-sequence batches; ``stages``: (batches, survivors) per stage."""
    return SearchRecipe(generations=[generations], seq_len=seq_len, kl_top_k=1, pool_tokens=pool_batches * seq_len,
                        stages=[SelectionStage(tokens=b * seq_len, survivors=n) for b, n in stages], **fields)


def stage(tokens: int, survivors: int) -> SelectionStage:
    return SelectionStage(tokens=tokens, survivors=survivors)


def paper_like_space(layers: int = 6, target: float = 0.5, unit: float = 1 / 64, step: int = 8) -> SearchSpace:
    """Attention and MLP modules of different sizes on the first iteration's 12.5% ladder."""
    modules = []
    for layer in range(layers):
        for kind, params in (("attn", 1000), ("mlp", 3000)):
            ticks = grid_ticks(target, unit, step, 0, None)
            modules.append(ModuleLadder(f"layers.{layer}.{kind}", layer, kind, params, ticks))
    return SearchSpace(target=target, unit=unit, step=step, modules=modules)


class QuadraticFitness:
    """A synthetic fitness with a known optimum: Σ weight_m · level_m² (early layers 'sensitive')."""

    def __init__(self, space: SearchSpace):
        self.space = space
        self.weights = [1.0 / (1 + m.layer) for m in space.modules]
        self.calls: list[tuple[int, int]] = []

    def set_parent(self, choice):
        pass

    def evaluate(self, choices, batches):
        self.calls.append((len(choices), len(batches)))
        return [sum(w * lvl ** 2 for w, lvl in zip(self.weights, self.space.levels(c))) for c in choices]


def resume_after(generation: int, space, make_fitness, settings, seed: int, start, checkpoint: Path):
    """Run the search until ``generation`` is checkpointed, interrupt it there, and return the resumed result."""

    class Interrupt(Exception):
        pass

    def stop(record):
        if record.generation == generation:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_search(space, make_fitness(), settings, start, seed=seed, checkpoint=checkpoint, on_generation=stop,
                   progress=False)
    return run_search(space, make_fitness(), settings, start, seed=seed, checkpoint=checkpoint, progress=False)


def test_grid_ladders():
    assert grid_ticks(0.5, 1 / 64, 8, 0, None) == tuple(range(-32, 33, 8))          # 0 .. 1 in 12.5% steps
    assert grid_ticks(0.5, 1 / 64, 4, -8, 4) == tuple(range(-24, 9, 4))             # 9 levels at 6.25% around 37.5%
    assert grid_ticks(0.5, 1 / 64, 4, 28, 4) == (12, 16, 20, 24, 28, 32)            # clipped at 100%
    space = SearchSpace(target=0.3, unit=1 / 16, step=2,
                        modules=[ModuleLadder("m", 0, "mlp", 10, grid_ticks(0.3, 1 / 16, 2, 0, None))])
    levels = [space.level(0, c) for c in range(len(space.modules[0].ticks))]
    assert min(levels) >= 0 and max(levels) <= 1 and any(abs(x - 0.3) < 1e-12 for x in levels)


def test_mutations_keep_the_budget_exact_and_pair_same_kind_modules():
    space = paper_like_space()
    rng = np.random.Generator(np.random.PCG64(0))
    parent = space.choice_at([0] * len(space))
    dense = space.dense_params()
    for _ in range(300):
        child = mutate(parent, space, rng, max_shifts=4)
        assert space.budget_offset(child) == 0
        removed = sum(m.dense_params * lvl for m, lvl in zip(space.modules, space.levels(child)))
        assert removed == pytest.approx(0.5 * dense, rel=1e-12)
        for kind in ("attn", "mlp"):   # each kind keeps its own budget: shifts pair modules of equal size
            ticks = [t for m, t in zip(space.modules, space.ticks_of(child)) if m.kind == kind]
            assert sum(ticks) == 0
        parent = child if rng.random() < 0.5 else parent    # wander, reaching the ladder ends
    assert max(space.ticks_of(parent)) <= 32 and min(space.ticks_of(parent)) >= -32


def test_offspring_are_distinct_and_differ_from_the_parent():
    space = paper_like_space()
    rng = np.random.Generator(np.random.PCG64(1))
    parent = space.choice_at([0] * len(space))
    children = make_offspring(parent, space, rng, 40, max_shifts=4)
    assert len(children) == 40 and len(set(children)) == 40 and parent not in children
    # A two-module space has exactly one neighbour per direction: the search cannot invent more.
    tiny = SearchSpace(0.5, 1 / 8, 1, [ModuleLadder("a", 0, "mlp", 5, (-1, 0, 1)), ModuleLadder("b", 1, "mlp", 5, (-1, 0, 1))])
    assert sorted(make_offspring(tiny.choice_at([0, 0]), tiny, rng, 10, 1)) == [(0, 2), (2, 0)]


def test_staged_selection_keeps_the_right_survivors():
    calls = []

    def evaluate(choices, batches):
        calls.append((list(choices), list(batches)))
        # Stage 1 (1 batch) ranks by the first element, later stages by the second.
        return [float(c[0]) if len(batches) == 1 else float(c[1]) for c in choices]

    offspring = [(5, 9), (1, 7), (3, 2), (2, 8), (4, 1), (0, 6)]
    parent = (9, 3)
    stages = [(stage(64, 4), [3]), (stage(128, 2), [3, 0]), (stage(256, 1), [3, 0, 2, 1])]
    survivors, fitness, parent_fitness, records = staged_selection(offspring, parent, stages, evaluate)
    assert calls[0] == (offspring, [3])
    assert sorted(calls[1][0]) == [(0, 6), (1, 7), (2, 8), (3, 2)]          # best 4 by the first element
    assert calls[1][1] == [3, 0]
    assert sorted(calls[2][0]) == [(0, 6), (3, 2), (9, 3)]                  # best 2 by the second + the parent
    assert survivors == [(3, 2)] and fitness == [2.0] and parent_fitness == 3.0
    assert [r.candidates for r in records] == [6, 4, 3] and [r.survivors for r in records] == [4, 2, 1]
    # Elitism: when no offspring beats the parent on the last stage, the parent survives.
    survivors, _, _, _ = staged_selection([(0, 9), (1, 9)], (9, 0), [(stage(64, 2), [0]), (stage(128, 1), [0, 1])],
                                          evaluate)
    assert survivors == [(9, 0)]


def test_fresh_final_stage_judges_the_parent_on_tokens_no_survivor_was_selected_by():
    # Offspring (0, 5) is lucky on batch 0, where stage 1 picked it; on the new batch 1 the parent is better.
    def evaluate(choices, batches):
        return [sum(c[b] for b in batches) / len(batches) for c in choices]

    stages = [(stage(64, 1), [0]), (stage(128, 1), [0, 1])]
    biased, _, _, _ = staged_selection([(0, 5), (3, 3)], (3, 2), stages, evaluate)
    fresh, scores, parent_score, records = staged_selection([(0, 5), (3, 3)], (3, 2), stages, evaluate,
                                                            fresh_final=True)
    assert biased == [(0, 5)] and fresh == [(3, 2)] and scores == [2.0] and parent_score == 2.0
    assert [r.tokens for r in records] == [64, 64]                   # the last stage scored only its new batch
    with pytest.raises(ValueError, match="more tokens"):
        search_settings(1, [(2, 1), (2, 1)], pool_batches=2, offspring=2, max_shifts=1, fresh_final_stage=True)


def test_search_improves_a_synthetic_fitness_within_budget(tmp_path):
    space = paper_like_space()
    fitness = QuadraticFitness(space)
    start = space.choice_at([0] * len(space))
    settings = search_settings(30, [(1, 4), (2, 1)], pool_batches=4, offspring=12, max_shifts=4)
    seed = 0
    result = run_search(space, fitness, settings, start, seed=seed, checkpoint=tmp_path / "search.json",
                        progress=False)
    # The continuous optimum (levels ∝ 1 + layer) is 0.70 x the uniform start; the 12.5% grid gets close to it.
    assert result.fitness < 0.75 * result.start_fitness
    assert space.budget_offset(result.choice) == 0
    assert all(h.fitness <= h.parent_fitness for h in result.history)        # elitism: never worse
    # The optimum moves sparsity to late (insensitive) layers.
    levels = result.levels
    assert np.mean(levels[-4:]) > np.mean(levels[:4])
    # The start on the whole pool, then offspring on stage 1, survivors + parent on stage 2, ...
    assert fitness.calls[:3] == [(1, 4), (12, 1), (5, 2)] and fitness.calls[-1] == (1, 4)
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["complete"] and saved["generations_done"] == 30


def test_latency_budget_keeps_every_visited_distribution_within_it():
    """Latency convex in the width kept: moving sparsity between modules costs time, so the budget binds."""
    free = paper_like_space()
    costs = [tuple((4.0 if mod.kind == "attn" else 1.0) * (1 - free.level(m, c)) ** 2 for c in range(len(mod.ticks)))
             for m, mod in enumerate(free.modules)]
    start = free.choice_at([0] * len(free))
    budget = 1.1 * sum(costs[m][c] for m, c in enumerate(start))
    space = SearchSpace(target=free.target, unit=free.unit, step=free.step, modules=free.modules, costs=costs,
                        max_cost=budget)
    rng = np.random.default_rng(0)
    unconstrained = make_offspring(start, free, rng, 40, 4)
    assert any(space.cost(c) > budget for c in unconstrained)           # the budget binds on this space
    constrained = make_offspring(start, space, np.random.default_rng(0), 40, 4)
    assert constrained and all(space.cost(c) <= budget + 1e-9 for c in constrained)
    settings = search_settings(20, [(1, 4), (2, 1)], pool_batches=4, offspring=12, max_shifts=4)
    seed = 0
    result = run_search(space, QuadraticFitness(space), settings, start, seed=seed, progress=False)
    assert space.cost(result.choice) <= budget + 1e-9 and space.budget_offset(result.choice) == 0
    assert result.fitness < result.start_fitness
    tight = SearchSpace(target=free.target, unit=free.unit, step=free.step, modules=free.modules, costs=costs,
                        max_cost=budget / 2)
    with pytest.raises(TyrError, match="exceeds the budget"):
        run_search(tight, QuadraticFitness(tight), settings, start, seed=seed, progress=False)


def rounded_space(seed: int, target: float, layers: int = 8, tolerance: float = 0.005) -> SearchSpace:
    """``paper_like_space`` whose candidates' real parameters are their nominal ones rounded to coarse, uneven
    steps (whole heads and channels), each module with its own rounding offset."""
    nominal = paper_like_space(layers=layers, target=target)
    rng = np.random.default_rng(seed)
    params = []
    for m, module in enumerate(nominal.modules):
        grain, offset = (130 if module.kind == "attn" else 47), int(rng.integers(0, 40))
        kept = [module.dense_params * (1 - nominal.level(m, c)) for c in range(len(module.ticks))]
        params.append(tuple(min(module.dense_params, max(0, grain * round((k + offset) / grain))) for k in kept))
    return SearchSpace(target=target, unit=nominal.unit, step=nominal.step, modules=nominal.modules, params=params,
                       tolerance=tolerance * nominal.dense_params())


class RecordingFitness(QuadraticFitness):
    """Remembers the choices scored on each number of batches (in the test below, 3 batches: the scan's probes)."""

    def __init__(self, space: SearchSpace):
        super().__init__(space)
        self.seen: dict[int, set[tuple[int, ...]]] = {}

    def evaluate(self, choices, batches):
        self.seen.setdefault(len(batches), set()).update(choices)
        return super().evaluate(choices, batches)


@pytest.mark.parametrize("seed", range(5))
def test_every_distribution_the_search_visits_stays_in_the_real_parameter_band(seed):
    space = rounded_space(seed, target=(0.5, 0.25, 0.375, 0.625, 0.5)[seed])
    uniform = space.choice_at([0] * len(space))
    start, repair = repair_budget(space, uniform)
    assert space.in_budget(start) and abs(space.budget_gap(start)) <= space.tolerance
    if repair is not None:
        assert not space.in_budget(uniform) and repair.moves and repair.after == space.achieved_sparsity(start)
        assert repair_budget(space, uniform)[0] == start                        # deterministic
    settings = search_settings(12, [(1, 3), (2, 1)], pool_batches=4, offspring=8, max_shifts=4, scan_levels=1,
                               scan_tokens=3 * 16, scan_every=5, pool_rescore_every=4)
    fitness = RecordingFitness(space)
    parents = []
    result = run_search(space, fitness, settings, start, seed=seed, progress=False,
                        on_generation=lambda record: parents.append(record.fitness))
    assert len(parents) == 12 and result.fitness <= result.start_fitness
    # Offspring (stage 1: one batch), survivors and parents (stage 2: two), the start, the warm start's proposals
    # and rescored parents (the pool: four); the scan's single-module probes (three batches) are scored, not visited.
    assert set(fitness.seen) == {1, 2, 3, 4}
    visited = fitness.seen[1] | fitness.seen[2] | fitness.seen[4]
    assert len(visited) > 20 and all(space.in_budget(choice) for choice in visited)
    assert abs(space.achieved_sparsity(result.choice) - space.target) <= space.tolerance / space.dense_params()
    assert any(not space.in_budget(probe) for probe in fitness.seen[3])     # the band did bind


def test_budget_repair_moves_the_start_into_the_band_or_says_why_it_cannot():
    space = rounded_space(0, target=0.25)
    uniform = space.choice_at([0] * len(space))
    assert not space.in_budget(uniform)             # rounding alone misses the band: the search could not start
    with pytest.raises(TyrError, match="real sparsity"):
        run_search(space, QuadraticFitness(space), search_settings(1, [(1, 1)], pool_batches=1, offspring=2), uniform,
                   seed=0, progress=False)
    start, repair = repair_budget(space, uniform)
    assert space.in_budget(start) and len(repair.moves) == sum(a != b for a, b in zip(start, uniform)) <= 4
    coarse = SearchSpace(target=0.5, unit=0.25, step=1, modules=[ModuleLadder("a", 0, "mlp", 1000, (-2, -1, 0, 1, 2))],
                         params=[(1000, 1000, 400, 400, 0)], tolerance=50)
    with pytest.raises(TyrError, match="budget_tolerance"):
        repair_budget(coarse, coarse.choice_at([0]))


def test_search_resume_is_bit_identical_synthetic(tmp_path):
    space = paper_like_space()
    start = space.choice_at([0] * len(space))
    settings = search_settings(8, [(1, 2), (2, 1)], pool_batches=3, offspring=6, max_shifts=4)
    seed = 3
    straight = run_search(space, QuadraticFitness(space), settings, start, seed=seed, progress=False)

    resumed = resume_after(3, space, lambda: QuadraticFitness(space), settings, seed, start, tmp_path / "c.json")
    assert resumed.resumed_from == 3
    assert resumed.choice == straight.choice and resumed.fitness == straight.fitness
    assert [h.model_dump(exclude={"seconds"}) for h in resumed.history] == \
           [h.model_dump(exclude={"seconds"}) for h in straight.history]
    with pytest.raises(TyrError, match="different search"):
        run_search(space, QuadraticFitness(space), settings, start, seed=4, checkpoint=tmp_path / "c.json",
                   progress=False)


def test_additive_optimum_is_the_exact_budgeted_knapsack():
    space = paper_like_space(layers=3)
    start = space.choice_at([0, 8, 0, -8, 0, 0])        # not uniform: moves are relative to the start
    rng = np.random.Generator(np.random.PCG64(5))
    variants = scan_variants(space, start, levels=2)
    assert len(variants) == 6 * 4 and all(abs(space.modules[m].ticks[c] - space.modules[m].ticks[start[m]]) <= 16
                                          for m, c in variants)
    change = {v: float(rng.normal()) for v in variants}
    best = additive_optimum(space, start, change)
    assert space.budget_offset(best) == 0
    # Brute force: every combination of the scanned moves that keeps each kind's tick sum.
    options = [[start[m]] + [c for mm, c in variants if mm == m] for m in range(len(space))]
    feasible = [ch for ch in itertools.product(*options)
                if all(sum(space.modules[m].ticks[ch[m]] - space.modules[m].ticks[start[m]] for m in g) == 0
                       for g in space.groups)]
    def value(choice, penalty=0.0):
        moved = sum(abs(space.modules[m].ticks[c] - space.modules[m].ticks[start[m]]) // space.step
                    for m, c in enumerate(choice))
        return sum(change.get((m, c), 0.0) for m, c in enumerate(choice)) + penalty * moved

    assert value(best) == pytest.approx(min(value(ch) for ch in feasible), abs=1e-12)
    # A penalty per level moved keeps only the moves that pay for it.
    cautious = additive_optimum(space, start, change, penalty=1.0)
    assert value(cautious, 1.0) == pytest.approx(min(value(ch, 1.0) for ch in feasible), abs=1e-12)
    assert value(cautious, 1.0) - value(cautious) < value(best, 1.0) - value(best)      # fewer levels moved


def test_warm_start_jumps_to_the_additive_optimum_and_the_search_goes_on_from_there(tmp_path):
    space = paper_like_space()
    start = space.choice_at([0] * len(space))
    settings = search_settings(3, [(1, 2), (2, 1)], pool_batches=3, offspring=6, max_shifts=2, scan_levels=2,
                               scan_tokens=32)
    seed = 3
    fitness = QuadraticFitness(space)
    result = run_search(space, fitness, settings, start, seed=seed, checkpoint=tmp_path / "c.json", progress=False)
    warm = result.warm_start
    # The quadratic fitness is additive and noise-free: the plain optimum (no penalty) is the best budgeted choice
    # within two levels, exactly as predicted, and penalised optima move fewer modules.
    assert warm.scanned == len(space) * 4 and warm.chosen == 0 and warm.proposals[0].penalty == 0
    plain = warm.proposals[0]
    assert plain.fitness == pytest.approx(warm.start_fitness + plain.predicted_change)
    assert plain.fitness < 0.75 * warm.start_fitness
    assert all(p.fitness >= plain.fitness and p.moved <= plain.moved for p in warm.proposals)
    assert result.fitness <= plain.fitness and space.budget_offset(result.choice) == 0
    # Resuming a finished search keeps the scan's record; a search without a scan never runs one.
    again = run_search(space, QuadraticFitness(space), settings, start, seed=seed, checkpoint=tmp_path / "c.json",
                       progress=False)
    assert again.warm_start == warm and again.choice == result.choice
    plain = settings.model_copy(update=dict(scan_levels=0))
    assert run_search(space, QuadraticFitness(space), plain, start, seed=seed, progress=False).warm_start is None
    # One penalty, one proposal: the plain optimum the full family found first.
    only_plain = settings.model_copy(update=dict(generations=[0], scan_penalties=[0.0]))
    single = run_search(space, QuadraticFitness(space), only_plain, start, seed=seed, progress=False).warm_start
    assert len(single.proposals) == 1 and single.proposals[0] == warm.proposals[0] and single.chosen == 0


class NoisyFitness(QuadraticFitness):
    """The quadratic fitness plus per-batch noise that averages out on the whole pool: small selection stages
    mistake lucky children for better ones."""

    def __init__(self, space: SearchSpace, scale: float, pool_batches: int):
        super().__init__(space)
        self.scale, self.pool_batches = scale, pool_batches

    def noise(self, choice, batch) -> float:
        draws = np.random.default_rng([*choice, 1000]).normal(size=self.pool_batches)
        return float(draws[batch] - draws.mean())

    def evaluate(self, choices, batches):
        clean = super().evaluate(choices, batches)
        return [v + self.scale * np.mean([self.noise(c, b) for b in batches]) for v, c in zip(clean, choices)]


def test_pool_rescoring_ends_at_the_best_parent_scored_on_the_whole_pool(tmp_path):
    space = paper_like_space()
    start = space.choice_at([0] * len(space))
    seed = 1
    plain_settings = search_settings(12, [(1, 2), (2, 1)], pool_batches=8, offspring=8, max_shifts=2)
    plain = run_search(space, NoisyFitness(space, 0.5, 8), plain_settings, start, seed=seed, progress=False)
    settings = plain_settings.model_copy(update=dict(pool_rescore_every=3))
    rescored = run_search(space, NoisyFitness(space, 0.5, 8), settings, start, seed=seed, progress=False)
    # Same seed, same generations: rescoring only adds whole-pool scores of the parent every 3 generations.
    assert [h.model_dump(exclude={"seconds"}) for h in rescored.history] == \
           [h.model_dump(exclude={"seconds"}) for h in plain.history]
    assert [s.generation for s in rescored.pool_scores] == [0, 3, 6, 9, 12]
    assert rescored.pool_scores[0].fitness == rescored.start_fitness
    assert rescored.pool_scores[-1].fitness == plain.fitness
    # Under this much noise the last parent is not the best one the search passed through; rescoring returns that
    # one, and its reported fitness is its own on the pool.
    best = min(rescored.pool_scores, key=lambda s: s.fitness)
    assert best.generation != 12 and rescored.fitness == best.fitness < plain.fitness
    assert NoisyFitness(space, 0.5, 8).evaluate([tuple(rescored.choice)], range(8))[0] == rescored.fitness
    assert space.budget_offset(rescored.choice) == 0

    resumed = resume_after(7, space, lambda: NoisyFitness(space, 0.5, 8), settings, seed, start, tmp_path / "c.json")
    assert resumed.resumed_from == 7 and resumed.choice == rescored.choice
    assert resumed.pool_scores == rescored.pool_scores


def test_rescans_restart_the_additive_model_from_the_evolved_parent(tmp_path):
    space = paper_like_space()
    start = space.choice_at([0] * len(space))
    settings = search_settings(9, [(1, 2), (2, 1)], pool_batches=8, offspring=6, max_shifts=2, scan_levels=2,
                               scan_tokens=32, scan_every=4, pool_rescore_every=4)
    seed = 2
    straight = run_search(space, NoisyFitness(space, 0.05, 8), settings, start, seed=seed, progress=False)
    # Scans before generations 1, 5 and 9 (the warm start and two rescans), each from the parent of that moment.
    assert straight.warm_start is not None and [scan.generation for scan in straight.rescans] == [4, 8]
    assert [score.generation for score in straight.pool_scores] == [0, 4, 8, 9]
    for scan in straight.rescans:
        assert scan.result_fitness <= scan.start_fitness
        assert next(s for s in straight.pool_scores if s.generation == scan.generation).fitness == scan.result_fitness
    assert space.budget_offset(straight.choice) == 0
    # The noise is small here: re-linearising where the search is beats evolution alone on the same generations
    # (on average over seeds; a single seed can go either way).
    no_rescans = settings.model_copy(update=dict(scan_every=0))
    gains = [run_search(space, NoisyFitness(space, 0.05, 8), no_rescans, start, seed=other, progress=False).fitness
             - run_search(space, NoisyFitness(space, 0.05, 8), settings, start, seed=other, progress=False).fitness
             for other in range(4)]
    assert np.mean(gains) > 0.02

    resumed = resume_after(4, space, lambda: NoisyFitness(space, 0.05, 8), settings, seed, start, tmp_path / "c.json")
    assert resumed.resumed_from == 4 and resumed.choice == straight.choice
    assert [scan.model_dump(exclude={"seconds"}) for scan in resumed.rescans] == \
           [scan.model_dump(exclude={"seconds"}) for scan in straight.rescans]


# ----- the KL fitness on a tiny model, with candidates cut from its own weights -----

class SlicedCandidates:
    """Candidates at 0 / 25 / 50 / 75 / 100% per module of a tiny dense model (first heads / channels kept)."""

    levels = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, model):
        self.model = model
        self.head_dim = model.config.head_dim
        self.kinds = [k for _ in range(model.config.num_hidden_layers) for k in ("attn", "mlp")]
        self.dense = [module_weights(model, i // 2, k) for i, k in enumerate(self.kinds)]

    def __call__(self, m: int, c: int) -> dict[str, torch.Tensor]:
        w, level, hd = self.dense[m], self.levels[c], self.head_dim
        if level == 1.0:
            return {}
        if self.kinds[m] == "attn":
            kv = self.model.config.num_key_value_heads
            per = self.model.config.num_attention_heads // kv
            groups = max(1, round(kv * (1 - level)))
            rows = lambda t, hs: torch.cat([t[h * hd:(h + 1) * hd] for h in hs])  # noqa: E731
            q_heads = [g * per + j for g in range(groups) for j in range(per)]
            return {"q_proj": rows(w["q_proj"], q_heads), "k_proj": rows(w["k_proj"], range(groups)),
                    "v_proj": rows(w["v_proj"], range(groups)), "o_proj": rows(w["o_proj"].T, q_heads).T.contiguous(),
                    "input_layernorm": w["input_layernorm"]}
        keep = torch.arange(round(w["gate_proj"].shape[0] * (1 - level)))
        return {"gate_proj": w["gate_proj"][keep], "up_proj": w["up_proj"][keep], "down_proj": w["down_proj"][:, keep],
                "post_attention_layernorm": w["post_attention_layernorm"]}


@pytest.fixture(scope="module")
def tiny_kl_setup():
    model = tiny_llama(layers=6, heads=4, kv_heads=2, ffn=96, seed=1)
    candidates = SlicedCandidates(model)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    targets = dense_targets(model, ids, top_k=64, batch_sequences=2, progress=False)
    modules = [ModuleLadder(f"layers.{i // 2}.{k}", i // 2, k, 100 if k == "attn" else 300, (-2, -1, 0, 1, 2))
               for i, k in enumerate(candidates.kinds)]
    space = SearchSpace(target=0.5, unit=0.25, step=1, modules=modules)
    return model, candidates, targets, space


def make_kl(setup, reuse: bool, cache_mb: float = 64):
    model, candidates, targets, _ = setup
    return SupernetKL(DenseParts.from_model(model), candidates, candidates.kinds, targets, batch_sequences=2,
                      reuse_activations=reuse, activation_cache_mb=cache_mb)


def test_sparse_kl_matches_full_kl_when_top_k_is_the_vocabulary():
    logits_p, logits_q = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    logp = torch.log_softmax(logits_p, -1)
    top = logp.topk(11, -1)
    full = torch.nn.functional.kl_div(torch.log_softmax(logits_q, -1), logp, log_target=True, reduction="none").sum((1, 2))
    assert torch.allclose(sparse_kl(logits_q, lambda x: x, top.values, top.indices), full.double(), atol=1e-5)
    partial = sparse_kl(logits_q, lambda x: x, *logp.topk(3, -1))
    assert partial.shape == (2,) and torch.isfinite(partial).all()


def test_kl_fitness_is_zero_for_the_dense_choice_and_grows_with_sparsity(tiny_kl_setup):
    _, _, _, space = tiny_kl_setup
    fitness = make_kl(tiny_kl_setup, reuse=False)
    dense, half, most = (space.choice_at([t] * len(space)) for t in (-2, 0, 1))
    kl = fitness.evaluate([dense, half, most], range(4))
    assert abs(kl[0]) < 1e-4 and kl[0] < kl[1] < kl[2]


def test_bf16_fitness_keeps_values_and_order_of_the_fp32_one(tiny_kl_setup):
    model, candidates, targets, space = tiny_kl_setup
    bf16 = SupernetKL(DenseParts.from_model(model), candidates, candidates.kinds, targets, batch_sequences=2,
                      compute_dtype=torch.bfloat16)
    choices = [space.choice_at([t] * len(space)) for t in (-2, -1, 0, 1)]
    exact = make_kl(tiny_kl_setup, reuse=False).evaluate(choices, range(4))
    fast = bf16.evaluate(choices, range(4))
    assert bf16.stats.compute_dtype == "bfloat16"
    assert fast == sorted(fast) and exact == sorted(exact)
    assert all(abs(a - b) <= 0.02 * b + 2e-3 for a, b in zip(fast, exact))


def test_fitness_dtype_follows_the_recipe_and_the_device():
    assert fitness_dtype("float32", "cpu") == torch.float32
    assert fitness_dtype("bfloat16", "cpu") == torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fitness_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_activation_reuse_gives_identical_fitness_and_saves_work(tiny_kl_setup):
    _, _, _, space = tiny_kl_setup
    start = space.choice_at([0] * len(space))
    settings = search_settings(5, [(1, 3), (3, 1)], pool_batches=4, seq_len=48, offspring=8, max_shifts=2)
    seed = 2
    runs = {}
    for reuse, cache_mb in ((False, 64), (True, 64), (True, 0.2)):   # 0.2 MiB: every 3rd boundary cached
        fitness = make_kl(tiny_kl_setup, reuse, cache_mb)
        result = run_search(space, fitness, settings, start, seed=seed, progress=False)
        runs[reuse, cache_mb] = (result, fitness)
    baseline = runs[False, 64][0]
    for key in ((True, 64), (True, 0.2)):
        result, fitness = runs[key]
        assert result.choice == baseline.choice
        assert [h.fitness for h in result.history] == [h.fitness for h in baseline.history]    # bit-identical
        assert fitness.stats.module_evaluations < runs[False, 64][1].stats.module_evaluations
    assert runs[True, 0.2][1].stride == 3 and runs[True, 64][1].stride == 1
    assert runs[True, 64][1].stats.saving > 0.1
    assert baseline.fitness < baseline.start_fitness


def test_kl_search_resume_is_bit_identical(tiny_kl_setup, tmp_path):
    _, _, _, space = tiny_kl_setup
    start = space.choice_at([0] * len(space))
    settings = search_settings(4, [(1, 2), (2, 1)], pool_batches=4, seq_len=48, offspring=6, max_shifts=2)
    seed = 5
    straight = run_search(space, make_kl(tiny_kl_setup, True), settings, start, seed=seed, progress=False)

    resumed = resume_after(2, space, lambda: make_kl(tiny_kl_setup, True), settings, seed, start, tmp_path / "c.json")
    assert resumed.resumed_from == 2
    assert resumed.choice == straight.choice
    assert [h.fitness for h in resumed.history] == [h.fitness for h in straight.history]


DISTRIBUTED_SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
from test_search import QuadraticFitness, paper_like_space, search_settings
from tyr.compressor.search import SharedFitness, run_search

dist.init_process_group("gloo")
space = paper_like_space()
inner = QuadraticFitness(space)
fitness = SharedFitness(inner)
settings = search_settings(6, [(1, 3), (2, 1)], pool_batches=3, offspring=8, max_shifts=4)
seed = 0
result = run_search(space, fitness, settings, space.choice_at([0] * len(space)), seed=seed, progress=False)
evaluated = sum(n for n, _ in inner.calls)
# One file per rank: both ranks share the launcher's stdout, where their lines can interleave.
with open(os.path.join(os.environ["OUT_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"rank": dist.get_rank(), "choice": result.choice, "fitness": result.fitness, "evaluated": evaluated}, f)
dist.destroy_process_group()
"""


def test_shared_fitness_over_two_gloo_processes(tmp_path):
    script = tmp_path / "dist_search.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = dict(os.environ, TESTS_DIR=str(Path(__file__).parent), OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert rows[0]["choice"] == rows[1]["choice"] and rows[0]["fitness"] == rows[1]["fitness"]
    space = paper_like_space()
    inner = QuadraticFitness(space)
    settings = search_settings(6, [(1, 3), (2, 1)], pool_batches=3, offspring=8, max_shifts=4)
    seed = 0
    single = run_search(space, SharedFitness(inner), settings, space.choice_at([0] * len(space)), seed=seed,
                        progress=False)
    assert single.choice == rows[0]["choice"]
    single_evaluated = sum(n for n, _ in inner.calls)
    assert rows[0]["evaluated"] + rows[1]["evaluated"] == single_evaluated   # the work was split, not repeated


# ----- recipes -----

def test_shipped_recipes_validate():
    paper, fast = load_recipe("paper"), load_recipe("fast")
    assert paper.iterations == 4 and paper.search.offspring == 128 and paper.search.generations == [50]
    assert [(s.tokens, s.survivors) for s in paper.search.stages] == [(2048, 16), (16384, 4), (131072, 2)]
    assert paper.calibration.tokens == 4 * 2 ** 20
    assert [paper.spacing(i) for i in range(4)] == [0.125, 0.0625, 0.03125, 0.015625]
    assert fast.iterations >= 1 and fast.search.selection_sequences >= 1
    assert fast.search.scan_levels == 2 and fast.search.scan_penalties == [0.0] and fast.search.scan_batches == 4
    assert fast.search.scan_every == 16
    gpu = load_recipe("gpu")       # fast's calibration and pruner (with GPU-aligned FFN widths), a larger search
    assert gpu.calibration == fast.calibration
    assert gpu.local_pruner == fast.local_pruner.model_copy(update={"ffn_multiple": 64})
    assert gpu.search.offspring > fast.search.offspring and gpu.search.pool_size > fast.search.pool_size


@pytest.mark.parametrize("change, message", [
    ({"iterations": 0}, "iterations"),
    ({"initial_spacing": 0.7}, "initial_spacing"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"eea": "sometimes"}, "eea"),
    ({"ladder_size": 8}, "odd"),
    ({"search": {"offspring": 0}}, "offspring"),
    ({"search": {"stages": [{"tokens": 1024, "survivors": 4}, {"tokens": 512, "survivors": 1}]}}, "more tokens"),
    ({"search": {"stages": [{"tokens": 500, "survivors": 4}]}}, "whole number"),
    ({"search": {"kl_top_k": -1}}, "kl_top_k"),
    ({"calibration": {"seq_len": 4}}, "seq_len"),
    ({"search": {"typo": True}}, "typo"),
    ({"search": {"scan_tokens": 100}}, "scan_tokens"),
    ({"search": {"scan_tokens": 10 ** 7}}, "scan_tokens"),
    ({"search": {"scan_penalties": [-1.0]}}, "scan_penalties"),
    ({"search": {"scan_levels": 0, "scan_every": 4}}, "scan_every"),
    ({"search": {"fresh_final_stage": True, "stages": [{"tokens": 512, "survivors": 4},
                                                       {"tokens": 512, "survivors": 1}]}}, "fresh_final_stage"),
])
def test_bad_recipes_are_rejected(tmp_path, change, message):
    data = load_recipe("fast").model_dump()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TyrError, match=message):
        load_recipe(path)


def test_recipe_by_path_and_json(tmp_path):
    data = load_recipe("fast").model_dump()
    data["name"] = "mine"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    assert load_recipe(str(path)).name == "mine"
    assert isinstance(load_recipe(Recipe.model_validate(data)), Recipe)
    with pytest.raises(TyrError, match="neither a file nor"):
        load_recipe("no-such-recipe")


def test_fitted_caches_keep_the_recipe_caps_where_they_fit_and_scale_both_down_where_not():
    from tyr.compressor.fitness import CACHE_SHARE, fitted_caches_mb

    mib = 2 ** 20
    assert fitted_caches_mb(256, 384, None, 0) == (256, 384)                  # free memory unknown
    assert fitted_caches_mb(256, 384, 10_000 * mib, 1_000 * mib) == (256, 384)
    activation, weight = fitted_caches_mb(1000, 3000, 3_000 * mib, 1_000 * mib)
    assert activation + weight == pytest.approx(CACHE_SHARE * 2_000) and weight == pytest.approx(3 * activation)
    assert fitted_caches_mb(1000, 3000, 500 * mib, 1_000 * mib) == (0, 0)     # nothing left beside the head

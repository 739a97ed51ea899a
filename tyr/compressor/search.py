"""Evolutionary search over the sparsity level of every module, under a global parameter budget held in real parameters.

An individual ("choice") picks one candidate per prunable module (layer0.attn, layer0.mlp, layer1.attn, ...).
Candidate levels are sparsities on an integer grid: level = target + tick · unit, where ``unit`` is the finest
spacing of the whole coarse-to-fine run. A candidate's real width is its level rounded to whole GQA groups and
heads (attention) or channels (MLP), so the nominal budget Σ_m dense_params(m) · level(m) is not what the pruned
model removes. The budget is therefore a band on the real parameters: a choice is allowed when the parameters its
candidates remove lie within ``tolerance`` of target · Σ_m dense_params(m). The start (every module at the target)
is moved into the band before the search by single-module level moves (``repair_budget``); later coarse-to-fine
iterations start from the previous result, whose candidates keep the same widths, so it is already in the band.

Mutation is the paper's sparsity shift: one module moves one level down (less sparse) and another module with the
same dense size (same kind, in practice) moves one level up, so the nominal budget never changes; the real count
moves by the two modules' rounding, so children outside the band are discarded like those over a latency budget.
Each generation mutates ``offspring`` distinct children from the parent; staged selection scores all of them on a
few tokens, keeps the best, re-scores those on more tokens, and so on; the parent joins the last stage (elitism)
and the winner becomes the next parent. As in the reference implementation, every generation draws its selection
tokens afresh (here: batches of a pool whose dense targets were computed once), so the search does not overfit a
small fixed token set.

Optionally (recipe ``search.scan_levels``, not in the paper) the search first scores every single-module move of
its start, combines the moves under the budget by an additive model and starts from that combination if it scores
lower: the first iteration otherwise spends many generations walking away from the uniform distribution. The
combination is moved into the band like the start, by the moves the scan found cheapest.

Everything random comes from one ``numpy.random.Generator`` whose state is checkpointed after
every generation, so an interrupted search rerun with the same inputs ends bit-identically.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from tyr.atomic import atomic_write_json
from tyr.compressor.recipes import SearchRecipe, SelectionStage
from tyr.errors import TyrError
from tyr.fingerprint import fingerprint

log = logging.getLogger(__name__)

Choice = tuple[int, ...]
# Ticks are compared after rounding (level - target) / unit; anything further off than this is not on the grid.
GRID_TOLERANCE = 1e-6


# ----- the search space -----

@dataclass(frozen=True)
class ModuleLadder:
    """The candidate levels of one prunable module in the current supernet."""

    name: str                 # "layers.3.attn"
    layer: int
    kind: str                 # "attn" | "mlp"
    dense_params: int         # parameters at sparsity 0: the module's weight in the nominal budget
    ticks: tuple[int, ...]    # candidate levels, as integer offsets from the target in units of the grid

    def __post_init__(self):
        if list(self.ticks) != sorted(set(self.ticks)):
            raise ValueError(f"{self.name}: candidate levels must be distinct and ascending, got {self.ticks}")


@dataclass
class SearchSpace:
    """Modules, their ladders, the target and the grid; answers budget and neighbour questions in integers."""

    target: float
    unit: float
    step: int                        # ticks between neighbouring levels in this iteration
    modules: list[ModuleLadder]
    # Real parameters of every module's candidates (after rounding to whole heads and channels) and how far
    # (in parameters) a choice's removed count may lie from target · dense. Without them the budget is nominal
    # and exact: Σ dense_params · tick == 0.
    params: list[tuple[int, ...]] | None = None
    tolerance: float = 0.0
    # Optional latency budget: predicted cost (ms) of every module's candidates and the most a choice may cost.
    # The search then only visits distributions that fit both budgets.
    costs: list[tuple[float, ...]] | None = None
    max_cost: float | None = None
    _down: list[dict[int, int]] = field(init=False, repr=False)
    _up: list[dict[int, int]] = field(init=False, repr=False)
    groups: list[list[int]] = field(init=False, repr=False)
    group_of: list[int] = field(init=False, repr=False)

    def __post_init__(self):
        if self.step < 1:
            raise ValueError(f"step must be a positive number of grid ticks, got {self.step}")
        self._down, self._up = [], []
        for ladder in self.modules:
            index = {t: i for i, t in enumerate(ladder.ticks)}
            self._down.append({i: index[t - self.step] for i, t in enumerate(ladder.ticks) if t - self.step in index})
            self._up.append({i: index[t + self.step] for i, t in enumerate(ladder.ticks) if t + self.step in index})
        # Shifts pair modules of equal dense size, so moving one level each way keeps the budget exact.
        keys: dict[tuple[str, int], int] = {}
        self.group_of = [keys.setdefault((m.kind, m.dense_params), len(keys)) for m in self.modules]
        self.groups = [[i for i, g in enumerate(self.group_of) if g == k] for k in range(len(keys))]
        if (self.costs is None) != (self.max_cost is None):
            raise ValueError("costs and max_cost go together")
        if self.costs is not None and [len(c) for c in self.costs] != [len(m.ticks) for m in self.modules]:
            raise ValueError("costs need one value per candidate of every module")
        if self.params is not None and [len(p) for p in self.params] != [len(m.ticks) for m in self.modules]:
            raise ValueError("params need one count per candidate of every module")
        if self.tolerance < 0:
            raise ValueError(f"the budget tolerance must be >= 0 parameters, got {self.tolerance}")

    def __len__(self) -> int:
        return len(self.modules)

    def level(self, module: int, candidate: int) -> float:
        return level_of(self.target, self.unit, self.modules[module].ticks[candidate])

    def levels(self, choice: Sequence[int]) -> list[float]:
        return [self.level(m, c) for m, c in enumerate(choice)]

    def budget_offset(self, choice: Sequence[int]) -> int:
        """Σ dense_params · tick: 0 means the nominal removed parameters are exactly target · dense total."""
        return sum(m.dense_params * m.ticks[c] for m, c in zip(self.modules, choice))

    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.modules)

    def nominal_sparsity(self, choice: Sequence[int]) -> float:
        return self.target + self.unit * self.budget_offset(choice) / self.dense_params()

    def removed(self, choice: Sequence[int]) -> float:
        """Parameters the choice removes: real ones (from the candidates' counts), else nominal ones."""
        if self.params is None:
            return self.dense_params() * self.nominal_sparsity(choice)
        return sum(m.dense_params - p[c] for m, p, c in zip(self.modules, self.params, choice, strict=True))

    def budget_gap(self, choice: Sequence[int]) -> float:
        """Removed parameters minus target · dense: positive when the choice prunes more than asked."""
        return self.removed(choice) - self.target * self.dense_params()

    def achieved_sparsity(self, choice: Sequence[int]) -> float:
        return self.removed(choice) / self.dense_params()

    def in_budget(self, choice: Sequence[int]) -> bool:
        """Within the parameter band (real counts), or exactly on the nominal budget (no counts)."""
        if self.params is None:
            return self.budget_offset(choice) == 0
        return abs(self.budget_gap(choice)) <= self.tolerance

    def cost(self, choice: Sequence[int]) -> float | None:
        """Predicted cost of a choice under the latency budget (None without one)."""
        return None if self.costs is None else sum(self.costs[m][c] for m, c in enumerate(choice))

    def within_latency(self, choice: Sequence[int]) -> bool:
        return self.max_cost is None or self.cost(choice) <= self.max_cost * (1 + 1e-9)

    def feasible(self, choice: Sequence[int]) -> bool:
        """Within both budgets: parameters and (when set) latency."""
        return self.in_budget(choice) and self.within_latency(choice)

    def down(self, module: int, candidate: int) -> int | None:
        """The candidate one level less sparse, if the ladder has it."""
        return self._down[module].get(candidate)

    def up(self, module: int, candidate: int) -> int | None:
        return self._up[module].get(candidate)

    def choice_at(self, ticks: Sequence[int]) -> Choice:
        """The candidate indices of per-module tick values (each must be on that module's ladder)."""
        out = []
        for ladder, tick in zip(self.modules, ticks, strict=True):
            if tick not in ladder.ticks:
                raise TyrError(f"{ladder.name}: level {level_of(self.target, self.unit, tick):.6f} is not among its "
                               f"candidates {[round(level_of(self.target, self.unit, t), 6) for t in ladder.ticks]}")
            out.append(ladder.ticks.index(tick))
        return tuple(out)

    def ticks_of(self, choice: Sequence[int]) -> list[int]:
        return [m.ticks[c] for m, c in zip(self.modules, choice)]

    def fingerprint(self) -> str:
        data = [self.target, self.unit, self.step, [(m.name, m.dense_params, m.ticks) for m in self.modules],
                self.costs, self.max_cost]
        if self.params is not None:       # appended only when set, so nominal-budget fingerprints stay as they were
            data.append([list(p) for p in self.params] + [self.tolerance])
        return fingerprint(data, 16)


def level_of(target: float, unit: float, tick: int) -> float:
    """target + tick · unit, snapped to exactly 0 or 1 at the ends of the range."""
    level = target + tick * unit
    if abs(level) < GRID_TOLERANCE:
        return 0.0
    if abs(level - 1) < GRID_TOLERANCE:
        return 1.0
    return level


def tick_of(target: float, unit: float, level: float) -> int:
    """The grid offset of a level; raise if the level is not on the grid."""
    tick = round((level - target) / unit)
    if abs(target + tick * unit - level) > GRID_TOLERANCE:
        raise TyrError(f"sparsity level {level} is not on the grid target {target} + k x {unit}")
    return tick


def grid_ticks(target: float, unit: float, step: int, centre: int, half_width: int | None) -> tuple[int, ...]:
    """Ticks centre + k·step (|k| <= half_width, any k when None) whose levels lie in [0, 1]."""
    slack = GRID_TOLERANCE / unit
    lowest = -math.floor(target / unit + slack)          # the smallest tick whose level is >= 0
    highest = math.floor((1 - target) / unit + slack)    # the largest tick whose level is <= 1
    if half_width is None:
        first = centre - ((centre - lowest) // step) * step
        return tuple(range(first, highest + 1, step))
    return tuple(t for t in (centre + k * step for k in range(-half_width, half_width + 1)) if lowest <= t <= highest)


# ----- the parameter band -----

class BudgetRepair(BaseModel):
    """How a distribution outside the parameter band was moved into it, one module one level at a time."""

    before: float = Field(description="real sparsity (share of decoder parameters removed) before the moves")
    after: float = Field(description="real sparsity after them: within the band")
    moves: list[str] = Field(description="'layers.3.mlp 0.5 -> 0.5625', in the order made")


def repair_budget(space: SearchSpace, choice: Choice,
                  move_cost: Callable[[int, int], float] | None = None) -> tuple[Choice, BudgetRepair | None]:
    """Move modules one level at a time until ``choice`` lies in the parameter band (None: it already does).

    Each step makes one move, or two moves of different modules, that bring the removed parameters closer to the
    band (pairs reach the band where coarse head steps make every single move overshoot). Preferred, in order:
    moves within the latency budget (if any); moves that land in the band; the cheapest by ``move_cost(module,
    candidate)`` (default: the nominal change, dense_params · levels moved); modules moved least so far, so equal
    moves spread over the layers; late layers for moves that prune more, early ones for moves that prune less.
    Deterministic; TyrError when no step brings the choice closer.
    """
    if space.in_budget(choice):
        return choice, None
    if space.params is None:
        raise TyrError(f"the distribution's nominal sparsity {space.nominal_sparsity(choice):.6f} is not the target "
                       f"{space.target}")
    cost = move_cost or (lambda m, c: space.modules[m].dense_params * abs(space.modules[m].ticks[c]
                                                                          - space.modules[m].ticks[choice[m]]))
    current, moved, made = list(choice), [0] * len(space), []
    while not space.in_budget(current):
        gap = space.budget_gap(current)
        singles = [(m, c, space.params[m][current[m]] - space.params[m][c])
                   for m in range(len(space)) for c in (space.down(m, current[m]), space.up(m, current[m]))
                   if c is not None]
        steps = [((m, c),) for m, c, _ in singles]
        steps += [((m, c), (n, d)) for i, (m, c, _) in enumerate(singles) for n, d, _ in singles[i + 1:] if n != m]
        removed = {(m, c): delta for m, c, delta in singles}
        excess, latency = _band_excess(space, gap), space.cost(current)
        options = []
        for step in steps:
            after = _band_excess(space, gap + sum(removed[move] for move in step))
            if after < excess:
                slower = latency is not None and latency + sum(space.costs[m][c] - space.costs[m][current[m]]
                                                               for m, c in step) > space.max_cost * (1 + 1e-9)
                # Equal moves go to late layers when pruning more and to early ones when pruning less (early
                # layers are usually the most sensitive); the search then moves sparsity where it pays.
                depth = sum(space.modules[m].layer * (1 if c == space.down(m, current[m]) else -1) for m, c in step)
                options.append((slower, after > 0, sum(cost(m, c) for m, c in step), sum(moved[m] for m, _ in step),
                                after, depth, step))
        if not options:
            raise TyrError(f"no level move brings the distribution (real sparsity "
                           f"{100 * space.achieved_sparsity(current):.2f}%) within {space.tolerance:,.0f} "
                           f"parameters of the target {100 * space.target:.2f}%: the model's head and channel steps "
                           "are too coarse for that tolerance; raise search.budget_tolerance")
        for m, c in min(options)[-1]:
            made.append(f"{space.modules[m].name} {space.level(m, current[m]):.6g} -> {space.level(m, c):.6g}")
            current[m], moved[m] = c, moved[m] + 1
    return tuple(current), BudgetRepair(before=space.achieved_sparsity(choice), after=space.achieved_sparsity(current),
                                        moves=made)


def _band_excess(space: SearchSpace, gap: float) -> float:
    """How far (in parameters) a budget gap lies outside the band; 0 inside it."""
    return max(0.0, abs(gap) - space.tolerance)


# ----- mutation -----

def mutate(parent: Choice, space: SearchSpace, rng: np.random.Generator, max_shifts: int) -> Choice:
    """Apply min(U[1,n], U[1,n]) sparsity shifts (n = max_shifts; biased towards few) to ``parent``.

    A shift moves one module one level down and another module of the same group one level up. The child may
    equal the parent (two shifts can cancel); callers drop such children.
    """
    child = list(parent)
    shifts = min(int(rng.integers(1, max_shifts + 1)), int(rng.integers(1, max_shifts + 1)))
    for _ in range(shifts):
        can_rise = [space.up(m, c) is not None for m, c in enumerate(child)]
        rising_per_group = [sum(can_rise[m] for m in g) for g in space.groups]
        # A module may move down only if another module of its group can move up.
        fallers = [m for m, c in enumerate(child) if space.down(m, c) is not None
                   and rising_per_group[space.group_of[m]] - can_rise[m] > 0]
        if not fallers:
            break
        down = fallers[int(rng.integers(len(fallers)))]
        risers = [m for m in space.groups[space.group_of[down]] if m != down and can_rise[m]]
        up = risers[int(rng.integers(len(risers)))]
        child[down] = space.down(down, child[down])
        child[up] = space.up(up, child[up])
    return tuple(child)


def make_offspring(parent: Choice, space: SearchSpace, rng: np.random.Generator, count: int,
                   max_shifts: int) -> list[Choice]:
    """``count`` distinct children of ``parent`` within the latency budget, if any (fewer if the neighbourhood is
    smaller than that)."""
    children: list[Choice] = []
    seen = {parent}
    for _ in range(50 * count + 100):
        if len(children) == count:
            break
        child = mutate(parent, space, rng, max_shifts)
        if child not in seen:
            seen.add(child)
            if space.feasible(child):
                children.append(child)
    return children


# ----- fitness and staged selection -----

class Fitness(Protocol):
    """Scores choices on selection batches (indices into a fixed pool): lower is better (KL to the dense model)."""

    def evaluate(self, choices: list[Choice], batches: Sequence[int]) -> list[float]: ...

    def set_parent(self, choice: Choice) -> None: ...


class StageRecord(BaseModel):
    tokens: int = Field(description="selection tokens the stage scored its candidates on")
    candidates: int
    survivors: int
    best_fitness: float


class GenerationRecord(BaseModel):
    """One generation. Its selection tokens are fresh, so fitnesses compare only within a generation."""

    generation: int
    fitness: float = Field(description="the winner's fitness on this generation's last-stage tokens")
    parent_fitness: float = Field(description="the previous parent's fitness on the same tokens (elitism: the "
                                  "winner is never worse)")
    improved: bool
    offspring: int
    stages: list[StageRecord]
    seconds: float


def staged_selection(offspring: list[Choice], parent: Choice, stages: list[tuple[SelectionStage, Sequence[int]]],
                     evaluate: Callable[[list[Choice], Sequence[int]], list[float]], fresh_final: bool = False
                     ) -> tuple[list[Choice], list[float], float, list[StageRecord]]:
    """Score, keep the best, re-score on more tokens, ...; the parent joins the last stage (elitism).

    ``stages``: (stage, its batch ids); each stage's batches should start with the previous stage's, so results
    can be reused. ``fresh_final``: the last stage scores only its batches that no earlier stage selected on, so
    the survivors' luck there does not count against the parent. Returns the last stage's survivors best first,
    their fitnesses, the parent's fitness there, and one record per stage. Ties keep the earlier candidate (a
    stable sort): the parent, appended last, wins a tie only if no offspring matches it.
    """
    pool, records, fitness = list(offspring), [], []
    parent_fitness = float("nan")
    for i, (stage, batches) in enumerate(stages):
        if i == len(stages) - 1 and parent not in pool:
            pool.append(parent)
        tokens = stage.tokens
        if fresh_final and i == len(stages) - 1 and i > 0:
            seen = set(stages[i - 1][1])
            tokens = stage.tokens * (len(batches) - len(seen)) // len(batches)
            batches = [b for b in batches if b not in seen]
        fitness = evaluate(pool, batches)
        if i == len(stages) - 1:
            parent_fitness = fitness[pool.index(parent)]
        order = sorted(range(len(pool)), key=lambda j: fitness[j])[:stage.survivors]
        records.append(StageRecord(tokens=tokens, candidates=len(pool), survivors=len(order),
                                   best_fitness=fitness[order[0]]))
        pool, fitness = [pool[j] for j in order], [fitness[j] for j in order]
    return pool, fitness, parent_fitness, records


# ----- warm start: an additive model of single-module sensitivities -----

class WarmStartProposal(BaseModel):
    """One optimum of the additive model, at one penalty per level moved."""

    penalty: float = Field(description="KL charged per level a module moves (0: the plain additive optimum)")
    moved: int = Field(description="modules whose level it changes")
    predicted_change: float = Field(description="the additive model's KL change: the sum of the moves' own changes")
    fitness: float = Field(description="its KL on the whole selection pool")


class WarmStart(BaseModel):
    """The sensitivity scan that may replace the start of a search (recipe ``search.scan_levels``)."""

    generation: int = Field(0, description="generations evolved before this scan (0: the warm start itself)")
    scanned: int = Field(description="single-module moves of the start that were scored")
    tokens: int = Field(description="selection tokens each move was scored on (the same for all)")
    start_fitness: float = Field(description="the start's KL on the whole selection pool")
    proposals: list[WarmStartProposal]
    chosen: int | None = Field(description="the proposal the search starts from (None: the start scored lowest)")
    seconds: float

    @property
    def result_fitness(self) -> float:
        """The pool KL of what the search goes on from: the chosen proposal, or the start."""
        return self.proposals[self.chosen].fitness if self.chosen is not None else self.start_fitness


# Penalties per level moved, in units of the scan's median |change|: the plain optimum trusts every scanned change,
# noise included; penalised ones keep only the moves that clearly pay, and also step less far from the start,
# where interactions between modules (which the additive model ignores) stay small.
WARM_START_PENALTIES = (0.0, 0.5, 1.0)


def scan_variants(space: SearchSpace, start: Choice, levels: int) -> list[tuple[int, int]]:
    """(module, candidate) for every candidate within ``levels`` steps of the start's level, the start excluded."""
    variants = []
    for m, c in enumerate(start):
        for direction in (space.down, space.up):
            candidate = c
            for _ in range(levels):
                candidate = direction(m, candidate)
                if candidate is None:
                    break
                variants.append((m, candidate))
    return variants


def additive_optimum(space: SearchSpace, start: Choice, change: dict[tuple[int, int], float],
                     penalty: float = 0.0) -> Choice:
    """The choice that minimises Σ_m (change[(m, c_m)] + penalty · levels moved) under the start's nominal budget
    (a module at the start's candidate costs 0; candidates missing from ``change`` are not considered).

    Each group of equal-size modules keeps its tick sum, as sparsity shifts do, so the nominal budget stays that of
    the start. Per group this is a knapsack over the running tick offset, solved exactly by dynamic programming;
    the warm start then moves the result into the real-parameter band.
    """
    best = list(start)
    for group in space.groups:
        base = {m: space.modules[m].ticks[start[m]] for m in group}
        # offset -> (total cost, candidates so far); offsets in ticks relative to the start
        table: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
        for m in group:
            options = [(start[m], 0.0)] + [
                (c, v + penalty * abs(space.modules[m].ticks[c] - base[m]) / space.step)
                for (mm, c), v in change.items() if mm == m]
            step: dict[int, tuple[float, tuple[int, ...]]] = {}
            for offset, (total, picked) in table.items():
                for c, v in options:
                    key = offset + space.modules[m].ticks[c] - base[m]
                    if key not in step or total + v < step[key][0]:
                        step[key] = (total + v, picked + (c,))
            table = step
        for m, c in zip(group, table[0][1]):
            best[m] = c
    return tuple(best)


def warm_start(space: SearchSpace, fitness: Fitness, start: Choice, levels: int, batches: Sequence[int],
               everything: Sequence[int], tokens: int, penalties: Sequence[float] = WARM_START_PENALTIES,
               progress: bool = True) -> tuple[Choice, WarmStart]:
    """Score every single-module move of ``start`` (up to ``levels`` steps) on ``batches``, combine the moves by
    the additive model at each of ``penalties`` (per level moved, in units of the median |change|), and start
    from whichever of the start and those optima scores lowest on ``everything``. ``tokens``: how many selection
    tokens ``batches`` hold (for the record).

    Moves are scored with the start as the parent, so each restarts from its cached states at its own module.
    """
    started = time.perf_counter()
    fitness.set_parent(start)
    variants = scan_variants(space, start, levels)
    choices = [tuple(c if i != m else candidate for i, c in enumerate(start)) for m, candidate in variants]
    scores = []
    for i in tqdm(range(0, len(choices), 16), desc="sensitivity scan", unit="x16", disable=not progress,
                  leave=False):
        scores += fitness.evaluate(choices[i:i + 16], batches)
    base = fitness.evaluate([start], batches)[0]
    change = {v: s - base for v, s in zip(variants, scores)}
    scale = float(np.median(np.abs(list(change.values())))) if change else 0.0
    optima: dict[Choice, float] = {}           # distinct feasible proposals, by their smallest penalty
    for weight in penalties:
        proposal = _into_band(space, additive_optimum(space, start, change, weight * scale), change)
        if proposal is not None and proposal != start and space.feasible(proposal):
            optima.setdefault(proposal, weight * scale)
    start_fitness, *fitnesses = fitness.evaluate([start, *optima], everything)
    proposals = [WarmStartProposal(penalty=penalty, moved=sum(a != b for a, b in zip(start, proposal)),
                                   predicted_change=sum(change.get((m, c), 0.0) for m, c in enumerate(proposal)),
                                   fitness=value)
                 for (proposal, penalty), value in zip(optima.items(), fitnesses)]
    best = min(range(len(proposals)), key=lambda i: proposals[i].fitness, default=None)
    chosen = best if best is not None and proposals[best].fitness < start_fitness else None
    record = WarmStart(scanned=len(variants), tokens=tokens, start_fitness=start_fitness, proposals=proposals,
                       chosen=chosen, seconds=time.perf_counter() - started)
    return (list(optima)[chosen] if chosen is not None else start), record


def _into_band(space: SearchSpace, proposal: Choice, change: dict[tuple[int, int], float]) -> Choice | None:
    """The knapsack keeps each group's nominal tick sum, not the real count: move ``proposal`` into the band by
    the moves the scan found cheapest (unscanned ones last); None if it cannot be."""
    def move_cost(m: int, c: int) -> float:
        return change.get((m, c), math.inf) - change.get((m, proposal[m]), 0.0)

    try:
        return repair_budget(space, proposal, move_cost)[0]
    except TyrError:
        return None


# ----- the search loop, checkpointed -----

class PoolScore(BaseModel):
    """The parent after ``generation`` generations, scored on the whole selection pool."""

    generation: int
    fitness: float


class SearchCheckpoint(BaseModel):
    """Everything needed to continue a search exactly where it stopped (written after every generation)."""

    fingerprint: str = Field(description="hash of the search space, settings, start and seed")
    generations_done: int
    parent: list[int]
    start_fitness: float = Field(description="the start's fitness on the whole selection pool")
    history: list[GenerationRecord]
    rng_state: dict
    seconds: float = 0.0
    warm_start: WarmStart | None = None
    rescans: list[WarmStart] = Field([], description="later scans from the parent (search.scan_every)")
    pool_scores: list[PoolScore] = Field([], description="the parent's whole-pool fitness every "
                                         "search.pool_rescore_every "
                                         "generations (empty when off)")
    best: list[int] | None = Field(None, description="the lowest of those parents, when rescoring")
    complete: bool = False
    fitness: float | None = Field(None, description="the result's fitness on the whole pool, once complete")


class SearchResult(BaseModel):
    choice: list[int]
    levels: list[float]
    fitness: float = Field(description="the result's fitness on the whole selection pool")
    start_fitness: float = Field(description="the start's fitness on the whole selection pool")
    history: list[GenerationRecord]
    seconds: float
    warm_start: WarmStart | None = Field(None, description="the sensitivity scan, when the recipe asks for one")
    rescans: list[WarmStart] = Field([], description="later scans from the parent (search.scan_every)")
    pool_scores: list[PoolScore] = Field([], description="the parent's whole-pool fitness every "
                                         "search.pool_rescore_every "
                                         "generations; the result is the lowest of them")
    resumed_from: int = Field(0, description="generations restored from a checkpoint")


def draw_batches(rng: np.random.Generator, settings: SearchRecipe) -> list[list[int]]:
    """This generation's batches per stage: a random subset of the pool, each stage's extending the previous."""
    order = [int(b) for b in rng.permutation(settings.pool_batches)]
    return [order[:batches] for batches in settings.stage_batches()]


def run_search(space: SearchSpace, fitness: Fitness, settings: SearchRecipe, start: Choice, *, seed: int,
               iteration: int = 0, checkpoint: str | Path | None = None,
               on_generation: Callable[[GenerationRecord], None] | None = None,
               progress: bool = True, description: str = "search") -> SearchResult:
    """Evolve from ``start`` for the generations ``settings`` give coarse-to-fine ``iteration``, with all randomness
    from ``seed``; resume from ``checkpoint`` if it exists.

    Each generation draws fresh selection batches from the pool (so the search cannot overfit a few fixed
    tokens); the start and the result are scored on the whole pool. ``on_generation`` runs after each
    generation's checkpoint is written (tests interrupt the search there).
    """
    _check_start(space, start)
    generations = settings.generations_of(iteration)
    search = _Search(space, fitness, settings, start, generations, seed, Path(checkpoint) if checkpoint else None,
                     progress)
    state = search.resume()
    resumed = state.generations_done if state is not None else 0
    if state is None:
        state = search.save(search.begin())
    else:
        log.info("%s: resuming after generation %d of %d", description, state.generations_done, generations)
    bar = tqdm(total=generations, initial=state.generations_done, desc=description, unit="gen",
               disable=not progress or state.complete, leave=False)
    while not state.complete and state.generations_done < generations:
        if search.rescan_due(state):
            state = search.save(search.rescan(state))
        evolved = search.generation(state)
        if evolved is None:
            log.warning("%s: the parent has no neighbours left to mutate into; stopping early", description)
            break
        state = search.save(evolved)
        record = state.history[-1]
        bar.update(1)
        bar.set_postfix(kl=f"{record.fitness:.4f}")
        if on_generation is not None:
            on_generation(record)
    bar.close()
    if state.fitness is None:
        state = search.save(search.finish(state))
    return SearchResult(choice=state.parent, levels=space.levels(state.parent), fitness=state.fitness,
                        start_fitness=state.start_fitness, history=state.history, seconds=state.seconds,
                        warm_start=state.warm_start, rescans=state.rescans, pool_scores=state.pool_scores,
                        resumed_from=resumed)


def _check_start(space: SearchSpace, start: Choice) -> None:
    if not space.in_budget(start):
        if space.params is None:
            raise TyrError(f"the start distribution's nominal sparsity {space.nominal_sparsity(start):.6f} is not "
                           f"the target {space.target}")
        raise TyrError(f"the start distribution's real sparsity {100 * space.achieved_sparsity(start):.3f}% is "
                       f"more than {space.tolerance:,.0f} parameters from the target {100 * space.target:.2f}% "
                       "(repair it with repair_budget first)")
    if not space.within_latency(start):
        raise TyrError(f"the start distribution's predicted latency {space.cost(start):.3f} ms exceeds the budget of "
                       f"{space.max_cost:.3f} ms: raise the target sparsity or the latency budget")


class _Search:
    """One search's fixed parts (space, fitness, settings, the random generator, the checkpoint file) and its
    steps; each step takes the checkpointed state and returns the next one."""

    def __init__(self, space: SearchSpace, fitness: Fitness, settings: SearchRecipe, start: Choice, generations: int,
                 seed: int, checkpoint: Path | None, progress: bool):
        self.space, self.fitness, self.settings, self.start = space, fitness, settings, start
        self.generations, self.checkpoint, self.progress = generations, checkpoint, progress
        self.fingerprint = _fingerprint(space, settings, start, generations, seed)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.everything = list(range(settings.pool_batches))

    def resume(self) -> SearchCheckpoint | None:
        """The checkpointed state of this very search (same space, settings, start and seed), if there is one."""
        state = _load_checkpoint(self.checkpoint, self.fingerprint)
        if state is not None:
            self.rng.bit_generator.state = state.rng_state
        return state

    def save(self, state: SearchCheckpoint) -> SearchCheckpoint:
        _save_checkpoint(self.checkpoint, state)
        return state

    def begin(self) -> SearchCheckpoint:
        """Score the start on the whole pool, or let the sensitivity scan replace it (recipe scan_levels)."""
        started, start = time.perf_counter(), self.start
        parent, warm = start, None
        if self.settings.scan_levels:
            parent, warm = self._scan(start)
            start_fitness = warm.start_fitness
        else:
            self.fitness.set_parent(start)
            start_fitness = self.fitness.evaluate([start], self.everything)[0]
        rescored: list[PoolScore] = []
        if self.settings.pool_rescore_every:
            rescored = [PoolScore(generation=0, fitness=warm.result_fitness if warm else start_fitness)]
        return SearchCheckpoint(fingerprint=self.fingerprint, generations_done=0, parent=list(parent),
                                start_fitness=start_fitness, history=[], rng_state=self.rng.bit_generator.state,
                                seconds=time.perf_counter() - started, warm_start=warm, pool_scores=rescored,
                                best=list(parent) if rescored else None)

    def rescan_due(self, state: SearchCheckpoint) -> bool:
        every, done = self.settings.scan_every, state.generations_done
        return bool(self.settings.scan_levels and every and done and done % every == 0
                    and all(scan.generation != done for scan in state.rescans))

    def rescan(self, state: SearchCheckpoint) -> SearchCheckpoint:
        """Scan again from the evolved parent: the additive model is re-linearised where the search now is."""
        started = time.perf_counter()
        chosen, scan = self._scan(tuple(state.parent))
        scan = scan.model_copy(update=dict(generation=state.generations_done))
        update = dict(parent=list(chosen), rescans=state.rescans + [scan], rng_state=self.rng.bit_generator.state,
                      seconds=state.seconds + time.perf_counter() - started)
        if self.settings.pool_rescore_every:     # the scan scored the parent and its proposals on the whole pool
            update.update(_pool_scored(state, chosen, state.generations_done, scan.result_fitness))
        return state.model_copy(update=update)

    def _scan(self, parent: Choice) -> tuple[Choice, WarmStart]:
        settings = self.settings
        batches = [int(b) for b in self.rng.permutation(settings.pool_batches)[:settings.scan_batches]]
        return warm_start(self.space, self.fitness, parent, settings.scan_levels, batches, self.everything,
                          settings.scan_batches * settings.batch_tokens, settings.scan_penalties, self.progress)

    def generation(self, state: SearchCheckpoint) -> SearchCheckpoint | None:
        """Mutate offspring from the parent, select on fresh batches, and rescore the winner when due (None: the
        parent has no neighbours left)."""
        settings, parent, done = self.settings, tuple(state.parent), state.generations_done + 1
        started = time.perf_counter()
        self.fitness.set_parent(parent)
        children = make_offspring(parent, self.space, self.rng, settings.offspring, settings.max_shifts)
        if not children:
            return None
        stages = [(stage.model_copy(update=dict(survivors=min(stage.survivors, len(children)))), batches)
                  for stage, batches in zip(settings.stages, draw_batches(self.rng, settings))]
        survivors, scores, parent_score, records = staged_selection(children, parent, stages, self.fitness.evaluate,
                                                                    settings.fresh_final_stage)
        record = GenerationRecord(generation=done, fitness=scores[0], parent_fitness=parent_score,
                                  improved=survivors[0] != parent, offspring=len(children), stages=records,
                                  seconds=time.perf_counter() - started)
        update = dict(generations_done=done, parent=list(survivors[0]), history=state.history + [record],
                      rng_state=self.rng.bit_generator.state)
        every = settings.pool_rescore_every
        if every and done % every == 0 and done < self.generations:
            update.update(_rescore(state, self.fitness, survivors[0], done, self.everything))
        update["seconds"] = state.seconds + time.perf_counter() - started
        return state.model_copy(update=update)

    def finish(self, state: SearchCheckpoint) -> SearchCheckpoint:
        """Score the result on the whole pool; with rescoring, the result is the lowest parent so scored."""
        started = time.perf_counter()
        parent = tuple(state.parent)
        if self.settings.pool_rescore_every:
            update = _rescore(state, self.fitness, parent, state.generations_done, self.everything)
            parent = tuple(update["best"])
            final = min(score.fitness for score in update["pool_scores"])
        else:
            self.fitness.set_parent(parent)
            final, update = self.fitness.evaluate([parent], self.everything)[0], {}
        return state.model_copy(update=dict(update, complete=True, fitness=final, parent=list(parent),
                                            seconds=state.seconds + time.perf_counter() - started))


def _rescore(state: SearchCheckpoint, fitness: Fitness, parent: Choice, generation: int,
             everything: Sequence[int]) -> dict:
    """Score ``parent`` on the whole pool and keep it as the best if it is lowest so far (the fields to update).

    Per-generation selection on a few fresh tokens lets a lucky, slightly worse child replace its parent; over
    many generations such steps can add up, so the search may end worse than an earlier parent. All rescores use
    the same pool, so they compare exactly.
    """
    fitness.set_parent(parent)
    return _pool_scored(state, parent, generation, fitness.evaluate([parent], everything)[0])


def _pool_scored(state: SearchCheckpoint, parent: Choice, generation: int, value: float) -> dict:
    """Record ``parent``'s pool KL ``value`` after ``generation`` generations (replacing an earlier score of that
    generation: a rescan's choice follows a rescore made just before it) and keep it if it is the lowest."""
    scores = [score for score in state.pool_scores if score.generation != generation]
    best = min(scores, key=lambda score: score.fitness, default=None)
    keep = best is not None and best.fitness <= value
    return dict(pool_scores=scores + [PoolScore(generation=generation, fitness=value)],
                best=state.best if keep else list(parent))


def _fingerprint(space: SearchSpace, settings: SearchRecipe, start: Choice, generations: int, seed: int) -> str:
    data = [space.fingerprint(), generations, settings.offspring, settings.max_shifts,
            [(batches, s.survivors) for batches, s in zip(settings.stage_batches(), settings.stages)],
            settings.pool_batches, seed, list(start)]
    # Appended only when set, so checkpoints written without them stay valid.
    if settings.scan_levels:
        data += [settings.scan_levels, settings.scan_batches]
        if tuple(settings.scan_penalties) != WARM_START_PENALTIES:
            data.append(list(settings.scan_penalties))
    if settings.fresh_final_stage:
        data.append("fresh_final")
    if settings.pool_rescore_every:
        data.append(["rescore_every", settings.pool_rescore_every])
    if settings.scan_levels and settings.scan_every:
        data.append(["scan_every", settings.scan_every])
    return fingerprint(data, 16)


def _load_checkpoint(path: Path | None, expected: str) -> SearchCheckpoint | None:
    if path is None or not path.is_file():
        return None
    try:
        state = SearchCheckpoint.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TyrError(f"search checkpoint {path} is unreadable ({err}); delete it to restart this search") from err
    if state.fingerprint != expected:
        raise TyrError(f"search checkpoint {path} belongs to a different search (other model, recipe, sparsity or "
                       "seed); use another work directory or delete it")
    return state


def _save_checkpoint(path: Path | None, state: SearchCheckpoint) -> None:
    from tyr.compressor import distributed

    if path is not None and distributed.is_main():
        atomic_write_json(path, state.model_dump(mode="json"))


# ----- several processes share candidate evaluation -----

class SharedFitness:
    """Split each evaluation across torch.distributed ranks: rank r scores choices r::world, results all-gathered.

    On a single process (no process group) it is the wrapped fitness itself. Every rank runs the same seeded
    search, so all ranks propose the same offspring and, after the gather, make the same selections.
    """

    def __init__(self, inner: Fitness):
        from tyr.compressor import distributed

        self.inner = inner
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.gather = distributed.gather_floats

    def set_parent(self, choice: Choice) -> None:
        self.inner.set_parent(choice)

    def evaluate(self, choices: list[Choice], batches: Sequence[int]) -> list[float]:
        if self.world == 1:
            return self.inner.evaluate(choices, batches)
        mine = self.inner.evaluate(choices[self.rank::self.world], batches) if choices[self.rank::self.world] else []
        out = [0.0] * len(choices)
        for rank, scores in enumerate(self.gather(mine)):
            out[rank::self.world] = scores
        return out

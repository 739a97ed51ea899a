"""Pick a deployable model from recorded measurements: quality vs speed-up, Pareto front, targets.

Pure functions on `Measurement`s (no servers, no models): `select(measurements, targets) -> Selection`.

Quality is relative to the baseline (the dense model):
- perplexity mode: increase = ppl / ppl_baseline - 1, target `max_ppl_increase` (0.10 = at most 10% higher);
- accuracy mode: retention = acc / acc_baseline, target `min_accuracy_retention` (0.95 = keep 95%).
Speed-up = output tokens/s on the chosen runtime / the baseline's on the same runtime, target `min_speedup`.
The chosen model is the fastest that meets both targets (ties: better quality). When none does, the closest is
the one with the smallest summed relative shortfall (quality shortfall + speed shortfall).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tyr.errors import TyrError

SelectRuntime = Literal["vllm", "onnx"]
# Ratios of recorded numbers: 22 / 20 - 1 is 0.10000000000000009, and a user asking for "10%" means to include it.
TOLERANCE = 1e-9


class Measurement(BaseModel):
    """One candidate's recorded quality and speed (the dense baseline is one too)."""

    label: str
    model: str | None = None  # folder, for matching benchmark results and for the user
    baseline: bool = False
    sparsity: float | None = Field(None, ge=0, le=1, description="share of parameters the model removes (achieved)")
    target_sparsity: float | None = Field(None, ge=0, le=1, description="the sparsity asked of the pruner, if known")
    perplexity: float | None = Field(None, gt=0, allow_inf_nan=False)
    accuracy: float | None = Field(None, ge=0, allow_inf_nan=False)
    # runtime ("vllm", "onnx") -> output tokens/s
    tokens_per_s: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(default_factory=dict)
    matmul_params: int | None = Field(None, ge=0)


class Targets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float | None = Field(None, ge=0)
    min_accuracy_retention: float | None = Field(None, gt=0)
    min_speedup: float = Field(gt=0)
    runtime: SelectRuntime = "vllm"

    @model_validator(mode="after")
    def _one_quality_target(self) -> Targets:
        if (self.max_ppl_increase is None) == (self.min_accuracy_retention is None):
            raise ValueError("give exactly one quality target: max_ppl_increase or min_accuracy_retention")
        return self

    @property
    def metric(self) -> Literal["perplexity", "accuracy"]:
        return "perplexity" if self.max_ppl_increase is not None else "accuracy"

    def describe(self) -> str:
        quality = (f"perplexity increase <= {self.max_ppl_increase:.1%}" if self.metric == "perplexity"
                   else f"accuracy retention >= {self.min_accuracy_retention:.1%}")
        return f"{quality} and speed-up >= {self.min_speedup:.2f}x on {self.runtime}"


class Scored(BaseModel):
    label: str
    model: str | None
    sparsity: float | None  # achieved
    target_sparsity: float | None = None
    quality: float  # the raw metric (perplexity or accuracy)
    quality_change: float  # perplexity increase (fraction) or accuracy retention (fraction)
    speedup: float
    tokens_per_s: float
    meets_quality: bool
    meets_speed: bool
    on_front: bool = False
    shortfall: float = 0.0  # 0 when both targets are met

    @property
    def meets_both(self) -> bool:
        return self.meets_quality and self.meets_speed


class Selection(BaseModel):
    targets: Targets
    baseline: str
    candidates: list[Scored]
    pareto_front: list[str]  # labels, by increasing speed-up
    chosen: str | None
    closest: str | None  # set when nothing is chosen
    skipped: dict[str, str] = Field(default_factory=dict)  # label -> why it could not be scored
    message: str


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the (label, quality, speed) points no other point beats on both (higher is better for both)."""
    front = []
    for label, quality, speed in points:
        dominated = any(q >= quality and s >= speed and (q > quality or s > speed) for _, q, s in points)
        if not dominated:
            front.append((speed, -quality, label))
    return [label for *_, label in sorted(front)]


def _baseline(measurements: list[Measurement]) -> Measurement:
    flagged = [m for m in measurements if m.baseline]
    if len(flagged) > 1:
        raise TyrError(f"more than one baseline: {', '.join(m.label for m in flagged)}")
    if not flagged:
        flagged = [m for m in measurements if m.sparsity == 0]
        if len(flagged) != 1:
            raise TyrError("no baseline: mark the dense model with \"baseline\": true (or give it sparsity 0)")
    return flagged[0]


def _quality_gap(targets: Targets, change: float) -> float:
    """Relative shortfall against the quality target (0 when met)."""
    if targets.metric == "perplexity":
        return max(0.0, (1 + change) / (1 + targets.max_ppl_increase) - 1)
    return max(0.0, (targets.min_accuracy_retention - change) / targets.min_accuracy_retention)


def select(measurements: list[Measurement], targets: Targets) -> Selection:
    if not measurements:
        raise TyrError("no candidates to select from")
    labels = [m.label for m in measurements]
    if len(set(labels)) != len(labels):
        raise TyrError(f"candidate labels are not unique: {labels}")
    base = _baseline(measurements)
    metric, runtime = targets.metric, targets.runtime
    base_quality, base_speed = getattr(base, metric), base.tokens_per_s.get(runtime)
    if base_quality is None or base_speed is None or base_speed <= 0:
        raise TyrError(f"the baseline {base.label} needs both its {metric} and its {runtime} tokens/s")
    if metric == "accuracy" and base_quality <= 0:
        raise TyrError(f"the baseline {base.label} has accuracy 0: retention is undefined")

    scored, skipped = [], {}
    for m in measurements:
        quality, speed = getattr(m, metric), m.tokens_per_s.get(runtime)
        if quality is None or speed is None:
            skipped[m.label] = f"no {metric}" if quality is None else f"no {runtime} tokens/s"
            continue
        change = quality / base_quality - 1 if metric == "perplexity" else quality / base_quality
        meets_quality = (change <= targets.max_ppl_increase + TOLERANCE if metric == "perplexity"
                         else change >= targets.min_accuracy_retention - TOLERANCE)
        speedup = speed / base_speed
        meets_speed = speedup >= targets.min_speedup - TOLERANCE
        shortfall = _quality_gap(targets, change) + max(0.0, (targets.min_speedup - speedup) / targets.min_speedup)
        scored.append(Scored(label=m.label, model=m.model, sparsity=m.sparsity, target_sparsity=m.target_sparsity,
                             quality=quality,
                             quality_change=change, speedup=speedup, tokens_per_s=speed, meets_quality=meets_quality,
                             meets_speed=meets_speed, shortfall=shortfall))

    # Higher is better on both axes: perplexity increase is negated.
    goodness = (lambda s: -s.quality_change) if metric == "perplexity" else (lambda s: s.quality_change)
    front = pareto_front([(s.label, goodness(s), s.speedup) for s in scored])
    for s in scored:
        s.on_front = s.label in front

    passing = [s for s in scored if s.meets_both]
    chosen = max(passing, key=lambda s: (s.speedup, goodness(s))) if passing else None
    closest = None if chosen else min(scored, key=lambda s: (s.shortfall, -s.speedup))
    if chosen:
        message = (f"chosen: {chosen.label} ({_describe(chosen, metric)}); it meets {targets.describe()}; "
                   f"{len(passing)} of {len(scored)} candidates meet both targets")
    else:
        message = (f"no model meets both targets ({targets.describe()}). Closest: {closest.label} "
                   f"({_describe(closest, metric)}; {_misses(closest, targets)})")
    return Selection(targets=targets, baseline=base.label, candidates=scored, pareto_front=front,
                     chosen=chosen.label if chosen else None, closest=closest.label if closest else None,
                     skipped=skipped, message=message)


def _describe(s: Scored, metric: str) -> str:
    quality = (f"perplexity {s.quality:.3g}, {s.quality_change:+.1%}" if metric == "perplexity"
               else f"accuracy {s.quality:.3g}, retention {s.quality_change:.1%}")
    return f"{quality}, speed-up {s.speedup:.2f}x"


def _misses(s: Scored, targets: Targets) -> str:
    misses = []
    if not s.meets_quality:
        misses.append(f"perplexity increase {s.quality_change:.1%} > {targets.max_ppl_increase:.1%}"
                      if targets.metric == "perplexity"
                      else f"retention {s.quality_change:.1%} < {targets.min_accuracy_retention:.1%}")
    if not s.meets_speed:
        misses.append(f"speed-up {s.speedup:.2f}x < {targets.min_speedup:.2f}x")
    return "misses " + " and ".join(misses)

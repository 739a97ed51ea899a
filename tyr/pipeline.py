"""`tyr run`: the main job end to end — prune, evaluate, export, benchmark against dense, select, report.

Each stage writes its output atomically under the run folder and is skipped when that output already exists, so
an interrupted run resumes where it stopped. The stages are the same functions the other commands call.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tyr.atomic import atomic_write_json, atomic_write_text
from tyr.compressor.heal import HealSettings
from tyr.errors import TyrError
from tyr.selection.selection import Targets

log = logging.getLogger(__name__)


class RunConfig(BaseModel):
    """Everything `tyr run` does; the defaults fit a machine with two CPU cores and no GPU."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("default", description="dense model: 'default' (embedded SmolLM2-135M), 'gemma3-270m', a folder "
                       "or a hub id")
    sparsities: list[float] = Field([0.25, 0.5], description="target sparsities of decoder-layer parameters")
    recipe: str = Field("fast", description="pruning recipe: fast, gpu, paper or a YAML/JSON path")
    out: Path = Field(Path("runs/default"), description="run folder; rerunning with the same folder resumes")
    eval_blocks: int = Field(16, ge=1, description="held-out blocks of 512 tokens for perplexity and KL")
    eval_limit: int = Field(50, ge=1, description="BIG-bench examples per task")
    targets: Targets = Field(default_factory=lambda: Targets(max_ppl_increase=1.0, min_speedup=1.2),
                             description="what the selection asks of a pruned model, and whose speed counts")
    vllm: bool = Field(True, description="export to and benchmark in vLLM")
    onnx: bool = Field(True, description="export to and benchmark in onnxruntime")
    device: str | None = Field(None, description="torch device for pruning and evaluation (default: the GPU when "
                               "torch sees one, else the CPU); vLLM and onnxruntime pick their own")
    heal: HealSettings | None = Field(None, description="also distil the dense model into each pruned one and "
                                      "measure both (None: no healing)")
    seed: int = 0

    @field_validator("sparsities")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if not values or any(not 0 < s < 1 for s in values):
            raise ValueError(f"sparsities must be fractions strictly between 0 and 1, got {values}")
        return sorted(set(values))

    @model_validator(mode="after")
    def _selected_runtime_runs(self) -> "RunConfig":
        if not getattr(self, self.targets.runtime):
            raise ValueError(f"the selection uses {self.targets.runtime} speeds, but {self.targets.runtime} is "
                             f"switched off")
        return self


class Candidate(BaseModel):
    label: str
    sparsity: float = Field(description="the sparsity asked of the pruner (labels and folders are named by it)")
    achieved: float | None = Field(None, description="share of decoder parameters the pruned model removes, "
                                   "from its prune report")
    model_dir: Path
    vllm_dir: Path | None = None
    onnx_dir: Path | None = None


def run_pipeline(config: RunConfig) -> dict:
    """Run every stage and return the summary (also written to <out>/summary.json and summary.md)."""
    from tyr.device import resolve_device
    from tyr.models.io import resolve_model_path

    device = str(resolve_device(config.device))
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run_config.json", config.model_dump(mode="json"))
    timings: dict[str, float] = {}
    dense_dir = Path(resolve_model_path(config.model))
    dense = Candidate(label="dense", sparsity=0.0, achieved=0.0, model_dir=dense_dir, vllm_dir=dense_dir)
    pruned = [Candidate(label=f"tyr-{s:g}", sparsity=s, model_dir=out / f"pruned-{s:g}") for s in config.sparsities]

    with _timed(timings, "prune"):
        # The sparsities share their first supernet (the first iteration's grid is the same for all); it is not
        # needed once all are pruned.
        supernets = config.out / "work" / "supernets"
        for c in pruned:
            _prune(config, dense_dir, c, supernets, device)
            c.achieved = _achieved_sparsity(c.model_dir)
        shutil.rmtree(supernets, ignore_errors=True)
    if config.heal is not None:
        with _timed(timings, "heal"):
            pruned += [_heal(config, dense_dir, c, device) for c in pruned]
    with _timed(timings, "evaluate"):
        evaluations = _evaluate(config, dense, pruned, device)
    if config.vllm:
        with _timed(timings, "export vllm"):
            for c in pruned:
                c.vllm_dir = _export_vllm(c, out)
    if config.onnx:
        with _timed(timings, "export onnx"):
            for c in [dense, *pruned]:
                c.onnx_dir = _export_onnx(c, out)
    results, speeds = [], {c.label: {} for c in [dense, *pruned]}  # BenchResults; label -> runtime -> tokens/s
    if config.vllm:
        with _timed(timings, "bench vllm"):
            for r in _bench_vllm(config, dense, pruned):
                results.append(r)
                speeds[r.label]["vllm"] = r.output_tokens_per_s("auto")
    if config.onnx:
        with _timed(timings, "bench onnx"):
            onnx_results, onnx_speeds = _bench_onnx(config, dense, pruned)
            results += onnx_results
            for label, tps in onnx_speeds.items():
                speeds[label]["onnx"] = tps
    with _timed(timings, "select"):
        summary = _select(config, dense, pruned, evaluations, results, speeds)
    summary["timings_s"] = timings
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", _markdown(summary))
    print(_markdown(summary))
    return summary


class _timed:
    def __init__(self, timings: dict, stage: str):
        self.timings, self.stage = timings, stage

    def __enter__(self):
        log.info("== %s", self.stage)
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.stage] = round(time.perf_counter() - self.started, 1)


def _achieved_sparsity(model_dir: Path) -> float:
    """The achieved (real-parameter) sparsity a pruned folder's report records."""
    from tyr.compressor.report import REPORT_JSON, PruneReport

    path = model_dir / REPORT_JSON
    try:
        return PruneReport.model_validate_json(path.read_text(encoding="utf-8")).achieved_sparsity
    except (OSError, ValueError) as err:
        raise TyrError(f"{path} is missing or unreadable ({err}); delete {model_dir} to prune it again") from err


def _prune(config: RunConfig, dense_dir: Path, c: Candidate, supernet_cache: Path, device: str) -> None:
    from tyr.compressor.prune import prune

    if (c.model_dir / "config.json").is_file():
        log.info("%s: reusing %s", c.label, c.model_dir)
        return
    # One work folder per sparsity, kept under the run folder, so an interrupted prune resumes where it stopped.
    prune(str(dense_dir), sparsity=c.sparsity, recipe=config.recipe, out_dir=c.model_dir,
          work_dir=config.out / "work" / f"{c.sparsity:g}", method="tyr", seed=config.seed, device=device,
          supernet_cache=supernet_cache)


def _heal(config: RunConfig, dense_dir: Path, c: Candidate, device: str) -> Candidate:
    from tyr.compressor.heal import heal

    healed = Candidate(label=f"{c.label}-healed", sparsity=c.sparsity, model_dir=config.out / f"healed-{c.sparsity:g}")
    if (healed.model_dir / "heal_report.json").is_file():
        log.info("%s: reusing %s", healed.label, healed.model_dir)
    else:
        # overwrite: a work folder left by a heal of an earlier pruned model is discarded, not refused.
        heal(c.model_dir, teacher=dense_dir, out_dir=healed.model_dir, settings=config.heal,
             work_dir=config.out / "work" / f"heal-{c.sparsity:g}", device=device, overwrite=True)
    return healed


def _evaluate(config: RunConfig, dense: Candidate, pruned: list[Candidate], device: str) -> dict:
    """Every model's EvalResult by label; the missing ones are evaluated together, dense running once per block."""
    from tyr.evaluation.report import EvalResult
    from tyr.evaluation.run import evaluate_models
    from tyr.models.io import load_model

    paths = {c.label: config.out / "eval" / f"{c.label}.json" for c in [dense, *pruned]}
    missing = [c for c in [dense, *pruned] if not paths[c.label].is_file()]
    if missing:
        reference, tokenizer = load_model(dense.model_dir, device=device)
        models = [(reference if c is dense else load_model(c.model_dir, device=device)[0], str(c.model_dir))
                  for c in missing]
        evaluated = evaluate_models(models, tokenizer, reference_model=reference,
                                    reference_name=str(dense.model_dir), num_blocks=config.eval_blocks,
                                    limit=config.eval_limit, seed=config.seed)
        for c, result in zip(missing, evaluated):
            result.write(paths[c.label])
            print(result.to_text())
    return {label: EvalResult.read(path) for label, path in paths.items()}


def _export_vllm(c: Candidate, out: Path) -> Path:
    from tyr.exporters.vllm.export import export_vllm

    target = out / "vllm" / c.label
    if not (target / "config.json").is_file():
        export_vllm(c.model_dir, target, check=True)
    return target


def _export_onnx(c: Candidate, out: Path) -> Path:
    from tyr.exporters.onnx.export import export_onnx

    target = out / "onnx" / c.label
    if not target.is_dir():
        export_onnx(c.model_dir, target, check=True)
    return target


def _bench_vllm(config: RunConfig, dense: Candidate, pruned: list[Candidate]) -> list:
    from tyr.benchmarking.config import BenchConfig, LoadConfig, OfflineConfig
    from tyr.benchmarking.vllm_bench import bench_vllm, load_run

    out = config.out / "bench-vllm"
    if not (out / "results.json").is_file():
        bench = BenchConfig(load=LoadConfig(users=4, duration_s=20, prompt_tokens=64, output_tokens=32),
                            # Through the server already up for the load: one engine start per model, not two.
                            offline=OfflineConfig(num_prompts=16, prompt_tokens=64, output_tokens=64, via="server"))
        bench_vllm([dense.vllm_dir, *[c.vllm_dir for c in pruned]], bench, out,
                   labels=[dense.label, *[c.label for c in pruned]])
    run = load_run(out / "results.json")
    for failure in run.failures:
        log.error("vLLM benchmark of %s failed: %s", failure.label, failure.error)
    return run.results


def _bench_onnx(config: RunConfig, dense: Candidate, pruned: list[Candidate]) -> tuple[list, dict[str, float]]:
    """Single-stream decode speed in onnxruntime (one thread), as tokens/s per label."""
    from tyr.benchmarking.onnx_bench import OnnxBenchReport, bench_onnx, bench_results, report_table

    path = config.out / "bench-onnx" / "results.json"
    if path.is_file():
        report = OnnxBenchReport.model_validate_json(path.read_text())
    else:
        report = bench_onnx([dense.onnx_dir, *[c.onnx_dir for c in pruned]],
                            labels=[dense.label, *[c.label for c in pruned]], threads=[1])
        atomic_write_text(path, report.model_dump_json(indent=2))
        atomic_write_text(path.with_suffix(".md"), report_table(report))
    timings = next(iter(report.timings.values()))
    return bench_results(report), {t.label: 1000.0 / t.decode_median_ms for t in timings}


def _select(config: RunConfig, dense: Candidate, pruned: list[Candidate], evaluations: dict, results: list,
            speeds: dict[str, dict[str, float]]) -> dict:
    from tyr.benchmarking.results import matmul_params
    from tyr.selection.report import write_selection_report
    from tyr.selection.selection import Measurement, select

    measurements = [
        Measurement(label=c.label, model=str(c.model_dir), baseline=c is dense, sparsity=c.achieved,
                    target_sparsity=c.sparsity,
                    perplexity=evaluations[c.label].perplexity, accuracy=evaluations[c.label].mean_accuracy,
                    tokens_per_s=speeds[c.label], matmul_params=matmul_params(c.model_dir))
        for c in [dense, *pruned]]
    selection = select(measurements, config.targets)
    atomic_write_json(config.out / "measurements.json",
                      {"measurements": [m.model_dump(mode="json") for m in measurements]})
    write_selection_report(config.out, selection, results=results)
    rows = []
    for m in measurements:
        e = evaluations[m.label]
        rows.append({"label": m.label, "sparsity": m.sparsity, "target_sparsity": m.target_sparsity,
                     "matmul_params": m.matmul_params,
                     "perplexity": e.perplexity, "kl_to_dense": e.kl_to_reference, "accuracy": e.mean_accuracy,
                     "accuracy_norm": e.mean_accuracy_norm, "chance": e.mean_chance,
                     **{f"{rt}_tokens_per_s": v for rt, v in m.tokens_per_s.items()}})
    dense_row = rows[0]
    for row in rows:
        row["ideal_speedup"] = dense_row["matmul_params"] / row["matmul_params"]
        for rt in ("vllm", "onnx"):
            key = f"{rt}_tokens_per_s"
            if key in row and dense_row.get(key):
                row[f"{rt}_speedup"] = row[key] / dense_row[key]
                row[f"{rt}_speedup_vs_ideal"] = row[f"{rt}_speedup"] / row["ideal_speedup"]
    return {"models": rows, "targets": selection.targets.describe(), "chosen": selection.chosen,
            "closest": selection.closest, "pareto_front": selection.pareto_front, "message": selection.message}


def _markdown(summary: dict) -> str:
    # Sparsity: the share of decoder parameters the model removes; the target is what the pruner was asked for.
    columns = [("label", "model", "{}"), ("sparsity", "sparsity", "{:.2%}"), ("target_sparsity", "target", "{:.2%}"),
               ("matmul_params", "matmul params", "{:,}"),
               ("perplexity", "ppl", "{:.2f}"), ("kl_to_dense", "KL", "{:.3f}"), ("accuracy", "BIG-bench acc", "{:.3f}"),
               ("vllm_tokens_per_s", "vLLM tok/s", "{:.1f}"), ("vllm_speedup", "vLLM speed-up", "{:.2f}x"),
               ("onnx_tokens_per_s", "ORT tok/s", "{:.1f}"), ("onnx_speedup", "ORT speed-up", "{:.2f}x"),
               ("ideal_speedup", "ideal", "{:.2f}x")]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in summary["models"]:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "—" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Targets: {summary['targets']}", "", summary["message"]]
    if summary.get("timings_s"):
        lines += ["", stage_table(summary["timings_s"])]
    return "\n".join(lines) + "\n"


def stage_table(timings: dict[str, float]) -> str:
    """Seconds per stage of this invocation (a stage reused from an earlier run takes about none)."""
    rows = [f"| {stage} | {seconds:.1f} | {seconds / 60:.1f} |" for stage, seconds in timings.items()]
    total = sum(timings.values())
    return "\n".join(["| stage | seconds | minutes |", "|---|---:|---:|", *rows,
                      f"| total | {total:.1f} | {total / 60:.1f} |"])


def add_run(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    parser.add_argument("--model", default=defaults.model, help=RunConfig.model_fields["model"].description)
    parser.add_argument("--sparsities", "--sparsity", type=float, nargs="+", action="extend", dest="sparsities",
                        metavar="S", help="target sparsities (default: 0.25 0.5)")
    parser.add_argument("--recipe", default=defaults.recipe, help=RunConfig.model_fields["recipe"].description)
    parser.add_argument("--out", type=Path, default=defaults.out, help=RunConfig.model_fields["out"].description)
    quality = parser.add_mutually_exclusive_group()
    quality.add_argument("--max-ppl-increase", type=float, metavar="X",
                         help=f"quality target: perplexity at most (1 + X) x dense (default "
                              f"{defaults.targets.max_ppl_increase})")
    quality.add_argument("--min-accuracy-retention", type=float, metavar="X",
                         help="quality target instead: BIG-bench accuracy at least X x dense")
    parser.add_argument("--min-speedup", type=float, default=defaults.targets.min_speedup, metavar="Y",
                        help="speed target: output tokens/s at least Y x dense")
    parser.add_argument("--runtime", choices=["vllm", "onnx"], default=defaults.targets.runtime,
                        help="the runtime whose speed the selection uses")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--eval-blocks", type=int, help=RunConfig.model_fields["eval_blocks"].description)
    parser.add_argument("--eval-limit", type=int, help=RunConfig.model_fields["eval_limit"].description)
    parser.add_argument("--device", help=RunConfig.model_fields["device"].description)
    parser.add_argument("--heal", action="store_true", help="also heal each pruned model by distillation from the "
                        "dense one (`tyr heal`) and measure healed and unhealed side by side")
    parser.add_argument("--heal-tokens", type=int, metavar="N", help="training tokens per healed model (implies --heal; "
                        f"default {HealSettings().tokens})")
    parser.add_argument("--seed", type=int, default=0)


def run_from_args(args: argparse.Namespace) -> int:
    """Prune a model at several sparsities, evaluate, export to vLLM and ONNX, benchmark against dense, select."""
    fields = {k: v for k, v in vars(args).items() if k in RunConfig.model_fields and v is not None}
    fields.pop("heal")
    if args.heal or args.heal_tokens is not None:
        tokens = {} if args.heal_tokens is None else {"tokens": args.heal_tokens}
        fields["heal"] = {"seed": args.seed, **tokens}
    quality = {"max_ppl_increase": args.max_ppl_increase, "min_accuracy_retention": args.min_accuracy_retention}
    if all(v is None for v in quality.values()):
        quality = {"max_ppl_increase": RunConfig().targets.max_ppl_increase}
    try:
        config = RunConfig(**fields, targets=Targets(**quality, min_speedup=args.min_speedup, runtime=args.runtime))
    except ValueError as err:
        raise TyrError(str(err)) from err
    run_pipeline(config)
    # The job is done even when no model meets both targets: the summary says so and names the closest one.
    return 0

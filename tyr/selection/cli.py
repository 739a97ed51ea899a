"""`tyr select`: choose among recorded candidates (`tyr run` prunes and measures new ones)."""

from __future__ import annotations

import argparse

from tyr.benchmarking.cli import default_out
from tyr.errors import TyrError


def add_select(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", nargs="+", action="extend", required=True, metavar="PATH",
                        help="measurement JSONs, benchmark results, pruned folders with measurement.json, or "
                             "folders of JSONs (the dense baseline among them, marked \"baseline\": true)")
    quality = parser.add_mutually_exclusive_group(required=True)
    quality.add_argument("--max-ppl-increase", type=float, metavar="X",
                         help="largest allowed perplexity increase over the baseline, as a fraction (0.1 = 10%%)")
    quality.add_argument("--min-accuracy-retention", type=float, metavar="X",
                         help="smallest allowed accuracy / baseline accuracy (0.95 = keep 95%%)")
    parser.add_argument("--min-speedup", type=float, required=True, metavar="Y",
                        help="smallest allowed output tokens/s over the baseline's (1.5 = 1.5x)")
    parser.add_argument("--runtime", choices=["vllm", "onnx"], default="vllm", help="whose speed counts")
    parser.add_argument("--speed-source", choices=["auto", "offline", "online"], default="auto",
                        help="which benchmark throughput to compare (auto: offline batch when measured)")
    parser.add_argument("--out", default=None, help="output folder (default: tyr-reports/select-<time>)")


def run_select(args: argparse.Namespace) -> int:
    """Pick the fastest model meeting a quality and a speed-up target (Pareto front, report); exit 1 if none."""
    from tyr.atomic import check_output_path
    from tyr.selection.candidates import read_candidates
    from tyr.selection.report import selection_table, write_selection_report
    from tyr.selection.selection import Targets, select

    out = check_output_path(args.out or default_out("select"))
    try:
        targets = Targets(max_ppl_increase=args.max_ppl_increase, min_accuracy_retention=args.min_accuracy_retention,
                          min_speedup=args.min_speedup, runtime=args.runtime)
    except ValueError as err:
        raise TyrError(f"bad targets: {err}") from err
    selection = select(read_candidates(args.candidates, args.runtime, args.speed_source), targets)
    paths = write_selection_report(out, selection)
    print(selection_table(selection))
    print()
    print(selection.message)
    print(f"\nreport: {paths['html']}  (JSON: {paths['json'].name}, CSV: {paths['csv'].name})")
    return 0 if selection.chosen else 1

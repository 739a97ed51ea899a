"""The `tyr` command: one subcommand per stage (plan, prune, export, bench, select, eval, run).

Each stage's cli module defines its arguments and the function that runs it. Those modules import torch, vLLM,
transformers and onnxruntime only inside the command functions, so building this parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tyr import pipeline
from tyr.benchmarking import cli as bench_cli
from tyr.compressor import cli as prune_cli
from tyr.compressor import heal_cli
from tyr.errors import TyrError
from tyr.evaluation import cli as eval_cli
from tyr.exporters.onnx import cli as onnx_cli
from tyr.exporters.vllm import cli as vllm_cli
from tyr.selection import cli as select_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tyr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        _check_launch(args)
        return int(args.run(args) or 0)
    except TyrError as err:
        print(f"tyr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # what the input checks could not foresee: permissions, a full disk, a file for a folder
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        print(f"tyr {args.command}: error: {err.strerror or err}{': ' + paths if paths else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tyr {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _check_launch(args) -> None:
    """Only `tyr prune` shares its work across processes; any other command started N times by torchrun would
    run N times over the same outputs."""
    from tyr.compressor.distributed import launched_world

    if args.command != "prune" and launched_world() > 1:
        raise TyrError(f"only `tyr prune` runs under torchrun with several processes, not `tyr {args.command}`; "
                       "launch it as one process")


def _add_commands(subparsers) -> None:
    # In the order `tyr --help` lists them, following the data flow.
    _command(subparsers, "eval", eval_cli.add_eval, eval_cli.run_eval)
    _command(subparsers, "plan", prune_cli.add_plan, prune_cli.run_plan)
    _command(subparsers, "prune", prune_cli.add_prune, prune_cli.run_prune)
    _command(subparsers, "heal", heal_cli.add_heal, heal_cli.run_heal)
    export = _runtimes(subparsers, "export")
    _command(export, "vllm", vllm_cli.add_export, vllm_cli.run_export)
    _command(export, "onnx", onnx_cli.add_export, onnx_cli.run_export)
    bench = _runtimes(subparsers, "bench")
    _command(bench, "vllm", bench_cli.add_vllm, bench_cli.run_vllm)
    _command(bench, "onnx", bench_cli.add_onnx, bench_cli.run_onnx)
    _command(bench, "layers", bench_cli.add_layers, bench_cli.run_layers)
    _command(subparsers, "select", select_cli.add_select, select_cli.run_select)
    _command(subparsers, "run", pipeline.add_run, pipeline.run_from_args)


def _runtimes(subparsers, name: str):
    return subparsers.add_parser(name, help=f"{name} a model for a runtime").add_subparsers(dest="runtime",
                                                                                            required=True)


def _command(subparsers, name: str, add_arguments, run) -> None:
    """A subcommand whose help is the first line of ``run``'s docstring."""
    doc = run.__doc__ or ""
    parser = subparsers.add_parser(name, help=doc.strip().splitlines()[0] if doc else None, description=doc)
    add_arguments(parser)
    parser.set_defaults(run=run)


if __name__ == "__main__":
    sys.exit(main())

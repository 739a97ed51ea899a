"""The `tyr` command: one subcommand per stage (prune, export, bench, select, eval, run).

Each command lives with its stage: "package.module:name" means that module defines `add_<name>(parser)` (adds the
arguments) and `run_<name>(args) -> int` (calls the stage's Python function). Modules import heavy libraries
inside run_*, so `tyr --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tyr.errors import TyrError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tyr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, target in COMMANDS.items():
        if isinstance(target, dict):
            group = subparsers.add_parser(name, help=f"{name} a model for a runtime").add_subparsers(
                dest="runtime", required=True)
            for runtime, leaf in target.items():
                _add(group, runtime, leaf)
        else:
            _add(subparsers, name, target)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except (TyrError, FileExistsError, FileNotFoundError) as err:
        print(f"tyr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tyr {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _add(subparsers, name: str, target: str) -> None:
    module_name, func = target.split(":")
    module = importlib.import_module(module_name)
    doc = getattr(module, f"run_{func}").__doc__ or ""
    parser = subparsers.add_parser(name, help=doc.strip().splitlines()[0] if doc else None, description=doc)
    getattr(module, f"add_{func}")(parser)
    parser.set_defaults(run=getattr(module, f"run_{func}"))


# In the order `tyr --help` lists them, following the data flow.
COMMANDS: dict[str, str | dict[str, str]] = {
    "eval": "tyr.evaluation.cli:eval",
    "prune": "tyr.compressor.cli:prune",
    "heal": "tyr.compressor.heal_cli:heal",
    "export": {"vllm": "tyr.exporters.vllm.cli:export", "onnx": "tyr.exporters.onnx.cli:export"},
    "bench": {"vllm": "tyr.serving.cli:bench", "onnx": "tyr.exporters.onnx.cli:bench",
              "layers": "tyr.serving.cli:layers"},
    "select": "tyr.serving.cli:select",
    "run": "tyr.pipeline:run",
}


if __name__ == "__main__":
    sys.exit(main())

"""BIG-bench JSON multiple-choice tasks, formatted zero-shot the way BIG-bench's own json_task does it.

Prompt = task_prefix + example_input_prefix (default "\\nQ: ") + input
         [+ choice_prefix (default "\\n  choice: ") + each choice, in a seeded permutation, when
          append_choices_to_input (default true)] + example_output_prefix (default "\\nA: ").
Each choice is then scored as a continuation of that prompt.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tyr.errors import TyrError

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
BIGBENCH_DIR_ENV = "TYR_BIGBENCH_DIR"
# The default run's tasks, copied unmodified from BIG-bench (Apache-2.0; LICENSE and NOTICE beside them).
PACKAGED_TASKS_DIR = Path(__file__).with_name("bigbench_tasks")


class MultipleChoiceExample(BaseModel):
    prompt: str
    choices: list[str]
    scores: list[float]  # target_scores, aligned with choices; the highest score marks the right answer(s)

    @property
    def correct(self) -> set[int]:
        best = max(self.scores)
        return {i for i, score in enumerate(self.scores) if score == best}


class MultipleChoiceTask(BaseModel):
    name: str
    examples: list[MultipleChoiceExample]
    total_examples: int  # in the task file, before the limit


def default_bigbench_dir() -> Path:
    """$TYR_BIGBENCH_DIR, else the tasks shipped inside the package (PACKAGED_TASKS_DIR)."""
    if os.environ.get(BIGBENCH_DIR_ENV):
        path = Path(os.environ[BIGBENCH_DIR_ENV]).expanduser()
        if not path.is_dir():
            raise TyrError(f"${BIGBENCH_DIR_ENV}={path} is not a directory")
        return path
    return PACKAGED_TASKS_DIR


def available_tasks(directory: str | Path) -> list[str]:
    directory = Path(directory)
    if not directory.is_dir():
        raise TyrError(f"BIG-bench folder {directory} does not exist")
    names = sorted(p.stem for p in directory.glob("*.json"))
    if not names:
        raise TyrError(f"BIG-bench folder {directory} holds no task .json files")
    return names


def resolve_task_names(spec: str, directory: str | Path) -> list[str]:
    """"all" -> every task file in the folder; "a,b" -> those tasks (file stems), checked to exist."""
    names = available_tasks(directory)
    if spec.strip().lower() == "all":
        return names
    if spec.strip().lower() in ("", "none"):
        return []
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise TyrError(f"unknown BIG-bench task(s) {', '.join(unknown)} in {directory}; available: {', '.join(names)}")
    return wanted


def load_task(path: str | Path, limit: int | None = 100, seed: int = 0) -> MultipleChoiceTask:
    """Read a task file and format up to ``limit`` examples (a seeded sample, kept in file order)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise TyrError(f"cannot read BIG-bench task {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("examples", []), list):
        raise TyrError(f"{path} is not a BIG-bench task (expected a JSON object with an \"examples\" list)")
    raw_examples = []
    for number, example in enumerate(data.get("examples", [])):
        if isinstance(example, dict) and example.get("target_scores"):
            _check_target_scores(example["target_scores"], f"{path}: example {number}")
            raw_examples.append(example)
    if not raw_examples:
        raise TyrError(f"{path}: no multiple-choice examples (examples with target_scores)")
    indices = list(range(len(raw_examples)))
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))
    # Same seed -> same choice order in prompts, independent of which examples were sampled.
    choice_rng = np.random.RandomState(seed)
    chosen, examples = set(indices), []
    for index in range(len(raw_examples)):
        permutation_rng = np.random.RandomState(choice_rng.randint(2**31))
        if index in chosen:
            examples.append(format_example(raw_examples[index], data, permutation_rng))
    return MultipleChoiceTask(name=path.stem, examples=examples, total_examples=len(raw_examples))


def _check_target_scores(scores, where: str) -> None:
    valid = isinstance(scores, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores.values())
    if not valid:
        raise TyrError(f"{where}: target_scores must map each choice to a number, got {str(scores)[:80]!r}")


def format_example(example: dict, task: dict, rng: np.random.RandomState) -> MultipleChoiceExample:
    target_scores: dict[str, float] = example["target_scores"]
    text = str(example.get("input", ""))
    if task.get("append_choices_to_input", True):
        choice_prefix = task.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
        shown = rng.permutation(sorted(target_scores))
        text += choice_prefix + choice_prefix.join(shown)
    prompt = (task.get("task_prefix", "") + task.get("example_input_prefix", DEFAULT_INPUT_PREFIX) + text
              + task.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX))
    choices = list(target_scores)
    return MultipleChoiceExample(prompt=prompt, choices=choices, scores=[float(target_scores[c]) for c in choices])

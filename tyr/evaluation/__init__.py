"""Model quality: held-out perplexity, KL to the dense model, zero-shot BIG-bench multiple choice, result report.

Names are imported on first use, so `tyr --help` (which imports tyr.evaluation.cli) does not load torch.
"""

import importlib

_EXPORTS = {
    "perplexity": "tyr.evaluation.language_modeling",
    "kl_to_reference": "tyr.evaluation.language_modeling",
    "compare_to_reference": "tyr.evaluation.language_modeling",
    "score_choices": "tyr.evaluation.multiple_choice",
    "evaluate_task": "tyr.evaluation.multiple_choice",
    "TaskScore": "tyr.evaluation.multiple_choice",
    "load_task": "tyr.evaluation.bigbench",
    "MultipleChoiceTask": "tyr.evaluation.bigbench",
    "EvalResult": "tyr.evaluation.report",
    "evaluate_model": "tyr.evaluation.run",
    "count_parameters": "tyr.evaluation.run",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tyr.evaluation' has no attribute {name!r}")

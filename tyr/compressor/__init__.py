"""Týr-the-Pruner (arXiv 2503.09657), one concern per module:

- calibration.py: calibration token ids and per-module inputs / Hessians (fp32)
- local_pruner.py: the OBS math — progressive structured removal of FFN channels and GQA-consistent head sets
- layerwise.py: functional attention / MLP blocks that run any candidate's weights
- supernet.py: per-module candidates at a ladder of sparsities on disk, with expectation error accumulation
- fitness.py, search.py: top-k sparse KL fitness and the evolutionary search under an exact budget
- prune.py: the coarse-to-fine driver (`prune`), resumable; baselines.py: uniform, magnitude, FLAP
- recipes.py (+ recipes/*.yaml): validated budgets `fast`, `gpu` and `paper`, whose sections are the settings the
  local pruner and the search take; report.py: JSON, Markdown and a plot

Widths, parameter counts and the GQA / FFN width rules come from tyr.models.facts.
"""

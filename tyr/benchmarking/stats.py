"""Percentile summaries of latency samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tyr.benchmarking.results import Percentiles


def summarize(samples: Sequence[float]) -> Percentiles | None:
    """count, mean, p50, p90, p99 (linear interpolation between order statistics); None for no samples."""
    if len(samples) == 0:
        return None
    values = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return Percentiles(count=len(values), mean=float(values.mean()), p50=float(p50), p90=float(p90), p99=float(p99))

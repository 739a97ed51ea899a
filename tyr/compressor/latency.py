"""The search's hardware cost model: a decode step's latency per layer shape, so a search can spend a latency
budget as well as a parameter budget.

The table is measured by `tyr bench layers` (tyr.benchmarking.layer_latency) on the target device. It times torch
blocks, a proxy for a serving engine's decode step: use it to rank and budget shapes, and check the end result
with `tyr bench`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_json
from tyr.errors import TyrError

Widths = Sequence[tuple[int, int, int]]  # per layer: (query heads, kv heads, ffn width); 0 = removed


class LatencyTable(BaseModel):
    method: str = "torch eager decode step per block (proxy, not the serving engine's kernels)"
    device: str
    device_name: str
    dtype: str
    torch_version: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    batch: int
    context: int
    repeats: int
    attention_ms: dict[str, float]  # "heads,kv_heads" -> ms (best of `repeats`)
    mlp_ms: dict[str, float]  # "ffn" -> ms (best of `repeats`)
    lm_head_ms: float
    embedding_and_norm_ms: float = Field(0.0, description="not timed: lookups are negligible next to matmuls")

    def attention(self, heads: int, kv_heads: int) -> float:
        if heads == 0:
            return 0.0
        key = f"{heads},{kv_heads}"
        if key in self.attention_ms:
            return self.attention_ms[key]
        # Unmeasured pair: interpolate in query heads among the pairs with the same KV heads (or all pairs).
        same_kv = {int(k.split(",")[0]): v for k, v in self.attention_ms.items() if int(k.split(",")[1]) == kv_heads}
        points = same_kv or {int(k.split(",")[0]): v for k, v in self.attention_ms.items()}
        return _interpolate(points, heads)

    def mlp(self, ffn: int) -> float:
        if ffn == 0:
            return 0.0
        return _interpolate({int(k): v for k, v in self.mlp_ms.items()}, ffn)

    def layer(self, heads: int, kv_heads: int, ffn: int) -> float:
        return self.attention(heads, kv_heads) + self.mlp(ffn)

    def predict_latency(self, widths: Widths) -> float:
        """Predicted decode-step milliseconds of a model with these per-layer widths (lm_head included)."""
        return sum(self.layer(*w) for w in widths) + self.lm_head_ms

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise TyrError(f"{path} is not a latency table: {err}") from err


def _interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear through (0, 0) and the measured points; beyond the last, extrapolate the last segment."""
    xs = sorted(points)
    if not xs:
        raise TyrError("the latency table has no measurements for this block")
    pts = [(0, 0.0)] + [(k, points[k]) for k in xs]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)

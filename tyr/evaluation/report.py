"""The evaluation result: a JSON file (written atomically) and a readable table (plain text or Markdown)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from tyr.atomic import atomic_write_text
from tyr.evaluation.multiple_choice import TaskScore


class ParameterCount(BaseModel):
    total: int  # unique parameters (tied embeddings counted once)
    non_embedding: int  # without the token embedding and the output head


class EvalResult(BaseModel):
    model: str
    reference: str | None = None
    parameters: ParameterCount
    reference_parameters: ParameterCount | None = None
    text_source: str | None = None
    seq_len: int | None = None
    num_blocks: int | None = None
    perplexity: float | None = None
    reference_perplexity: float | None = None
    kl_to_reference: float | None = Field(None, description="mean KL(P_reference || Q_model), nats per token")
    tasks: dict[str, TaskScore] = {}
    length_normalization: str = "UTF-8 bytes of the choice text"
    limit: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    wall_time_s: float = 0.0

    @property
    def mean_accuracy(self) -> float | None:
        return sum(t.accuracy for t in self.tasks.values()) / len(self.tasks) if self.tasks else None

    @property
    def mean_accuracy_norm(self) -> float | None:
        return sum(t.accuracy_norm for t in self.tasks.values()) / len(self.tasks) if self.tasks else None

    @property
    def mean_chance(self) -> float | None:
        return sum(t.chance for t in self.tasks.values()) / len(self.tasks) if self.tasks else None

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> "EvalResult":
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("model", self.model), ("parameters", _params(self.parameters))]
        if self.reference:
            rows += [("reference", self.reference)]
            if self.reference_parameters:
                rows += [("reference parameters", _params(self.reference_parameters))]
        if self.perplexity is not None:
            rows += [("text", f"{self.text_source} ({self.num_blocks} blocks x {self.seq_len} tokens, validation)"),
                     ("perplexity", f"{self.perplexity:.3f}")]
        if self.reference_perplexity is not None:
            rows += [("reference perplexity", f"{self.reference_perplexity:.3f}")]
        if self.kl_to_reference is not None:
            rows += [("KL(reference || model)", f"{self.kl_to_reference:.4f} nats/token")]
        rows += [("device", f"{self.device}, {self.dtype}"), ("wall time", f"{self.wall_time_s:.1f} s")]
        return rows

    def task_rows(self) -> list[tuple[str, ...]]:
        rows = [(name, f"{100 * t.accuracy:.1f}", f"{100 * t.accuracy_norm:.1f}", f"{100 * t.chance:.1f}",
                 f"{t.num_examples}/{t.total_examples}") for name, t in self.tasks.items()]
        if len(self.tasks) > 1:
            rows.append(("mean", f"{100 * self.mean_accuracy:.1f}", f"{100 * self.mean_accuracy_norm:.1f}",
                         f"{100 * self.mean_chance:.1f}", str(sum(t.num_examples for t in self.tasks.values()))))
        return rows

    def to_text(self) -> str:
        lines = _aligned([("", "")] + self.summary_rows(), header=False)
        if self.tasks:
            lines += ["", f"BIG-bench multiple choice, zero-shot (acc_norm: log-prob / {self.length_normalization})"]
            lines += _aligned([("task", "acc %", "acc_norm %", "chance %", "examples")] + self.task_rows(),
                              header=True)
        return "\n".join(lines).strip("\n") + "\n"

    def to_markdown(self) -> str:
        lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.summary_rows()]
        if self.tasks:
            lines += ["", f"BIG-bench multiple choice, zero-shot (acc_norm: log-prob / {self.length_normalization})",
                      "", "| task | acc % | acc_norm % | chance % | examples |", "|---|---:|---:|---:|---:|"]
            lines += ["| " + " | ".join(row) + " |" for row in self.task_rows()]
        return "\n".join(lines) + "\n"


def _params(count: ParameterCount) -> str:
    return f"{count.total / 1e6:.2f}M total, {count.non_embedding / 1e6:.2f}M without embeddings"


def _aligned(rows: list[tuple[str, ...]], header: bool) -> list[str]:
    rows = [r for r in rows if any(r)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        if not header:
            cells = [row[0].ljust(widths[0])] + list(row[1:])
        lines.append("  ".join(cells).rstrip())
        if header and n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines

"""`heal(...)`: recover a pruned model's quality by distilling its dense teacher into it.

The student (a pruned tyr_llama folder) learns the teacher's next-token distributions on the calibration split of
the text (never the validation split that evaluation scores): loss = T² · KL(teacher_T || student_T) per position,
over the whole vocabulary or, to save memory, over the teacher's top-k tokens (the search's sparse KL), optionally
plus a per-layer output-matching term. AdamW with linear warm-up and cosine decay; bf16 autocast where the hardware
computes in bf16 natively. Full-parameter training, or LoRA adapters (peft) merged back into plain weights, so the
output has the input's widths and config and exports exactly like it.

Resumable: ``<out>.work`` holds checkpoints (trainable weights and AdamW state as safetensors, counters as JSON),
written atomically every ``checkpoint_every`` steps. The batches of step s are a function of (seed, s) only, so a
killed run, rerun with the same command, ends with the same weights as an uninterrupted one. The work folder is
keyed on the contents of its inputs (both models' weights, the training tokens, the settings).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tyr.atomic import atomic_dir, atomic_write_json, check_output_path, exclusive, publish_dir
from tyr.data import TextSource
from tyr.errors import TyrError

log = logging.getLogger(__name__)

# Sized for about 10 minutes of full-parameter healing of SmolLM2-135M at 50% on two CPU cores (bf16).
DEFAULT_TOKENS = 98_304
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRUNE_REPORT_FILES = ("prune_report.json", "prune_report.md", "prune_sparsity.png")
WORK_KEY_FILE = "run.json"


class HealSettings(BaseModel):
    """Everything that decides the healed weights (and the held-out curve), recorded in the work folder and report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(DEFAULT_TOKENS, ge=1, description="training tokens (rounded up to whole steps)")
    seq_len: int = Field(256, ge=16, le=131_072, description="tokens per training and held-out sequence")
    batch_sequences: int = Field(4, ge=1, le=4096, description="sequences per optimizer step")
    lora_rank: int = Field(0, ge=0, le=4096, description="0: train every parameter; r > 0: LoRA adapters of rank r "
                           "on every attention and MLP projection, merged into the weights at the end")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (default 2 x rank)")
    lr: float | None = Field(None, gt=0, le=1, description="peak learning rate (default 5e-4 full, 1e-3 LoRA)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decay ends at this fraction of the peak")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the steps with linear warm-up")
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (None: off)")
    temperature: float = Field(1.0, gt=0, le=100, description="distillation temperature (the loss is scaled by T²)")
    kl_top_k: int | None = Field(None, ge=1, description="KL over the teacher's top-k tokens only (the search's "
                                 "sparse KL; less memory on large vocabularies); None: the whole vocabulary")
    hidden_weight: float = Field(0.0, ge=0, description="weight of per-layer output matching: mean over layers of "
                                 "||h_student - h_teacher||² / ||h_teacher||² (0: logits only)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast dtype of the forwards: auto "
                                                          "= bfloat16 where the hardware has native bf16")
    evaluations: int = Field(10, ge=1, le=10_000, description="held-out KL/perplexity measurements during training "
                             "(plus one before it)")
    eval_blocks: int = Field(8, ge=1, le=100_000, description="held-out sequences of seq_len tokens per measurement")
    checkpoint_every: int = Field(25, ge=1, description="steps between checkpoints (does not change the result)")
    seed: int = 0
    text: TextSource = TextSource(kind="wiki")

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            lora = data.get("lora_rank") or 0
            if data.get("lr") is None:
                data["lr"] = 1e-3 if lora else 5e-4
            if lora and data.get("lora_alpha") is None:
                data["lora_alpha"] = 2.0 * lora
        return data

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_sequences

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.tokens_per_step)

    def eval_steps(self) -> set[int]:
        """Steps after which the held-out KL is measured (0 = before training; the last step always)."""
        return {0} | {round(i * self.steps / self.evaluations) for i in range(1, self.evaluations + 1)}


class StepRecord(BaseModel):
    step: int
    tokens: int
    loss: float
    lr: float
    seconds: float = Field(description="training seconds so far (held-out measurements excluded)")


class HeldOut(BaseModel):
    step: int
    tokens: int
    kl: float = Field(description="mean KL(teacher || student) per position on the held-out text, nats")
    perplexity: float


class HealReport(BaseModel):
    student: str
    teacher: str
    out_dir: str
    settings: HealSettings
    mode: Literal["full", "lora"]
    trainable_params: int
    student_params: int
    steps: int
    tokens: int
    device: str
    compute_dtype: str
    text_source: str
    train_blocks: int = Field(description="calibration-split sequences the batches are drawn from")
    teacher_perplexity: float
    history: list[StepRecord] = []
    held_out: list[HeldOut] = []
    resumed_from_step: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float = Field(0.0, description="training tokens per second (held-out measurements excluded)")
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None

    @property
    def before(self) -> HeldOut:
        return self.held_out[0]

    @property
    def after(self) -> HeldOut:
        return self.held_out[-1]


@dataclass
class HealResult:
    out_dir: Path
    report: HealReport
    report_paths: dict[str, Path] = field(default_factory=dict)
    model: object | None = None          # the healed TyrLlamaForCausalLM, when asked for


@dataclass
class _Inputs:
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    train: torch.LongTensor
    held_out: torch.LongTensor
    student_name: str
    teacher_name: str


def heal(student: str | Path, teacher: str | Path | None = None, out_dir: str | Path = "healed",
         settings: HealSettings | None = None, work_dir: str | Path | None = None, device: str | None = None,
         overwrite: bool = False, progress: bool = True, keep_model: bool = False,
         on_step: Callable[[int, torch.nn.Module], None] | None = None) -> HealResult:
    """Distil ``teacher`` (default: the model ``student`` was pruned from) into the pruned folder ``student``.

    Writes ``out_dir`` (the healed model, same widths and config, with heal_report.json/.md/.png) and keeps
    resumable state in ``work_dir`` (default ``<out_dir>.work``, removed on success). ``on_step(step, model)`` runs
    after each step's checkpoint, with the model being trained (LoRA adapters not yet merged); tests interrupt there.
    """
    from tyr.device import resolve_device

    settings = settings or HealSettings()
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    if out_dir.exists() and not overwrite:
        raise TyrError(f"{out_dir} already exists; choose another output folder or pass overwrite (--overwrite)")
    if not Path(student).is_dir():
        raise TyrError(f"{student}: no such model folder (heal takes a pruned model folder)")
    teacher = teacher if teacher is not None else recorded_teacher(student)
    device = resolve_device(device)
    check_output_path(out_dir)
    check_output_path(work_dir)
    try:
        with exclusive(out_dir), exclusive(work_dir):
            return _heal(student, teacher, out_dir, settings, work_dir, device, overwrite, progress, keep_model,
                         on_step)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TyrError(f"the disk is full ({err}); free space under {work_dir} / {out_dir.parent} and rerun the "
                           "same command to resume") from err
        raise


def recorded_teacher(student: str | Path) -> str:
    """The dense model a pruned folder was pruned from, as its prune_report.json records it."""
    path = Path(student) / "prune_report.json"
    recorded = None
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError):
            recorded = None
    if not recorded or recorded == "in-memory model":
        raise TyrError(f"{student} does not record the model it was pruned from (no prune_report.json with a model); "
                       "name the dense teacher (--teacher)")
    return recorded


def _heal(student, teacher, out_dir: Path, settings: HealSettings, work_dir: Path, device: torch.device,
          overwrite: bool, progress: bool, keep_model: bool, on_step) -> HealResult:
    from tyr.compressor.calibration import ids_digest, tensors_digest
    from tyr.compressor.recipes import fitness_dtype
    from tyr.compressor.report import max_rss_mb

    started = time.perf_counter()
    inputs = _load_inputs(student, teacher, settings, device)
    key = {"student": tensors_digest(inputs.student.state_dict().values()),
           "teacher": tensors_digest(inputs.teacher.state_dict().values()),
           "train_tokens": ids_digest(inputs.train), "held_out_tokens": ids_digest(inputs.held_out),
           "settings": settings.model_dump(mode="json", exclude={"checkpoint_every"}), "device": device.type}
    _claim_work_dir(work_dir, key, discard=overwrite)
    compute_dtype = fitness_dtype(settings.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = _trainable(inputs.student, settings)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _schedule(optimizer, settings)
    resumed = _resume(work_dir, trainable, optimizer, scheduler)
    report = HealReport(
        student=inputs.student_name, teacher=inputs.teacher_name, out_dir=str(out_dir), settings=settings,
        mode="lora" if settings.lora_rank else "full", trainable_params=sum(p.numel() for _, p in trainable),
        student_params=sum(p.numel() for p in inputs.student.parameters()), steps=settings.steps,
        tokens=settings.steps * settings.tokens_per_step, device=str(device),
        compute_dtype=str(compute_dtype).removeprefix("torch."), text_source=settings.text.describe(),
        train_blocks=inputs.train.shape[0], **({"teacher_perplexity": 0.0} | resumed))
    _train(model, inputs, settings, optimizer, scheduler, trainable, report, work_dir, compute_dtype, progress,
           on_step)
    healed = model.merge_and_unload() if settings.lora_rank else model
    healed.eval()
    report.tokens_per_s = report.tokens / report.train_seconds if report.train_seconds else 0.0
    report.wall_seconds = time.perf_counter() - started
    report.peak_rss_mb = max_rss_mb()
    if device.type == "cuda":
        report.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    paths = _save(healed, inputs.tokenizer, Path(student), out_dir, work_dir, report)
    shutil.rmtree(work_dir, ignore_errors=True)
    log.info("healed model written to %s: held-out KL %.4f -> %.4f, perplexity %.2f -> %.2f", out_dir,
             report.before.kl, report.after.kl, report.before.perplexity, report.after.perplexity)
    return HealResult(out_dir=out_dir, report=report, report_paths=paths, model=healed if keep_model else None)


def _load_inputs(student, teacher, settings: HealSettings, device: torch.device) -> _Inputs:
    from tyr.models.io import load_model, resolve_model_path
    from tyr.models.slicing import to_tyr

    student_model, tokenizer = load_model(Path(student), dtype=torch.float32, device=device)
    try:
        teacher_model, teacher_tokenizer = load_model(teacher, dtype=torch.float32, device=device)
    except TyrError as err:
        raise TyrError(f"teacher: {err}") from err
    check_same_vocabulary(student_model, tokenizer, teacher_model, teacher_tokenizer, str(student), str(teacher))
    if settings.hidden_weight and (
            student_model.config.hidden_size != teacher_model.config.hidden_size
            or student_model.config.num_hidden_layers != teacher_model.config.num_hidden_layers):
        raise TyrError("per-layer output matching (hidden_weight > 0) needs a teacher with the student's hidden size "
                       "and layer count")
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    train = _blocks(tokenizer, settings.text, "calibration", settings.seq_len, None, settings.seed)
    held_out = _blocks(tokenizer, settings.text, "validation", settings.seq_len, settings.eval_blocks, settings.seed)
    return _Inputs(student=to_tyr(student_model), teacher=teacher_model.eval(), tokenizer=tokenizer, train=train,
                   held_out=held_out, student_name=str(student), teacher_name=resolve_model_path(teacher))


def check_same_vocabulary(student, student_tokenizer, teacher, teacher_tokenizer, student_name: str,
                          teacher_name: str) -> None:
    """Distillation compares distributions token by token: refuse a teacher that numbers tokens differently."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise TyrError(f"the teacher {teacher_name} has vocab_size {teacher.config.vocab_size}, the student "
                       f"{student_name} {student.config.vocab_size}: heal needs the model the student was pruned from")
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise TyrError(f"the tokenizers of the teacher {teacher_name} and the student {student_name} differ (their "
                       "vocabularies map tokens to different ids): heal needs the model the student was pruned from")


def _blocks(tokenizer, source: TextSource, split: str, seq_len: int, num_blocks: int | None,
            seed: int) -> torch.LongTensor:
    from tyr.data import load_text, token_blocks

    try:
        return token_blocks(tokenizer, load_text(source, split=split), seq_len, num_blocks, seed)
    except ValueError as err:
        raise TyrError(f"{split} text ({source.describe()}): {err}") from err


def batch_indices(seed: int, step: int, batch_sequences: int, num_blocks: int) -> list[int]:
    """The training sequences of ``step``: epoch after epoch through a per-epoch shuffle, a function of
    (seed, step) alone, so a resumed run sees the batches an uninterrupted one would."""
    first = step * batch_sequences
    return [int(_epoch_order(seed, position // num_blocks, num_blocks)[position % num_blocks])
            for position in range(first, first + batch_sequences)]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_blocks: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(num_blocks, generator=generator)


def _trainable(student: torch.nn.Module, settings: HealSettings) -> torch.nn.Module:
    """The student itself (full-parameter), or wrapped with LoRA adapters (initialised from the seed)."""
    if not settings.lora_rank:
        return student.train()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return get_peft_model(student, config).train()


def _schedule(optimizer, settings: HealSettings):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, round(settings.warmup_fraction * settings.steps),
                                                       settings.steps, min_lr_rate=settings.min_lr_ratio)


def distillation_loss(student_out, teacher_out, settings: HealSettings) -> torch.Tensor:
    """T² · mean KL(teacher_T || student_T) per position (+ hidden_weight · per-layer output matching)."""
    from tyr.compressor.fitness import sparse_kl

    temperature = settings.temperature
    # Vocabulary-sized tensors dominate the step's memory traffic: no copy for T = 1, float32 only inside softmax.
    student_logits, teacher_logits = student_out.logits, teacher_out.logits
    if temperature != 1:
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    teacher_logp = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    positions = student_logits.shape[0] * student_logits.shape[1]
    if settings.kl_top_k:
        top = teacher_logp.topk(min(settings.kl_top_k, teacher_logp.shape[-1]), dim=-1)
        kl = sparse_kl(student_logits, lambda logits: logits, top.values, top.indices).sum().float()
    else:
        student_logp = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    loss = kl * temperature ** 2 / positions
    if settings.hidden_weight:
        pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))
        matching = sum(((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean() for s, t in pairs)
        loss = loss + settings.hidden_weight * matching / len(pairs)
    return loss


def _train(model, inputs: _Inputs, settings: HealSettings, optimizer, scheduler, trainable, report: HealReport,
           work_dir: Path, compute_dtype: torch.dtype, progress: bool, on_step) -> None:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    eval_steps = settings.eval_steps()
    start = report.history[-1].step if report.history else 0
    report.resumed_from_step = start
    if start == 0:
        report.teacher_perplexity = _measure(model, inputs, report, 0).reference_perplexity
    params = [p for _, p in trainable]
    bar = tqdm(total=report.tokens, initial=start * settings.tokens_per_step, unit="tok", unit_scale=True,
               desc="heal", disable=not progress)
    for step in range(start + 1, settings.steps + 1):
        step_started = time.perf_counter()
        rows = batch_indices(settings.seed, step - 1, settings.batch_sequences, inputs.train.shape[0])
        lr = optimizer.param_groups[0]["lr"]
        loss = _step(model, inputs.teacher, inputs.train[rows].to(device), settings, optimizer, scheduler, params,
                     compute_dtype)
        seconds = (report.history[-1].seconds if report.history else 0.0) + time.perf_counter() - step_started
        report.history.append(StepRecord(step=step, tokens=step * settings.tokens_per_step, loss=loss, lr=lr,
                                         seconds=seconds))
        report.train_seconds = seconds
        bar.update(settings.tokens_per_step)
        if step in eval_steps:
            _measure(model, inputs, report, step)
        bar.set_postfix(loss=f"{loss:.4f}", held_out_kl=f"{report.held_out[-1].kl:.4f}")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            _save_checkpoint(work_dir, step, trainable, optimizer, scheduler, report)
        if on_step is not None:
            on_step(step, model)
    bar.close()


def _step(model, teacher, ids: torch.LongTensor, settings: HealSettings, optimizer, scheduler, params,
          compute_dtype: torch.dtype) -> float:
    """One optimizer step on one batch; returns its loss."""
    want_hidden = settings.hidden_weight > 0
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        with torch.no_grad():
            teacher_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
        student_out = model(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
    loss = distillation_loss(student_out, teacher_out, settings)
    loss.backward()
    if settings.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _measure(model, inputs: _Inputs, report: HealReport, step: int):
    """Held-out KL to the teacher and perplexity, in float32; appended to the report."""
    from tyr.evaluation.language_modeling import compare_to_reference

    model.eval()
    comparison = compare_to_reference(model, inputs.teacher, inputs.held_out, batch_size=1, progress=False)
    model.train()
    report.held_out.append(HeldOut(step=step, tokens=step * report.settings.tokens_per_step, kl=comparison.kl,
                                   perplexity=comparison.perplexity))
    return comparison


# ----- work folder and checkpoints -----

def _claim_work_dir(work_dir: Path, key: dict, discard: bool) -> None:
    """Keep earlier work only when it was done on the same inputs; name what differs otherwise."""
    path = work_dir / WORK_KEY_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
        if stored == key:
            return
        differs = sorted(k for k in key if stored.get(k) != key[k])
        if not discard:
            raise TyrError(f"work folder {work_dir} holds a heal run on different inputs ({', '.join(differs)} "
                           "differ); delete it, pass another work folder, or pass overwrite (--overwrite) to start "
                           "over")
        log.warning("discarding %s: it was made with different %s", work_dir, ", ".join(differs))
        shutil.rmtree(work_dir)
    atomic_write_json(path, key)


def _checkpoints(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))


def _save_checkpoint(work_dir: Path, step: int, trainable, optimizer, scheduler, report: HealReport) -> None:
    """Trainable weights and AdamW moments as safetensors, counters and the curve so far as JSON; one rename."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()["state"]
    moments = {f"{name}.{kind}": state[i][kind].contiguous() for i, (name, _) in enumerate(trainable) if i in state
               for kind in ("exp_avg", "exp_avg_sq")}
    counters = {name: float(state[i]["step"]) for i, (name, _) in enumerate(trainable) if i in state}
    with atomic_dir(work_dir / f"step-{step:08d}", overwrite=True) as tmp:
        save_file({name: p.detach().contiguous() for name, p in trainable}, tmp / "weights.safetensors")
        save_file(moments, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", {
            "adam_steps": counters, "param_groups": optimizer.state_dict()["param_groups"],
            "scheduler": scheduler.state_dict(), "teacher_perplexity": report.teacher_perplexity,
            "history": [r.model_dump() for r in report.history],
            "held_out": [r.model_dump() for r in report.held_out]})
    for older in _checkpoints(work_dir)[:-1]:
        shutil.rmtree(older, ignore_errors=True)


def _resume(work_dir: Path, trainable, optimizer, scheduler) -> dict:
    """Load the latest checkpoint into the model, optimizer and schedule; return the report fields it carries."""
    from safetensors.torch import load_file

    checkpoints = _checkpoints(work_dir)
    if not checkpoints:
        return {}
    latest = checkpoints[-1]
    state = json.loads((latest / "state.json").read_text(encoding="utf-8"))
    weights = load_file(latest / "weights.safetensors")
    moments = load_file(latest / "optimizer.safetensors")
    names = [name for name, _ in trainable]
    if set(weights) != set(names):
        raise TyrError(f"checkpoint {latest} does not match the model being trained; delete {work_dir} to start over")
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(weights[name])
    optimizer.load_state_dict({
        "state": {i: {"step": torch.tensor(state["adam_steps"][name]), "exp_avg": moments[f"{name}.exp_avg"],
                      "exp_avg_sq": moments[f"{name}.exp_avg_sq"]}
                  for i, name in enumerate(names) if name in state["adam_steps"]},
        "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming healing from step %d (%s)", state["history"][-1]["step"], latest)
    return {"teacher_perplexity": state["teacher_perplexity"], "history": state["history"],
            "held_out": state["held_out"], "train_seconds": state["history"][-1]["seconds"]}


# ----- output -----

def _save(healed, tokenizer, student_dir: Path, out_dir: Path, work_dir: Path, report: HealReport) -> dict[str, Path]:
    """Model, the input's prune report and the heal report into work_dir/final, then one rename to out_dir."""
    from tyr.compressor.heal_report import write_heal_report
    from tyr.models.io import save_model

    staging = work_dir / "final"
    save_model(healed, tokenizer, staging, overwrite=True)
    for name in PRUNE_REPORT_FILES:
        if (student_dir / name).is_file():
            shutil.copy(student_dir / name, staging / name)
    paths = write_heal_report(report, staging)
    publish_dir(staging, out_dir)
    return {k: out_dir / p.name for k, p in paths.items()}

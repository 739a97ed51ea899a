"""The supernet: for every decoder module (layer i attention, layer i MLP), pruned candidates at a ladder of sparsities.

Building walks the modules in order (layer 0 attn, layer 0 mlp, layer 1 attn, ...), one at a time on the compute
device: the module's input activations on the calibration hidden states give its Hessian, the local pruner
(local_pruner.py) gives every candidate, the candidates go to disk at once (one safetensors file per module), and
the hidden states move on to the next module's input:

- "expectation" (EEA, the paper): the (1 − S)-weighted mean of the candidates' outputs, weights (1 − S_e) / Σ(1 − S_e)
  with S_e the candidate's ladder level;
- "current": the output of the candidate at the module's current level (given by the caller; level 0 = dense);
- "none": the dense module's output (every module is pruned on the dense model's inputs).

Candidates share the module's input activations (q/k/v and gate/up rows are not updated), and their outputs are
linear in the updated o_proj / down_proj weights, so any mixture of candidate outputs is one matmul with the mixed
weights: propagating costs one dense forward whatever the ladder.

On disk a module's file holds only what its candidates change (each candidate's output projection, in the dense
weights' stored dtype); the module's other weights are referenced from the dense model's safetensors files when the
build is given its folder (and copied only when those files do not hold what the model computes with). The hidden
states stay in float32 for float32 models and in bfloat16 for half-precision ones, as those models' own residual
stream does.

Resuming: every ``checkpoint_seconds`` the hidden states go to a checkpoint and the manifest (the commit point)
records the modules finished so far; rerunning with the same inputs continues after the last committed module
(redoing the modules built since) and gives the same bytes.
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tyr.atomic import atomic_save_tensors, atomic_write_json
from tyr.compressor import calibration, distributed
from tyr.compressor.layerwise import (KINDS, DenseParts, attention_heads, head_dim_of, mlp_hidden, module_weights,
                                     output_norm, tensor_name)
from tyr.compressor.local_pruner import PrunedLinear, prune_columns_progressively, prune_heads_gqa
from tyr.compressor.recipes import EEAMode, LocalPrunerRecipe, MemoryRecipe
from tyr.device import resolve_device
from tyr.errors import TyrError
from tyr.fingerprint import fingerprint
from tyr.models.facts import (SAFETENSORS_DTYPES, LayerWidth, StoredTensor, WidthRules, check_width_rules, ffn_width,
                              gqa_widths, layer_params, layer_widths, tensor_index)
from tyr.models.families import family_of
from tyr.models.slicing import LayerKeep, SlicedTensors, build_model, sliced_tensors
from tyr.models.streaming import StreamedModel

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DEFAULT_LADDER = [i / 8 for i in range(9)]
OUTPUT_PROJECTION = {"attn": "o_proj", "mlp": "down_proj"}   # the linear layer whose input columns are pruned
TENSOR_HEADER_BYTES = 80        # a tensor's entry in a safetensors header, about


class TensorRef(BaseModel):
    file: str = Field(description="weight file of the dense model, relative to its folder")
    tensor: str


class DenseFile(BaseModel):
    name: str
    bytes: int
    mtime_ns: int


class DenseReference(BaseModel):
    """The dense model's safetensors files that the supernet reads its unchanged weights from."""

    folder: str
    files: list[DenseFile]

    @classmethod
    def of(cls, folder: Path, index: dict[str, StoredTensor]) -> "DenseReference":
        paths = sorted({stored.file for stored in index.values()})
        return cls(folder=str(folder.resolve()), files=[DenseFile(name=p.name, bytes=p.stat().st_size,
                                                                  mtime_ns=p.stat().st_mtime_ns) for p in paths])

    def stale(self) -> Path | None:
        """The first referenced file that is gone or was rewritten since the build (None: all as they were)."""
        for f in self.files:
            path = Path(self.folder) / f.name
            stat = path.stat() if path.is_file() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != (f.bytes, f.mtime_ns):
                return path
        return None

    def check(self, supernet: Path) -> None:
        """TyrError when a referenced file is gone or was rewritten since the build."""
        if (path := self.stale()) is not None:
            raise TyrError(f"{supernet} reads the dense model's weights from {path}, which is missing or was "
                           "rewritten since the supernet was built; rebuild the supernet (rerun the prune)")


class ModuleCandidates(BaseModel):
    layer: int
    kind: Literal["attn", "mlp"]
    levels: list[float] = Field(description="nominal sparsity of each candidate (its ladder level)")
    widths: list[list[int]] = Field(description="attn: [heads, kv_heads]; mlp: [ffn] per candidate")
    params: list[int] = Field(description="weight parameters of each candidate (norm included; 0 = removed)")
    keep: list[list[int]] = Field(description="kept query heads or FFN channels (dense indices) per candidate")
    errors: list[float] = Field([], description="relative output reconstruction error ||XWᵀ−X'W'ᵀ||²/||XWᵀ||²")
    file: str = Field(description="safetensors file of this module, relative to the supernet folder")
    referenced: dict[str, TensorRef] = Field({}, description="the module's unchanged weights read from the dense "
                                             "model's files (weight-dict key -> tensor); the others are copied in "
                                             "the module's file as dense.<key>")


class SupernetManifest(BaseModel):
    version: int = FORMAT_VERSION
    model: str
    hidden_size: int
    head_dim: int
    num_layers: int
    family: str = Field("llama", description="the model's family (tyr.models.families): its parameter counts")
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    dtype: str
    store_dtype: str = Field("float32", description="dtype of the stored candidates: the dense weights' (bfloat16 "
                             "hidden states for half-precision models, float32 for float32 ones)")
    dense_weights: DenseReference | None = None
    eea: EEAMode
    current_levels: list[float] | None = None
    settings: LocalPrunerRecipe
    calibration: dict
    fingerprint: str = Field(description="SHA-256 of everything that determines the result (inputs and weights)")
    modules: list[ModuleCandidates] = Field(description="finished modules: layer0.attn, layer0.mlp, layer1.attn, ...")
    checkpoint: str | None = Field(None, description="hidden states after the last finished module (partial builds)")
    complete: bool = False

    def dense_params(self) -> int:
        """Decoder-layer weight parameters of the dense model (embeddings and LM head excluded)."""
        attn, mlp = layer_params(self, LayerWidth(num_attention_heads=self.num_attention_heads,
                                                  num_key_value_heads=self.num_key_value_heads,
                                                  intermediate_size=self.intermediate_size))
        return self.num_layers * (attn + mlp)


def module_file(index: int, layer: int, kind: str) -> str:
    return f"modules/{index:03d}-layer{layer:03d}-{kind}.safetensors"


# ----- building -----

def _check_dense(model) -> None:
    config = model.config
    dense = LayerWidth(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    for i, width in enumerate(layer_widths(config)):
        if width != dense:
            raise TyrError(f"layer {i} is already pruned ({width._asdict()}); build the supernet from the dense model")


def level_index(ladder: list[float], level: float) -> int | None:
    """Position of ``level`` on ``ladder`` (first match, up to float rounding), or None."""
    return next((i for i, s in enumerate(ladder) if abs(s - level) <= 1e-9), None)


def _mixture(eea: str, levels: list[float], current: float | None) -> list[float]:
    """Weights of the candidates' outputs in the input of the next module ("none" is handled by the caller)."""
    if eea == "current":
        chosen = level_index(levels, current)
        return [1.0 if i == chosen else 0.0 for i in range(len(levels))]
    keep = [1 - s for s in levels]
    total = sum(keep)
    return [k / total if total > 0 else 0.0 for k in keep]


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, done: int, out_dir: Path) -> int:
    """Write safetensors atomically and return its size; a full disk becomes a clear TyrError."""
    try:
        return atomic_save_tensors(tensors, path)
    except OSError as err:
        _raise_if_disk_full(err, path, done, out_dir)
        raise


def _raise_if_disk_full(err: OSError, path: Path, done: int, out_dir: Path) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise TyrError(f"disk full while writing {path}: the {done} finished modules in {out_dir} stay valid; "
                       "free some space and rerun the same command to resume") from err


def _write_manifest(manifest: SupernetManifest, out_dir: Path) -> None:
    try:
        atomic_write_json(out_dir / MANIFEST, manifest.model_dump(mode="json"))
    except OSError as err:
        _raise_if_disk_full(err, out_dir / MANIFEST, len(manifest.modules), out_dir)
        raise


def _prune_module(kind: str, W: torch.Tensor, H: torch.Tensor, levels: list[float], model_config,
                  settings: LocalPrunerRecipe) -> list[PrunedLinear]:
    dtype, rules = getattr(torch, settings.solver_dtype), settings.width_rules
    if kind == "attn":
        targets = [gqa_widths(model_config.num_attention_heads, model_config.num_key_value_heads, s, rules)
                   for s in levels]
        return prune_heads_gqa(W, H, model_config.head_dim, model_config.num_key_value_heads, targets,
                               damp=settings.damp, refit=settings.refit, dtype=dtype)
    counts = [ffn_width(W.shape[1], s, rules) for s in levels]
    return prune_columns_progressively(W, H, settings.channel_step, counts, damp=settings.damp,
                                       refit=settings.refit, dtype=dtype)


def _candidates_record(index: int, kind: str, levels: list[float], pruned: list[PrunedLinear],
                       config) -> ModuleCandidates:
    per_group = config.num_attention_heads // config.num_key_value_heads
    widths, params = [], []
    for p in pruned:
        if kind == "attn":
            groups = len({h // per_group for h in p.keep})
            width = LayerWidth(num_attention_heads=len(p.keep), num_key_value_heads=groups, intermediate_size=0)
            widths.append([width.num_attention_heads, width.num_key_value_heads])
            params.append(layer_params(config, width)[0])
        else:
            width = LayerWidth(num_attention_heads=0, num_key_value_heads=0, intermediate_size=len(p.keep))
            widths.append([len(p.keep)])
            params.append(layer_params(config, width)[1])
    return ModuleCandidates(layer=index // 2, kind=kind, levels=list(levels), widths=widths, params=params,
                            keep=[p.keep for p in pruned],
                            errors=[p.error / p.energy if p.energy > 0 else 0.0 for p in pruned],
                            file=module_file(index, index // 2, kind))


def _columns(kind: str, keep: list[int], head_dim: int, device) -> torch.Tensor:
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    if kind == "mlp":
        return keep_t
    return (keep_t[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


@torch.no_grad()
def build_supernet(model, calibration_ids: torch.Tensor, out_dir: str | Path, ladders: list[list[float]],
                   eea: EEAMode = "expectation", current_levels: list[float] | None = None,
                   settings: LocalPrunerRecipe = LocalPrunerRecipe(), device: str | torch.device | None = None,
                   progress: bool = True, *, model_name: str | None = None, calibration_meta: dict | None = None,
                   on_module_done: Callable[[int, torch.Tensor], None] | None = None,
                   dense_folder: str | Path | None = None, memory: MemoryRecipe = MemoryRecipe(),
                   block_sequences: int | None = None) -> SupernetManifest:
    """Build (or finish building) the supernet of a dense Llama-style ``model`` in ``out_dir``: a loaded model, or
    a StreamedModel, whose weights are read one module at a time from its folder in their stored dtype.

    ``calibration_ids``: [N, T] token ids. ``ladders``: the sparsity levels of every module, in module order
    (layer 0 attn, layer 0 mlp, layer 1 attn, ...); a candidate's index is its position in its ladder. With
    eea="current", ``current_levels`` gives each module's current level (it must be on its ladder; None = all 0).
    ``on_module_done(index, hidden)`` is called after each module is built (and committed, when a checkpoint was
    due), with the hidden states that go on to the next module. ``dense_folder``: the safetensors folder ``model``
    was loaded from; its files then hold the modules' unchanged weights instead of the supernet. A checkpoint of the
    hidden states is written when ``memory`` says it is due (time since the last one, bytes written since); a
    killed build redoes the modules since the last one. ``block_sequences``: at most this many calibration sequences
    per block of work (the unit torchrun's ranks share out; None: blocks as memory allows); under torchrun every rank
    builds the same supernet and rank 0 writes it. Returns the manifest (also in out_dir/manifest.json).
    """
    current_levels = _validate(model, calibration_ids, ladders, eea, current_levels, settings)
    device, out_dir = resolve_device(device), Path(out_dir)
    if dense_folder is None and isinstance(model, StreamedModel):
        dense_folder = model.folder
    index = tensor_index(dense_folder) if dense_folder is not None else None
    manifest = _new_manifest(model, calibration_ids, ladders, eea, current_levels, settings, model_name,
                             calibration_meta, store_dtype(model, index), block_sequences)
    if index is not None:
        manifest.dense_weights = DenseReference.of(Path(dense_folder), index)
    found = _existing_manifest(out_dir, manifest.fingerprint)
    if found is not None and found.dense_weights is not None and found.dense_weights.stale() is not None:
        found = None      # the files it reads the dense weights from changed: rebuild it
    if found is not None and found.complete:
        return found
    store = getattr(torch, manifest.store_dtype)
    builder = _ModuleBuilder(model, ladders, eea, current_levels, settings, out_dir, device,
                             seq_len=calibration_ids.shape[1], store=store, index=index,
                             block_sequences=block_sequences, memory=memory,
                             hidden_bytes=calibration_ids.numel() * model.config.hidden_size
                             * hidden_dtype(store).itemsize)
    hidden = _resume(found, manifest, out_dir, builder.hidden_device)
    distributed.barrier()        # every rank has read the partial build before rank 0 writes over it
    if not manifest.modules and distributed.is_main():  # the folder is this build's from now on
        _write_manifest(manifest, out_dir)
    if hidden is None:
        hidden = builder.embed(calibration_ids)
    num_modules, pending, due = len(ladders), [], _CheckpointDue(memory, hidden.nbytes)
    bar = tqdm(range(len(manifest.modules), num_modules), desc="supernet", unit="module", disable=not progress,
               initial=len(manifest.modules), total=num_modules)
    for index in bar:
        bar.set_postfix_str(f"layer {index // 2} {KINDS[index % 2]}")
        pending.append(builder.build(index, hidden, len(manifest.modules)))
        if index < num_modules - 1 and due(builder.bytes_written):
            _commit(manifest, pending, hidden, out_dir)
            pending = []
        if on_module_done is not None:
            on_module_done(index, hidden)
    manifest.modules.extend(pending)
    _finish(manifest, out_dir)
    distributed.barrier()        # the other ranks read the files rank 0 wrote
    return manifest


class _CheckpointDue:
    """When the next hidden-state checkpoint is due: ``checkpoint_seconds`` after the last one, and (with a
    ``checkpoint_share``) once the candidates written since make the checkpoint at most that share of them."""

    def __init__(self, memory: MemoryRecipe, checkpoint_bytes: int):
        self.memory, self.checkpoint_bytes = memory, checkpoint_bytes
        self.since, self.written_at = time.monotonic(), 0

    def __call__(self, written: int) -> bool:
        share = self.memory.checkpoint_share
        if time.monotonic() - self.since < self.memory.checkpoint_seconds or (
                share is not None and (written - self.written_at) * share < self.checkpoint_bytes):
            return False
        self.since, self.written_at = time.monotonic(), written
        return True


def candidate_columns(kind: str, levels: list[float], config, rules: WidthRules) -> list[int]:
    """Input columns of the output projection each candidate keeps (0: the module removed), by the width rules
    the local pruner follows; for attention the widest of the equally sized GQA shapes (the pruner picks one)."""
    if kind == "attn":
        return [config.head_dim * max(g * r for g, r in gqa_widths(config.num_attention_heads,
                                                                   config.num_key_value_heads, s, rules))
                for s in levels]
    return [ffn_width(config.intermediate_size, s, rules) for s in levels]


def module_file_bytes(kind: str, levels: list[float], config, rules: WidthRules, dtype: torch.dtype) -> int:
    """Bytes of one module's file when the dense model's files hold its unchanged weights: every kept candidate's
    output projection (and its entry in the safetensors header)."""
    return sum(config.hidden_size * c * dtype.itemsize + TENSOR_HEADER_BYTES
               for c in candidate_columns(kind, levels, config, rules) if c)


def store_dtype(model, index: dict[str, StoredTensor] | None) -> torch.dtype:
    """The dtype candidates are stored in: the dense weights' stored dtype (the model's, if it holds them in a
    narrower one or they come from no files)."""
    stored = index.get(tensor_name(0, "attn", "o_proj")) if index else None
    file_dtype = getattr(torch, SAFETENSORS_DTYPES[stored.dtype]) if stored and stored.dtype in SAFETENSORS_DTYPES \
        else None
    return narrower(_dtype(model), file_dtype)


def _dtype(model) -> torch.dtype:
    """The dtype a model holds its weights in (a StreamedModel: the stored one)."""
    return model.dtype if isinstance(model, StreamedModel) else next(model.parameters()).dtype


def _layer_tensors(model) -> Iterator[torch.Tensor]:
    """The decoder layers' weights, one at a time (a StreamedModel reads them from its files)."""
    if isinstance(model, StreamedModel):
        return (t for _, t in model.layer_tensors())
    return (t for name, t in model.state_dict().items() if name.startswith("model.layers."))


def hidden_device(setting: str, device: torch.device, hidden_bytes: int) -> torch.device:
    """Where the calibration hidden states live (recipe ``memory.hidden_states``): the compute device, or the
    host when asked or when on a GPU they would take more than half of its free memory."""
    if device.type == "cpu" or setting == "device":
        return device
    if setting == "host":
        return torch.device("cpu")
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return device if free is None or hidden_bytes <= free // 2 else torch.device("cpu")


def narrower(model_dtype: torch.dtype, file_dtype: torch.dtype | None) -> torch.dtype:
    return model_dtype if file_dtype is None or file_dtype.itemsize >= model_dtype.itemsize else file_dtype


def hidden_dtype(stored: torch.dtype) -> torch.dtype:
    """The calibration hidden states' dtype: bfloat16 for half-precision models (their residual stream is half
    precision too; bfloat16 has float32's range), float32 otherwise."""
    return torch.bfloat16 if stored.itemsize < 4 else torch.float32


def _validate(model, calibration_ids: torch.Tensor, ladders: list[list[float]], eea: str,
              current_levels: list[float] | None, settings: LocalPrunerRecipe) -> list[float] | None:
    """Raise TyrError on bad inputs; return the current levels the build uses (None unless eea="current")."""
    _check_dense(model)
    check_width_rules(layer_widths(model.config)[0], settings.width_rules)
    num_modules = 2 * model.config.num_hidden_layers
    if len(ladders) != num_modules:
        raise TyrError(f"got {len(ladders)} ladders; the model has {num_modules} modules (2 per layer)")
    for m, ladder in enumerate(ladders):
        if not ladder or any(not 0 <= s <= 1 for s in ladder):
            raise TyrError(f"ladder of module {m} must be a non-empty list of levels in [0, 1], got {ladder}")
    if eea not in ("expectation", "current", "none"):
        raise TyrError(f"eea must be expectation, current or none, got {eea!r}")
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0:
        raise TyrError("calibration ids must be a non-empty [sequences, tokens] tensor, "
                       f"got {tuple(calibration_ids.shape)}")
    if eea != "current":
        return None
    current_levels = list(current_levels) if current_levels is not None else [0.0] * num_modules
    if len(current_levels) != num_modules:
        raise TyrError(f"got {len(current_levels)} current levels for {num_modules} modules")
    for m, (level, ladder) in enumerate(zip(current_levels, ladders)):
        if level_index(ladder, level) is None:
            raise TyrError(f"current level {level} of module {m} is not on its ladder {ladder}")
    return current_levels


def _new_manifest(model, calibration_ids: torch.Tensor, ladders: list[list[float]], eea: str,
                  current_levels: list[float] | None, settings: LocalPrunerRecipe, model_name: str | None,
                  calibration_meta: dict | None, stored: torch.dtype,
                  block_sequences: int | None = None) -> SupernetManifest:
    """The manifest of an empty build, with the fingerprint of everything that determines its bytes."""
    config, dtype = model.config, _dtype(model)
    num_sequences, seq_len = calibration_ids.shape
    calib = {"sequences": num_sequences, "seq_len": seq_len, "tokens": num_sequences * seq_len,
             "sha256": calibration.ids_digest(calibration_ids)} | dict(calibration_meta or {})
    identity = {
        "version": FORMAT_VERSION, "config": {k: v for k, v in config.to_dict().items()
                                              if k not in ("_name_or_path", "transformers_version", "architectures",
                                                           "auto_map")},
        "dtype": str(dtype), "store_dtype": str(stored), "ids": calib["sha256"], "ladders": ladders, "eea": eea,
        "current": current_levels,
        "settings": settings.model_dump(), "weights": calibration.tensors_digest(_layer_tensors(model))}
    if block_sequences is not None:      # the order Hessian sums are added in; only when set, as before
        identity["block_sequences"] = block_sequences
    digest = fingerprint(identity)
    return SupernetManifest(
        model=model_name or getattr(config, "_name_or_path", "") or "model", hidden_size=config.hidden_size,
        head_dim=head_dim_of(config), num_layers=config.num_hidden_layers,
        family=family_of(config).name,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size, dtype=str(dtype).removeprefix("torch."),
        store_dtype=str(stored).removeprefix("torch."), eea=eea,
        current_levels=current_levels, settings=settings, calibration=calib, fingerprint=digest, modules=[])


def _existing_manifest(out_dir: Path, digest: str) -> SupernetManifest | None:
    """The manifest already in ``out_dir`` if it is this build's (None for an empty or absent folder)."""
    if not (out_dir / MANIFEST).is_file():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise TyrError(f"{out_dir} exists and is not a supernet folder (no {MANIFEST}); choose an empty folder")
        return None
    try:
        found = SupernetManifest.model_validate_json((out_dir / MANIFEST).read_text())
    except ValueError as err:
        raise TyrError(f"{out_dir / MANIFEST} is not a readable supernet manifest ({err}); "
                       "remove the folder or choose another") from err
    if found.version < FORMAT_VERSION:
        return None       # an earlier format (dense weights copied, float32): rebuilt in place
    if found.fingerprint != digest:
        raise TyrError(f"{out_dir} holds a supernet built from different inputs (model weights, calibration "
                       "data, ladders, EEA mode or settings); remove it or choose another folder")
    return found


def _resume(found: SupernetManifest | None, manifest: SupernetManifest, out_dir: Path,
            device: torch.device) -> torch.Tensor | None:
    """Take over a partial build's finished modules; return its hidden states (None: start from the embedding).

    Also removes what a killed run may leave: unfinished temp files, a checkpoint the manifest does not point to.
    """
    hidden = None
    if found is not None and found.dense_weights != manifest.dense_weights:
        found = None      # its modules read the dense weights from other files: start over
    if found is not None and found.modules:
        if found.checkpoint is None or not (out_dir / found.checkpoint).is_file():
            raise TyrError(f"{out_dir}: the hidden-state checkpoint of the partial build is missing; "
                           "remove the folder and rebuild")
        hidden = load_file(out_dir / found.checkpoint)["hidden"].to(device)
        manifest.modules, manifest.checkpoint = found.modules, found.checkpoint
    elif found is not None:
        manifest.modules = found.modules
    if not distributed.is_main():
        return hidden
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [*out_dir.glob(".*.tmp-*"), *out_dir.glob("modules/.*.tmp-*"), *out_dir.glob("checkpoint-*")]
    for path in stale:
        if path.name != manifest.checkpoint:
            path.unlink(missing_ok=True)
    return hidden


class _ModuleBuilder:
    """Builds one module of the supernet at a time: its Hessian, its candidates on disk, and the next module's
    input (the hidden states, updated in place)."""

    def __init__(self, model, ladders: list[list[float]], eea: str, current_levels: list[float] | None,
                 settings: LocalPrunerRecipe, out_dir: Path, device: torch.device, seq_len: int,
                 store: torch.dtype, index: dict[str, StoredTensor] | None,
                 block_sequences: int | None = None, memory: MemoryRecipe = MemoryRecipe(), hidden_bytes: int = 0):
        self.model, self.config = model, model.config
        self.ladders, self.eea, self.current_levels = ladders, eea, current_levels
        self.settings, self.out_dir, self.device = settings, out_dir, device
        self.block_sequences = block_sequences
        self.parts = DenseParts.from_model(model, with_head=False)   # the builder never needs logits
        self.store, self.hidden_dtype, self.index = store, hidden_dtype(store), index
        self.bytes_written = 0      # by the module files
        self.positions = self.parts.positions(seq_len, device=device)
        self.hidden_device = hidden_device(memory.hidden_states, device, hidden_bytes)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The first module's input, embedded a memory chunk at a time (no float32 copy of it all)."""
        hidden = torch.empty(*ids.shape, self.config.hidden_size, dtype=self.hidden_dtype, device=self.hidden_device)
        table = self.parts.embed_tokens
        for sl in calibration.sequence_chunks(ids.shape[0], ids.shape[1], self.config.hidden_size):
            hidden[sl] = self.parts.embed(ids[sl].to(table.device)).to(self.hidden_device, self.hidden_dtype)
        self.parts.embed_tokens = None       # only the first module's input needs the table: free it
        return hidden

    def build(self, index: int, hidden: torch.Tensor, done: int) -> ModuleCandidates:
        """Prune module ``index`` on ``hidden`` (its input), write its candidates, and move ``hidden`` on."""
        layer, kind = index // 2, KINDS[index % 2]
        dense = {k: v.to(self.device, torch.float32) for k, v in module_weights(self.model, layer, kind).items()}
        W = dense[OUTPUT_PROJECTION[kind]]
        inputs = calibration.ModuleInputs(hidden, self._activation(kind, dense, layer), W.shape[1],
                                          block_sequences=self.block_sequences, device=self.device)
        levels = self.ladders[index]
        pruned = _prune_module(kind, W, inputs.hessian(), levels, self.config, self.settings)
        record = _candidates_record(index, kind, levels, pruned, self.config)
        self._write_candidates(layer, kind, pruned, record, done)
        self._propagate(hidden, inputs, kind, dense, pruned, index)
        return record

    def _activation(self, kind: str, dense: dict[str, torch.Tensor],
                    layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The input of the module's output projection, as a function of the hidden states."""
        parts, config = self.parts, self.config
        if kind == "attn":
            cos, sin, window = self.positions[layer]
            return lambda x: attention_heads(x.to(torch.float32), dense, config.num_attention_heads,
                                             config.num_key_value_heads, cos.to(torch.float32),
                                             sin.to(torch.float32), parts.head_dim, parts.eps, style=parts.style,
                                             window=window)
        return lambda x: mlp_hidden(x.to(torch.float32), dense, parts.eps, style=parts.style)

    def _write_candidates(self, layer: int, kind: str, pruned: list[PrunedLinear], record: ModuleCandidates,
                          done: int) -> None:
        """One file per module: each candidate's updated output projection, and the shared dense parts the dense
        model's files do not hold."""
        out_name = OUTPUT_PROJECTION[kind]
        tensors = {}
        for key, value in module_weights(self.model, layer, kind).items():
            if key == out_name:
                continue
            if (ref := self._reference(layer, kind, key, value)) is not None:
                record.referenced[key] = ref
            else:
                tensors[f"dense.{key}"] = value
        for c, p in enumerate(pruned):
            if p.keep:
                tensors[f"cand{c}.{out_name}"] = p.weight.to(self.store, copy=True)  # no shared storage
        if distributed.is_main():
            self.bytes_written += _save_tensors(tensors, self.out_dir / record.file, done, self.out_dir)

    def _reference(self, layer: int, kind: str, key: str, value: torch.Tensor) -> TensorRef | None:
        """Where the dense model's files hold exactly this weight (None: they do not; it is copied)."""
        name = tensor_name(layer, kind, key)
        stored = self.index.get(name) if self.index else None
        if stored is None:
            return None
        with safe_open(stored.file, framework="pt") as f:
            on_disk = f.get_tensor(name)
        if on_disk.shape != value.shape or not torch.equal(on_disk.to(value.dtype), value.cpu()):
            return None
        return TensorRef(file=stored.file.name, tensor=name)

    def _propagate(self, hidden: torch.Tensor, inputs: calibration.ModuleInputs, kind: str,
                   dense: dict[str, torch.Tensor], pruned: list[PrunedLinear], index: int) -> None:
        """Add the module's update to ``hidden``: a mixture of candidate outputs is one matmul with the mixed
        weights (the EEA mode picks the mixture). Each rank updates its chunks, then all ranks share them."""
        out_name = OUTPUT_PROJECTION[kind]
        W = dense[out_name]
        if self.eea == "none":
            mixed, bias_weight = W, 1.0
        else:
            current = self.current_levels[index] if self.current_levels else None
            weights = _mixture(self.eea, self.ladders[index], current)
            mixed, bias_weight = torch.zeros_like(W), 0.0
            for p, weight in zip(pruned, weights):
                if weight and p.keep:
                    columns = _columns(kind, p.keep, self.parts.head_dim, self.device)
                    mixed[:, columns] += weight * p.weight.to(self.device, torch.float32)
                    bias_weight += weight
        bias = dense.get(f"{out_name}.bias")
        for sl, act in inputs.chunks():
            update = F.linear(act, mixed)
            if bias is not None:
                update += bias_weight * bias
            update = output_norm(update, dense, kind, self.parts.eps, self.parts.style)  # Gemma 3's post-norms
            hidden[sl] = (hidden[sl].to(self.device, torch.float32) + update).to(hidden.device, hidden.dtype)
        distributed.share_rows(hidden, inputs.slices)


def _commit(manifest: SupernetManifest, records: list[ModuleCandidates], hidden: torch.Tensor,
            out_dir: Path) -> None:
    """Checkpoint the hidden states, then record the modules built since the last commit in the manifest (the
    commit point)."""
    index = len(manifest.modules) + len(records) - 1
    checkpoint = f"checkpoint-{index:03d}.safetensors"
    if distributed.is_main():
        _save_tensors({"hidden": hidden}, out_dir / checkpoint, len(manifest.modules), out_dir)
    previous = manifest.checkpoint
    manifest.modules.extend(records)
    manifest.checkpoint = checkpoint
    if not distributed.is_main():
        return
    _write_manifest(manifest, out_dir)
    if previous and previous != checkpoint:
        (out_dir / previous).unlink(missing_ok=True)


def _finish(manifest: SupernetManifest, out_dir: Path) -> None:
    """Mark the build complete and drop the last hidden-state checkpoint."""
    last = manifest.checkpoint
    manifest.checkpoint, manifest.complete = None, True
    if not distributed.is_main():
        return
    _write_manifest(manifest, out_dir)
    if last:
        (out_dir / last).unlink(missing_ok=True)


# ----- reading -----

class Supernet:
    """A built supernet on disk; candidates load lazily (memory-mapped safetensors, small LRU cache)."""

    def __init__(self, directory: Path, manifest: SupernetManifest, cache_size: int = 16):
        self.directory, self.manifest, self.cache_size = directory, manifest, cache_size
        self._cache: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()

    @classmethod
    def open(cls, directory: str | Path, cache_size: int = 16) -> "Supernet":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise TyrError(f"{directory} is not a supernet folder (no {MANIFEST})")
        try:
            manifest = SupernetManifest.model_validate_json(path.read_text())
        except ValueError as err:
            raise TyrError(f"{path} is not a readable supernet manifest: {err}") from err
        if not manifest.complete:
            raise TyrError(f"{directory} holds a partial supernet ({len(manifest.modules)} of "
                           f"{2 * manifest.num_layers} modules); rerun the build to finish it")
        if manifest.dense_weights is not None:
            manifest.dense_weights.check(directory)
        return cls(directory, manifest, cache_size)

    @property
    def num_modules(self) -> int:
        return len(self.manifest.modules)

    def weights(self, module: int, candidate: int) -> dict[str, torch.Tensor]:
        """The weight dict of one candidate (layerwise names; {} when the candidate removes the module)."""
        key = (module, candidate)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        record = self.manifest.modules[module]
        if not 0 <= candidate < len(record.levels):
            raise TyrError(f"module {module} has {len(record.levels)} candidates, not {candidate + 1}")
        keep = record.keep[candidate]
        w: dict[str, torch.Tensor] = {}
        if keep:
            head_dim = self.manifest.head_dim
            per_group = self.manifest.num_attention_heads // self.manifest.num_key_value_heads
            out_name = OUTPUT_PROJECTION[record.kind]
            with safe_open(self.directory / record.file, framework="pt") as f:
                for name in f.keys():
                    if name.startswith("dense."):
                        w[name.removeprefix("dense.")] = f.get_tensor(name)
                w[out_name] = f.get_tensor(f"cand{candidate}.{out_name}")
            w.update(self._referenced(record))
            if record.kind == "attn":
                groups = sorted({h // per_group for h in keep})
                for name, blocks in (("q_proj", keep), ("k_proj", groups), ("v_proj", groups)):
                    rows = _columns("attn", blocks, head_dim, "cpu")
                    for key_name in (name, f"{name}.bias"):
                        if key_name in w:
                            w[key_name] = w[key_name].index_select(0, rows)
            else:
                rows = torch.tensor(keep, dtype=torch.long)
                for key_name in ("gate_proj", "up_proj", "gate_proj.bias", "up_proj.bias"):
                    if key_name in w:
                        w[key_name] = w[key_name].index_select(0, rows)
        self._cache[key] = w
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return w

    def _referenced(self, record: ModuleCandidates) -> dict[str, torch.Tensor]:
        """The module's unchanged weights, read from the dense model's files."""
        folder, out = Path(self.manifest.dense_weights.folder) if record.referenced else None, {}
        for key, ref in record.referenced.items():
            with safe_open(folder / ref.file, framework="pt") as f:
                out[key] = f.get_tensor(ref.tensor)
        return out

    def params(self, choice: list[int]) -> int:
        """Decoder-layer weight parameters of the model that ``choice`` (a candidate per module) assembles."""
        self._check_choice(choice)
        return sum(m.params[c] for m, c in zip(self.manifest.modules, choice))

    def _check_choice(self, choice: list[int]) -> None:
        if len(choice) != self.num_modules:
            raise TyrError(f"a choice needs one candidate per module ({self.num_modules}), got {len(choice)}")
        for m, (record, c) in enumerate(zip(self.manifest.modules, choice)):
            if not 0 <= c < len(record.levels):
                raise TyrError(f"choice[{m}]={c}: module {m} has {len(record.levels)} candidates")

    @torch.no_grad()
    def assemble(self, model, choice: list[int]):
        """The physically smaller tyr model made of the chosen candidates (embeddings etc. from ``model``), in the
        dtype ``model`` holds or stores its weights in."""
        tensors = self.pruned_tensors(model, choice)
        device = "cpu" if isinstance(model, StreamedModel) else next(model.parameters()).device
        return build_model(tensors, model.generation_config, device)

    def pruned_tensors(self, model, choice: list[int]) -> SlicedTensors:
        """The chosen model as a stream of tensors (slicing.sliced_tensors with each module's refitted output
        projection from its candidate file), to build or to write a layer at a time."""
        self._check_choice(choice)
        config, m = model.config, self.manifest
        if (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) != \
                (m.num_layers, m.hidden_size, m.num_attention_heads, m.intermediate_size):
            raise TyrError("the model does not match the supernet's dense architecture")
        _check_dense(model)
        records = m.modules
        keeps = [LayerKeep(keep_heads=records[2 * i].keep[choice[2 * i]],
                           keep_ffn=records[2 * i + 1].keep[choice[2 * i + 1]]) for i in range(m.num_layers)]
        sliced = sliced_tensors(model, keeps)
        projections = {tensor_name(i // 2, r.kind, OUTPUT_PROJECTION[r.kind]): i for i, r in enumerate(records)}

        def parts() -> Iterator[dict[str, torch.Tensor]]:
            for part in sliced.parts:
                yield {name: self.output_projection(projections[name], choice[projections[name]])
                       if name in projections else tensor for name, tensor in part.items()}

        return sliced._replace(parts=parts())

    def output_projection(self, module: int, candidate: int) -> torch.Tensor:
        """One candidate's refitted o_proj / down_proj, read alone from its module file."""
        record = self.manifest.modules[module]
        with safe_open(self.directory / record.file, framework="pt") as f:
            return f.get_tensor(f"cand{candidate}.{OUTPUT_PROJECTION[record.kind]}")

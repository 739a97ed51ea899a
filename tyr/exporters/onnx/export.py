"""export_onnx: a dense or pruned (heterogeneous-width) model folder -> an ONNX folder for onnxruntime(-genai).

The folder holds model.onnx (plus model.onnx.data when the weights are external), genai_config.json, the
source's tokenizer files and export_info.json (an OnnxExportResult, validation report included). It is built in a
temporary folder and renamed into place only after validation passes, so a failed export leaves nothing that
looks finished.

Optimization level: the graph file stays unoptimized plain ONNX (portable across execution providers and
hardware); the chosen level is written into genai_config.json's session options and export_info.json, and
onnxruntime applies it when a session is created (our runner and benchmark read it from export_info.json).
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

from tyr.atomic import atomic_dir, atomic_write_json, check_output_path, exclusive
from tyr.errors import TyrError
from tyr.exporters.onnx.layout import GraphLayout
from tyr.exporters.onnx.runner import OPT_LEVELS, OptLevel
from tyr.exporters.onnx.validate import ValidationReport
from tyr.exporters.onnx.variants import DTYPES

log = logging.getLogger(__name__)

Dtype = Literal["fp32", "fp16", "int8"]
MODEL_FILE = "model.onnx"
INFO_FILE = "export_info.json"
GENAI_CONFIG_FILE = "genai_config.json"
OPSET = 17
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class OnnxExportResult(BaseModel):
    """What an export wrote (saved as export_info.json beside the graph)."""

    out_dir: str
    model_file: str
    external_data_file: str | None
    source_model: str
    dtype: str
    opt_level: str
    opset: int
    layout: GraphLayout
    input_names: list[str]
    output_names: list[str]
    parameters: int
    folder_bytes: int
    export_seconds: float
    validation: ValidationReport | None
    versions: dict[str, str]

    @property
    def model_path(self) -> Path:
        return Path(self.out_dir) / self.model_file


def _versions() -> dict[str, str]:
    out = {}
    for name in ("tyr", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_args(dtype: str, opt_level: str) -> None:
    if dtype not in DTYPES:
        raise TyrError(f"unsupported ONNX dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if opt_level not in OPT_LEVELS:
        raise TyrError(f"unknown graph optimization level {opt_level!r}: choose one of {', '.join(OPT_LEVELS)}")


def trace(model, layout: GraphLayout, path: Path, opset: int = OPSET) -> None:
    """torch.onnx.export (TorchScript-based exporter: seconds, exact) of the lean export module."""
    import warnings

    from tyr.exporters.onnx.graph_model import ExportCausalLM, example_inputs

    module = ExportCausalLM(model, layout).eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-int shapes: those shapes are static
        torch.onnx.export(module, example_inputs(layout, dtype), str(path), input_names=layout.input_names,
                          output_names=layout.output_names, dynamic_axes=layout.dynamic_axes(),
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def _half(model):
    """An fp16 copy whose rotary inverse frequencies stay float32 (.half() would round them to 3 digits, so
    angles at position p would be off by about p/1000 radians)."""
    half = copy.deepcopy(model).half()
    half.model.rotary_emb.to(torch.float32)
    return half


def _copy_tokenizer(source: str, tokenizer, out: Path) -> None:
    folder = Path(source)
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []
    for name in copied:
        shutil.copy(folder / name, out / name)
    if "tokenizer.json" not in copied and tokenizer is not None:
        tokenizer.save_pretrained(out)


def export_onnx(model_dir: str | Path | None, out_dir: str | Path, dtype: Dtype = "fp32", opt_level: OptLevel = "all",
                check: bool = True, *, external_data: bool | None = None, overwrite: bool = False,
                validate_steps: int = 32, atol: float = 1e-4, min_agreement: float | None = None,
                check_genai: bool = True, strict: bool = False, trust_remote_code: bool = False) -> OnnxExportResult:
    """Export the model in ``model_dir`` (a folder, hub id or "default") to an ONNX folder ``out_dir``.

    external_data: None = only when the weights exceed protobuf's 2 GiB limit; True forces one external file.
    check: validate against PyTorch (see validate.py for the rules); a failed check raises TyrError and writes
    nothing.
    """
    import onnx

    from tyr.exporters.onnx.genai_config import genai_config
    from tyr.exporters.onnx.layout import graph_layout
    from tyr.exporters.onnx.validate import validate_export
    from tyr.exporters.onnx.variants import EXTERNAL_DATA_THRESHOLD_BYTES, file_bytes, quantize_int8, save_graph
    from tyr.models.io import load_model, resolve_model_path

    _check_args(dtype, opt_level)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TyrError(f"{out_dir} already exists (pass --overwrite to replace it)")
    check_output_path(out_dir)
    started = time.perf_counter()
    source = resolve_model_path(model_dir)
    model, tokenizer = load_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    layout = graph_layout(model)
    traced = _half(model) if dtype == "fp16" else model
    weight_bytes = sum(p.numel() * p.element_size() for p in traced.parameters())
    if model.config.tie_word_embeddings:  # the graph stores the embedding and a transposed copy for lm_head
        weight_bytes += traced.lm_head.weight.numel() * traced.lm_head.weight.element_size()
    use_external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES

    with exclusive(out_dir), atomic_dir(out_dir, overwrite=overwrite) as tmp:
        raw = tmp / ".trace"
        raw.mkdir()
        log.info("tracing %s (%s, %d layers, %d with attention)", source, dtype, layout.num_layers,
                 len(layout.kv_layers))
        trace(traced, layout, raw / MODEL_FILE)
        traced = None  # frees the fp16 copy; the fp32 model stays as the validation reference
        graph_path = raw / MODEL_FILE
        if dtype == "int8":
            quantize_int8(raw / MODEL_FILE, raw / "int8.onnx", external_data=use_external)
            graph_path = raw / "int8.onnx"
        graph = onnx.load(str(graph_path))  # pulls in per-tensor external files written for >2 GiB models
        graph.producer_name, graph.doc_string = "tyr", f"tyr export of {source} ({dtype})"
        data_file = save_graph(graph, tmp / MODEL_FILE, use_external)
        del graph
        shutil.rmtree(raw)

        _copy_tokenizer(source, tokenizer, tmp)
        atomic_write_json(tmp / GENAI_CONFIG_FILE,
                          genai_config(model.config, MODEL_FILE, opt_level, getattr(model, "generation_config", None)))
        report = None
        if check:
            eos = model.config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            report = validate_export(model, tmp, MODEL_FILE, dtype, opt_level, tokenizer, steps=validate_steps,
                                     atol=atol, min_agreement=min_agreement, check_genai=check_genai,
                                     eos_token_ids=eos_ids, strict=strict)
            log.info("validation: prefill diff %.2e, decode diff %.2e, agreement %.3f, genai %s",
                     report.prefill_max_abs_diff, report.decode_max_abs_diff, report.token_agreement,
                     report.genai_tokens_match)
            if not report.passed:
                raise TyrError(f"ONNX export of {source} failed validation ({report.rule}): "
                               + "; ".join(report.failures))
        result = OnnxExportResult(
            out_dir=str(out_dir), model_file=MODEL_FILE, external_data_file=data_file, source_model=source,
            dtype=dtype, opt_level=opt_level, opset=OPSET, layout=layout, input_names=layout.input_names,
            output_names=layout.output_names, parameters=sum(p.numel() for p in model.parameters()),
            folder_bytes=file_bytes(tmp), export_seconds=round(time.perf_counter() - started, 2),
            validation=report, versions=_versions())
        atomic_write_json(tmp / INFO_FILE, result.model_dump(mode="json"))
    return result


def load_export_info(folder: str | Path) -> OnnxExportResult:
    """The export_info.json of an export folder (raises TyrError naming the problem)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise TyrError(f"{folder} is not a tyr ONNX export (no {INFO_FILE}); run `tyr export onnx` first")
    try:
        return OnnxExportResult.model_validate_json(path.read_text())
    except ValueError as err:
        raise TyrError(f"{path} is not a valid export record: {err}") from err

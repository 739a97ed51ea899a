"""Export a dense or pruned model as a folder vLLM serves: ``export_vllm(model_dir, out_dir) -> ExportResult``.

Formats:
- "tyr": the tyr_llama / tyr_qwen2 / tyr_qwen3 / tyr_gemma3 folder (per_layer_config, standard tensor names). Served
  at native speed by vLLM with tyr installed (its plugin registers the model class); without tyr, by vLLM's
  Transformers backend with --trust-remote-code, as long as every layer keeps its attention (that backend needs an
  attention in every layer; checked for Llama and Qwen3 folders, not for Gemma 3 ones).
- "deci": DeciLM / nemotron-nas block configs, served by stock vLLM's DeciLMForCausalLM with --trust-remote-code;
  only for models that keep every query head (KV groups, FFN widths and removed blocks may vary).

The folder is built in a temporary directory, checked (vLLM and transformers must produce the same greedy tokens
in fp32) and only then renamed to ``out_dir``: a failed export leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tyr.atomic import atomic_dir, check_output_path, exclusive
from tyr.errors import TyrError
from tyr.exporters.vllm.check import DEFAULT_PROMPTS, CheckResult, check_folder
from tyr.models.facts import LayerWidth, supported_tensor_parallel

log = logging.getLogger(__name__)

Format = Literal["tyr", "deci"]
FORMATS: tuple[str, ...] = ("tyr", "deci")
RESULT_FILE = "tyr_export.json"


class ExportResult(BaseModel):
    out_dir: str
    fmt: Format
    source: str
    architecture: str = Field(description="the architecture vLLM builds for the folder")
    layer_widths: list[tuple[int, int, int]] = Field(description="(query heads, KV heads, FFN width) per layer")
    tensor_parallel_sizes: list[int] = Field([], description="vLLM --tensor-parallel-size values (1 to 8) the layer "
                                             "widths allow: each layer's query heads and FFN width divide by it, its "
                                             "KV heads divide by it or divide it")
    needs_trust_remote_code: bool = Field(description="whether vLLM needs --trust-remote-code for this folder")
    transformers_backend: bool = Field(description="whether vLLM's Transformers backend can also serve it "
                                                   "(--trust-remote-code, tyr not installed)")
    serve_command: str
    check: CheckResult | None = None


def serve_command(out_dir: Path, trust_remote_code: bool) -> str:
    flags = " --trust-remote-code" if trust_remote_code else ""
    return f"python -m vllm.entrypoints.openai.api_server --model {out_dir} --host 127.0.0.1{flags}"


def _read_config(source: str):
    from transformers import AutoConfig

    from tyr.models import register_auto_classes
    from tyr.models.io import check_supported

    register_auto_classes()
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise TyrError(f"cannot read the model config of {source}: {err}") from err
    check_supported(config.to_dict(), source)
    return config


def _save_dtype(config):
    import torch

    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), torch.float32)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _write_deci(model, tokenizer, folder: Path) -> None:
    from tyr.exporters.vllm.deci import CONFIGURATION_FILE, deci_config_dict

    config_dict = deci_config_dict(model.config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    shutil.copy(CONFIGURATION_FILE, folder / CONFIGURATION_FILE.name)


def export_vllm(model_dir: str | Path, out_dir: str | Path, check: bool = True, fmt: Format = "tyr",
                overwrite: bool = False, prompts: list[str] | None = None, max_new_tokens: int = 16,
                timeout: float = 1200) -> ExportResult:
    """Write ``model_dir`` (a tyr-pruned or dense Llama/Mistral/Qwen2/Qwen3/Gemma 3 folder) as a vLLM-servable folder at
    ``out_dir``.

    With ``check``, vLLM (in a subprocess) and transformers must produce the same greedy tokens on ``prompts`` (fp32),
    vLLM must build the expected model class and allocate KV cache exactly for the layers that keep attention, with
    each layer's KV-head count; otherwise TyrError and no ``out_dir``.
    """
    import torch

    from tyr.models.families import family_of
    from tyr.models.io import load_model, resolve_model_path, save_model
    from tyr.models.slicing import to_tyr

    if fmt not in FORMATS:
        raise TyrError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite to replace it)")
    check_output_path(out_dir)
    source = resolve_model_path(model_dir)
    config = _read_config(source)
    if Path(source).is_dir():
        from tyr.exporters.vllm.weights import check_weights

        check_weights(source, config)
    model, tokenizer = load_model(source, dtype=torch.float32)
    if tokenizer is None:
        raise TyrError(f"{source} has no tokenizer: vLLM needs one to serve the model")
    model = to_tyr(model)
    widths = [tuple(w) for w in model.config.layer_widths()]
    if fmt == "deci":
        from tyr.exporters.vllm.deci import ARCHITECTURE as DECI_ARCHITECTURE, block_configs

        if (family := family_of(model.config).name) != "llama":
            raise TyrError(f"the DeciLM (nemotron-nas) format holds Llama layers only, not {family} ones (q/k/v "
                           "biases, q/k norms): export it with format 'tyr' instead")
        block_configs(model.config)  # refuse before writing anything
        architecture, trust_remote_code, transformers_backend = DECI_ARCHITECTURE, True, False
    else:
        architecture, trust_remote_code = family_of(model.config).architecture, False
        transformers_backend = all(heads > 0 for heads, _, _ in widths)
    result = ExportResult(out_dir=str(out_dir), fmt=fmt, source=str(source), architecture=architecture,
                          layer_widths=widths,
                          tensor_parallel_sizes=supported_tensor_parallel([LayerWidth(*w) for w in widths]),
                          needs_trust_remote_code=trust_remote_code,
                          transformers_backend=transformers_backend,
                          serve_command=serve_command(out_dir, trust_remote_code))

    save_dtype = _save_dtype(config)
    with exclusive(out_dir), atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.to(save_dtype)
        if fmt == "tyr":
            save_model(model, tokenizer, tmp, overwrite=True)  # replaces tmp atomically with the saved folder
        else:
            _write_deci(model, tokenizer, tmp)
        if check:
            if fmt == "tyr":  # the exported folder itself, loaded by transformers without trust_remote_code
                from transformers import AutoModelForCausalLM

                reference = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            else:  # transformers cannot load nemotron-nas: the model whose weights were written is the reference
                reference = model.float().eval()
            prompt_ids = [tokenizer(p).input_ids for p in (prompts or DEFAULT_PROMPTS)]
            expected_kv = {i: kv for i, (heads, kv, _) in enumerate(widths) if heads > 0}
            log.info("checking %s in vLLM against transformers (%d prompts, %d tokens each)", out_dir,
                     len(prompt_ids), max_new_tokens)
            try:
                result.check = check_folder(tmp, reference, prompt_ids, max_new_tokens, architecture, expected_kv,
                                            trust_remote_code=trust_remote_code, timeout=timeout)
            except TyrError as err:
                plugin_missing = fmt == "tyr" and ("trust_remote_code" in str(err) or "not supported" in str(err))
                hint = ("\nIs tyr's vLLM plugin loaded? Install the project (entry point vllm.general_plugins); if "
                        "VLLM_PLUGINS is set it must include 'tyr'." if plugin_missing else "")
                raise TyrError(f"export check failed, {out_dir} not written: {err}{hint}") from err
            if not result.check.passed:
                raise TyrError(f"export check failed, {out_dir} not written: " + "; ".join(result.check.problems))
        (tmp / RESULT_FILE).write_text(result.model_dump_json(indent=1) + "\n")
    return result

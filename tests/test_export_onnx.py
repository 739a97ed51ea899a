"""ONNX export: heterogeneous models (a layer without attention, one without MLP) in onnxruntime and
onnxruntime-genai, parity with PyTorch, variants, external data, bad input, and the benchmark command."""

import json

import numpy as np
import onnx
import pytest
import torch

from tyr.cli import main
from tyr.errors import TyrError
from tyr.exporters.onnx.decoding import OrtStepper, TorchStepper, decode
from tyr.exporters.onnx.export import export_onnx, load_export_info
from tyr.exporters.onnx.runner import OrtCausalLM
from tyr.models.io import load_model, save_model
from tyr.testing import tiny_hetero

from helpers import genai_greedy

VOCAB = 49152  # SmolLM2's, so the real tokenizer works with the tiny model
WIDTHS = [(0, 0, 96), (4, 2, 48), (2, 1, 0), (2, 1, 40)]  # layer 0: no attention; layer 2: no MLP


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own generate(): an independent reference for greedy tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny") / "hetero"
    save_model(tiny_hetero(vocab_size=VOCAB, widths=WIDTHS), AutoTokenizer.from_pretrained(default_model_dir), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_export(tiny_dir, tmp_path_factory):
    return export_onnx(tiny_dir, tmp_path_factory.mktemp("onnx") / "fp32", dtype="fp32")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)[0]


def test_graph_interface_per_layer_kv(tiny_export):
    assert tiny_export.validation.passed and tiny_export.external_data_file is None
    assert [(kv.layer, kv.kv_heads) for kv in tiny_export.layout.kv_layers] == [(1, 2), (2, 1), (3, 1)]
    graph = onnx.load(str(tiny_export.model_path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.graph.input, *graph.graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["position_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["logits"] == ["batch", "sequence", VOCAB]
    assert dims["past_key_values.1.key"] == ["batch", 2, "past_sequence", 16]
    assert dims["past_key_values.3.value"] == ["batch", 1, "past_sequence", 16]
    assert dims["present.2.key"] == ["batch", 1, "total_sequence", 16]
    assert not any(name.startswith(("past_key_values.0.", "present.0.")) for name in dims)  # layer 0: no attention
    config = json.loads((tiny_export.model_path.parent / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert config["model"]["decoder"]["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert (tiny_export.model_path.parent / "tokenizer.json").is_file()
    assert load_export_info(tiny_export.out_dir) == tiny_export


def test_onnxruntime_matches_pytorch_left_padded(tiny_export, tiny_model):
    prompts = [list(range(100, 117)), [7, 8000, 31000, 12, 5]]  # the second is left-padded by 12
    reference = decode(TorchStepper(tiny_model), prompts, 32)
    for opt_level in ("disable", "all"):
        runner = OrtCausalLM(tiny_export.model_path, opt_level=opt_level)
        free = decode(OrtStepper(runner), prompts, 32)  # free-running greedy
        assert np.array_equal(free.tokens, reference.tokens)
        real = reference.prompt_mask.astype(bool)
        assert np.abs(free.prefill_logits - reference.prefill_logits)[real].max() <= 1e-4
        assert np.abs(free.step_logits - reference.step_logits).max() <= 1e-4
    # and the single-prompt tokens are transformers' generate() tokens
    assert reference.tokens[0, :17].tolist() == hf_greedy(tiny_model, prompts[0], 17)


def test_onnxruntime_genai_generates_pytorch_tokens(tiny_export, tiny_model):
    prompt, tokens = genai_greedy(tiny_export.model_path.parent, "The capital of France is", 20)
    assert len(prompt) > 3
    expected = hf_greedy(tiny_model, prompt, 20)
    assert tokens == expected[:len(tokens)] and (len(tokens) == 20 or tokens[-1] == 2)


def test_dense_mistral_export(tmp_path, default_model_dir):
    """A dense (non-tyr) architecture exports through the same path: every layer has a cache."""
    from transformers import AutoTokenizer

    from tyr.testing import tiny_llama

    tiny_llama("mistral", layers=2).save_pretrained(tmp_path / "mistral")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(tmp_path / "mistral")
    result = export_onnx(tmp_path / "mistral", tmp_path / "onnx", check_genai=False)
    assert result.validation.passed and result.validation.max_abs_diff <= 1e-4
    assert [kv.layer for kv in result.layout.kv_layers] == [0, 1]
    config = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert config["model"]["type"] == "mistral"


def test_external_data_single_file(tiny_dir, tiny_export, tmp_path):
    result = export_onnx(tiny_dir, tmp_path / "ext", external_data=True, check=False)
    folder = tmp_path / "ext"
    assert result.external_data_file == "model.onnx.data"
    assert sorted(p.name for p in folder.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert (folder / "model.onnx").stat().st_size < 200_000 < (folder / "model.onnx.data").stat().st_size
    prompts = [[5, 6, 7, 8, 9, 10]]
    a = decode(OrtStepper(OrtCausalLM(folder / "model.onnx")), prompts, 4)
    b = decode(OrtStepper(OrtCausalLM(tiny_export.model_path)), prompts, 4)
    assert np.array_equal(a.step_logits, b.step_logits)
    _, tokens = genai_greedy(folder, "Hello", 5)
    assert len(tokens) >= 1


@pytest.mark.parametrize("dtype, weight_op", [("fp16", "MatMul"), ("int8", "MatMulInteger")])
def test_fp16_and_int8_variants(tiny_dir, tmp_path, dtype, weight_op):
    result = export_onnx(tiny_dir, tmp_path / dtype, dtype=dtype)
    report = result.validation
    assert report.passed and report.genai_tokens_match
    assert 0 < report.max_abs_diff < 5  # rounding error, reported rather than bounded
    assert report.token_agreement >= {"fp16": 0.9, "int8": 0.75}[dtype]
    graph = onnx.load(str(result.model_path))
    assert weight_op in {n.op_type for n in graph.graph.node}
    past_type = next(i for i in graph.graph.input if i.name == "past_key_values.1.key").type.tensor_type.elem_type
    assert past_type == (onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT)
    if dtype == "int8":     # 7-bit weights: onnxruntime's u8s8 kernels on x86 CPUs without VNNI do not saturate
        weights = [onnx.numpy_helper.to_array(t) for t in graph.graph.initializer
                   if t.data_type == onnx.TensorProto.INT8]
        assert weights and max(int(abs(w.astype(int)).max()) for w in weights) <= 64


def test_failed_validation_leaves_nothing(tiny_dir, tmp_path):
    with pytest.raises(TyrError, match="failed validation"):
        export_onnx(tiny_dir, tmp_path / "bad", atol=0.0, strict=True, check_genai=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_bad_input_errors(tmp_path, tiny_dir, capsys):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    assert main(["export", "onnx", str(not_a_model), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["export", "onnx", str(tiny_dir), str(tmp_path / "out"), "--dtype", "bf16"]) == 2
    assert "unsupported --dtype 'bf16'" in capsys.readouterr().err
    with pytest.raises(TyrError, match="unsupported ONNX dtype"):
        export_onnx(tiny_dir, tmp_path / "out", dtype="int4")
    with pytest.raises(TyrError, match="optimization level"):
        export_onnx(tiny_dir, tmp_path / "out", opt_level="max")
    assert not (tmp_path / "out").exists()
    assert main(["bench", "onnx", "--model", str(not_a_model), "--runs", "1"]) == 2


def test_cli_export_and_bench(tiny_dir, tiny_export, tmp_path, capsys):
    from tyr.benchmarking.results import load_result

    out = tmp_path / "cli"
    assert main(["export", "onnx", str(tiny_dir), str(out), "--dtype", "fp32", "--steps", "4",
                 "--no-genai-check"]) == 0
    assert "validation passed" in capsys.readouterr().out
    assert main(["export", "onnx", str(tiny_dir), str(out)]) == 2  # exists, no --overwrite
    bench_out = tmp_path / "bench"
    assert main(["bench", "onnx", "--model", tiny_export.out_dir, "--model", str(out), "--label", "a",
                 "--label", "b", "--threads", "1", "--runs", "3", "--warmup", "1", "--prompt-tokens", "16",
                 "--decode-tokens", "4", "--out", str(bench_out), "--no-progress"]) == 0
    report = json.loads((bench_out / "onnx_bench.json").read_text())
    (comparison,) = report["comparisons"]
    assert comparison["ideal_speedup"] == pytest.approx(1.0)  # same model twice
    assert comparison["prefill_speedup"] > 0 and comparison["decode_speedup"] > 0
    result = load_result(bench_out / "b-1t" / "result.json")
    assert result.runtime == "onnxruntime" and result.latency.ttft_ms.count == 3
    assert (bench_out / "results.csv").is_file() and "decode/ideal" in (bench_out / "onnx_bench.md").read_text()


# ---- the real model: SmolLM2-135M pruned to 50% with per-layer widths ----

@pytest.fixture(scope="module")
def pruned_smollm2(smollm2, tmp_path_factory):
    from tyr.exporters.onnx.magnitude import magnitude_keeps
    from tyr.models.facts import layer_params, layer_widths
    from tyr.models.slicing import slice_model

    model, tokenizer = smollm2
    pruned = slice_model(model, magnitude_keeps(model, keep=0.5))
    widths = layer_widths(pruned.config)
    assert len({(w.num_key_value_heads, w.intermediate_size) for w in widths}) > 5  # varies per layer
    decoder = lambda config: sum(sum(layer_params(config, w)) for w in layer_widths(config))  # noqa: E731
    assert decoder(pruned.config) / decoder(model.config) == pytest.approx(0.5, abs=0.01)
    folder = tmp_path_factory.mktemp("smollm2") / "pruned50"
    save_model(pruned, tokenizer, folder)
    return folder, pruned


@pytest.mark.slow
def test_pruned_smollm2_onnxruntime_and_genai(pruned_smollm2, tmp_path):
    folder, pruned = pruned_smollm2
    result = export_onnx(folder, tmp_path / "onnx")
    report = result.validation
    assert report.passed and report.token_agreement == 1.0 and report.genai_tokens_match
    assert report.prompt_tokens[0] != report.prompt_tokens[1]  # a left-padded batch was checked
    assert len({kv.kv_heads for kv in result.layout.kv_layers}) == 2
    prompt, tokens = genai_greedy(tmp_path / "onnx", "The capital of France is", 12)
    assert tokens == hf_greedy(pruned, prompt, 12)[:len(tokens)] and len(tokens) >= 1

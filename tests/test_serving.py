"""Serving harness: a real vLLM CPU server under a real locust load, offline vllm.LLM throughput, the result
format, reports, `tyr select` on recorded measurements, and the per-shape latency table.

Engine starts are the cost here, so the module starts one vLLM server and one offline engine for all its tests, and
one more server for the batch that `tyr run` sends through the benchmark's own server.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from tyr.benchmarking.config import BenchConfig, LoadConfig, ServerConfig
from tyr.benchmarking.layer_latency import default_grids, measure_latency_table
from tyr.benchmarking.load import check_target
from tyr.benchmarking.platform_info import detect_platform
from tyr.benchmarking.report import render_html
from tyr.benchmarking.results import (BenchResult, OfflineThroughput, ParamCounts, Throughput, load_result,
                                      param_counts)
from tyr.benchmarking.server import ServerError, VLLMServer
from tyr.benchmarking.vllm_bench import load_run
from tyr.errors import TyrError
from tyr.selection.candidates import read_candidates
from tyr.selection.selection import Measurement, Targets, pareto_front, select
from tyr.testing import tiny_llama


def _save_tiny(out: Path, tokenizer, tie: bool = False, **sizes) -> Path:
    # head_dim 32 (hidden 64 / 2 heads): the smallest head size vLLM's CPU attention supports.
    model = tiny_llama(vocab_size=len(tokenizer), hidden=64, layers=2, heads=2, kv_heads=1, ffn=128,
                       tie_word_embeddings=tie, **sizes)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny", smollm2_tokenizer)


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model with its config.json cut off mid-file."""
    out = tmp_path_factory.mktemp("models") / "corrupt"
    out.mkdir()
    for file in tiny_dir.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    (out / "config.json").write_text((tiny_dir / "config.json").read_text()[:150])
    return out


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory, tiny_dir, corrupt_dir) -> tuple[int, Path]:
    """`tyr bench vllm` on the tiny model (then the corrupt one): real server, 2 users for 5 s, offline batch."""
    from tyr.cli import main

    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "vllm", "--model", str(tiny_dir), "--model", str(corrupt_dir), "--out", str(out),
                 "--users", "2", "--spawn-rate", "2", "--duration", "5", "--prompt-tokens", "32",
                 "--output-tokens", "16", "--max-model-len", "256", "--offline-prompts", "8",
                 "--offline-output-tokens", "16", "--startup-timeout", "900"])
    return code, out


# ---- the live benchmark ----

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_vllm_measures_a_real_server(bench_out, tiny_dir):
    code, out = bench_out
    run = load_run(out / "results.json")
    assert [r.label for r in run.results] == ["tiny"]
    result = run.results[0]
    assert load_result(out / "tiny" / "result.json") == result  # written as soon as measured
    assert result.runtime == "vllm" and result.model == str(tiny_dir)
    assert result.platform.accelerator == "cpu" and result.platform.cpu_count >= 1
    assert result.platform.vllm_version and result.platform.torch_version == torch.__version__

    lat = result.latency
    for stats in (lat.ttft_ms, lat.itl_ms, lat.tpot_ms, lat.e2e_ms):
        assert stats is not None and stats.count > 0
        assert 0 <= stats.p50 <= stats.p90 <= stats.p99
    assert lat.ttft_ms.p50 > 0 and lat.e2e_ms.p50 > lat.ttft_ms.p50
    # 16 tokens per request: at most 15 gaps each (fewer if the server merged tokens into one chunk).
    assert 0 < lat.itl_ms.count <= 15 * lat.e2e_ms.count

    thr = result.throughput
    assert thr.completed_requests > 0 and thr.failed_requests == 0 and thr.concurrency == 2
    assert thr.requests_per_s > 0 and thr.output_tokens_per_s > 0
    # Every completed request streamed exactly its 16 tokens (ignore_eos), so tokens received cover them all
    # (the rate times the duration gives the token count back only up to float rounding).
    assert thr.output_tokens_per_s * thr.duration_s >= 16 * thr.completed_requests * (1 - 1e-9)

    offline = result.offline
    assert offline.num_prompts == 8 and offline.output_tokens == 8 * 16 and offline.output_tokens_per_s > 0
    assert len(offline.batch_seconds) == 3 and offline.elapsed_s == sorted(offline.batch_seconds)[1]  # the median

    # 2 layers (hidden 64, 2 query heads and 1 KV head of 32, FFN 128), untied 49152-token embedding and lm_head
    assert result.params.model_dump() == {"total": 6_365_504, "matmul": 3_219_456, "lm_head": 3_145_728,
                                          "embedding": 3_145_728}
    assert result.config["load"]["users"] == 2 and result.config["server"]["max_model_len"] == 256
    assert (out / "tiny" / "server.log").stat().st_size > 0  # the server's log is kept


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_batch_through_a_running_server(tiny_dir, tmp_path):
    """The batch throughput `tyr run` measures on the benchmark's own server instead of a second engine."""
    from tyr.benchmarking.offline import batch_through_server
    from tyr.benchmarking.prompts import random_prompts

    prompts = random_prompts(tiny_dir, 9, 24, seed=1)
    server_config = ServerConfig(max_model_len=256, startup_timeout_s=900)
    with VLLMServer(tiny_dir, tmp_path / "server.log", server_config, "cpu") as server:
        offline = batch_through_server(server.base_url, server.model_name, [prompts[:3], prompts[3:6], prompts[6:]],
                                       output_tokens=12, timeout=600)
        with pytest.raises(TyrError, match="HTTP 4"):  # the server refuses a batch longer than its context
            batch_through_server(server.base_url, server.model_name, [prompts[:2]], output_tokens=300, timeout=600)
    assert offline.via == "server" and offline.num_prompts == 3 and offline.prompt_tokens == 24
    assert offline.output_tokens == 3 * 12 and len(offline.batch_seconds) == 3
    assert offline.elapsed_s == sorted(offline.batch_seconds)[1]  # the median batch
    assert offline.output_tokens_per_s == pytest.approx(36 / offline.elapsed_s)


@pytest.mark.slow
def test_bench_keeps_going_past_a_broken_model(bench_out, corrupt_dir):
    code, out = bench_out
    assert code == 1  # a failure makes the command exit non-zero...
    run = load_run(out / "results.json")
    assert [f.label for f in run.failures] == ["corrupt"]  # ...without losing the model measured before it
    assert "config" in run.failures[0].error and str(corrupt_dir) in run.failures[0].error
    assert len(run.results) == 1


@pytest.mark.slow
def test_results_csv_has_one_row_per_result(bench_out):
    import csv

    _, out = bench_out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["label"] == "tiny" and rows[0]["runtime"] == "vllm"
    assert float(rows[0]["latency.ttft_ms.p50"]) > 0 and float(rows[0]["throughput.output_tokens_per_s"]) > 0
    assert rows[0]["platform.accelerator"] == "cpu" and int(rows[0]["params.matmul"]) > 0


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _check_html(text: str) -> _Tags:
    parser = _Tags()
    parser.feed(text)
    parser.close()
    for svg in re.findall(r"<svg.*?</svg>", text, flags=re.S):
        ET.fromstring(svg)  # each inline plot is well-formed SVG
    return parser


@pytest.mark.slow
def test_html_report_renders_the_run(bench_out):
    _, out = bench_out
    text = (out / "report.html").read_text()
    parsed = _check_html(text)
    assert parsed.tags.count("svg") == 2  # latency percentiles + throughput vs sparsity
    body = " ".join(parsed.text)
    for heading in ("Results", "Platform", "Latency", "Throughput vs sparsity", "Failures"):
        assert heading in body
    assert "tiny" in body and "corrupt" in body
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)  # self-contained: no external assets


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_with_corrupt_config_fails_with_its_log_tail(corrupt_dir, tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(ServerError) as err:
        with VLLMServer(corrupt_dir, log, ServerConfig(max_model_len=256, startup_timeout_s=480), "cpu"):
            pytest.fail("a server with a corrupt config.json became healthy")
    message = str(err.value)
    assert "exited with code" in message and str(log) in message
    assert "config.json" in message and "not a valid JSON" in message  # the root cause, from the log tail
    assert log.read_text().strip().splitlines()[-1] in message


# ---- result format ----

def test_param_counts_from_safetensors_headers(tmp_path, smollm2_tokenizer):
    for tie in (False, True):
        folder = _save_tiny(tmp_path / f"tie{tie}", smollm2_tokenizer, tie=tie)
        model = tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=64, layers=2, heads=2, kv_heads=1, ffn=128,
                           tie_word_embeddings=tie)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # incl. lm_head
        stored = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
        counts = param_counts(folder)
        assert counts.matmul == linear and counts.total == stored
        assert counts.lm_head == counts.embedding == 64 * len(smollm2_tokenizer)


def test_bench_config_rejects_unbounded_or_inconsistent_settings():
    with pytest.raises(ValueError):
        LoadConfig(users=10_000)
    with pytest.raises(ValueError):
        LoadConfig(duration_s=0)
    with pytest.raises(ValueError, match="max_model_len"):
        BenchConfig(server=ServerConfig(max_model_len=64), load=LoadConfig(prompt_tokens=60, output_tokens=10))
    with pytest.raises(TyrError, match="CPU backend"):
        ServerConfig(dtype="float16").resolved_dtype("cpu")
    assert ServerConfig().resolved_dtype("cpu") == "float32" and ServerConfig().eager("cpu")
    assert ServerConfig(dtype="float16").resolved_dtype("cuda") == "float16" and not ServerConfig().eager("rocm")


def test_load_refuses_remote_hosts_unless_explicit(tmp_path):
    check_target("http://127.0.0.1:8000", allow_remote=False)
    with pytest.raises(TyrError, match="refusing"):
        check_target("http://10.1.2.3:8000", allow_remote=False)
    check_target("http://10.1.2.3:8000", allow_remote=True)


# ---- selection on recorded measurements ----

def _m(label, ppl, acc, tps, baseline=False, sparsity=None):
    return Measurement(label=label, perplexity=ppl, accuracy=acc, tokens_per_s={"vllm": tps, "onnx": tps / 2},
                       baseline=baseline, sparsity=sparsity)


CANDIDATES = [
    _m("dense", 20.0, 0.60, 100.0, baseline=True, sparsity=0.0),
    _m("s20", 21.0, 0.59, 125.0, sparsity=0.2),  # +5% ppl, 1.25x
    _m("s30", 22.0, 0.58, 140.0, sparsity=0.3),  # +10% ppl, 1.40x
    _m("s40", 26.0, 0.50, 165.0, sparsity=0.4),  # +30% ppl, 1.65x
    _m("s40b", 30.0, 0.45, 160.0, sparsity=0.4),  # dominated by s40
    _m("s60", 60.0, 0.30, 220.0, sparsity=0.6),  # +200% ppl, 2.20x
]


def test_select_fastest_meeting_both_targets():
    sel = select(CANDIDATES, Targets(max_ppl_increase=0.10, min_speedup=1.2))
    assert sel.chosen == "s30" and sel.closest is None and sel.baseline == "dense"
    assert {s.label for s in sel.candidates if s.meets_both} == {"s20", "s30"}
    scored = {s.label: s for s in sel.candidates}
    assert scored["s30"].speedup == pytest.approx(1.4) and scored["s30"].quality_change == pytest.approx(0.1)


def test_select_pareto_front_drops_dominated_models():
    sel = select(CANDIDATES, Targets(max_ppl_increase=0.5, min_speedup=1.0))
    assert sel.pareto_front == ["dense", "s20", "s30", "s40", "s60"]
    assert sel.chosen == "s40"  # s60 is faster but +200% perplexity
    assert pareto_front([("a", 1, 1), ("b", 2, 2), ("c", 0, 3)]) == ["b", "c"]


def test_select_by_accuracy_retention_and_runtime():
    sel = select(CANDIDATES, Targets(min_accuracy_retention=0.95, min_speedup=1.3, runtime="onnx"))
    assert sel.chosen == "s30"  # retention 0.58/0.60 = 96.7%; onnx speeds are half, ratios unchanged
    sel = select(CANDIDATES, Targets(min_accuracy_retention=0.99, min_speedup=1.0))
    assert sel.chosen == "dense"  # only the baseline keeps 99%: it is its own 1.0x


def test_select_says_when_no_model_meets_both():
    sel = select(CANDIDATES, Targets(max_ppl_increase=0.10, min_speedup=1.6))
    assert sel.chosen is None
    assert sel.message.startswith("no model meets both targets")
    # s30: 1.40x (12.5% short of 1.6x); s40: +30% ppl (18% over the allowed 1.1x), 1.65x. s30 is closer.
    assert sel.closest == "s30" and "s30" in sel.message and "speed-up 1.40x < 1.60x" in sel.message


def test_select_needs_a_baseline_and_skips_incomplete_candidates():
    with pytest.raises(TyrError, match="baseline"):
        select(CANDIDATES[1:], Targets(max_ppl_increase=0.1, min_speedup=1.0))
    partial = CANDIDATES + [Measurement(label="no-ppl", accuracy=0.5, tokens_per_s={"vllm": 300.0})]
    sel = select(partial, Targets(max_ppl_increase=0.1, min_speedup=1.0))
    assert sel.skipped == {"no-ppl": "no perplexity"} and sel.chosen == "s30"
    with pytest.raises(ValueError):
        Targets(max_ppl_increase=0.1, min_accuracy_retention=0.9, min_speedup=1.0)


def _result(label: str, model: str, tps: float, matmul: int) -> BenchResult:
    return BenchResult(model=model, label=label, runtime="vllm", platform=detect_platform(),
                       params=ParamCounts(total=matmul, matmul=matmul, lm_head=0, embedding=0),
                       throughput=Throughput(duration_s=10, completed_requests=10, failed_requests=0,
                                             requests_per_s=1.0, output_tokens_per_s=tps / 2),
                       offline=OfflineThroughput(num_prompts=4, prompt_tokens=8, output_tokens=64, elapsed_s=1.0,
                                                 output_tokens_per_s=tps, requests_per_s=4.0))


def test_read_candidates_merges_recorded_benchmarks(tmp_path):
    folder = tmp_path / "pruned-s50"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "measurement.json").write_text(json.dumps({"perplexity": 30.0}))
    (tmp_path / "quality.json").write_text(json.dumps(
        {"measurements": [{"label": "dense", "model": str(tmp_path / "dense"), "perplexity": 20.0, "baseline": True}]}))
    bench = {"results": [_result("dense", str(tmp_path / "dense"), 100.0, 1000).model_dump(mode="json"),
                         _result("pruned-s50", str(folder), 180.0, 500).model_dump(mode="json")]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))

    got = {m.label: m for m in read_candidates([tmp_path / "quality.json", folder, tmp_path / "bench.json"])}
    assert got["pruned-s50"].tokens_per_s == {"vllm": 180.0} and got["pruned-s50"].sparsity == pytest.approx(0.5)
    assert got["dense"].tokens_per_s == {"vllm": 100.0}
    online = {m.label: m for m in read_candidates([tmp_path / "quality.json", folder, tmp_path / "bench.json"],
                                                  speed_source="online")}
    assert online["pruned-s50"].tokens_per_s == {"vllm": 90.0}

    (folder / "measurement.json").unlink()
    with pytest.raises(TyrError, match="without measurement.json"):
        read_candidates([folder])


def test_select_cli_writes_reports_and_exit_codes(tmp_path):
    from tyr.cli import main

    path = tmp_path / "candidates.json"
    path.write_text(json.dumps([m.model_dump(mode="json") for m in CANDIDATES]))
    out = tmp_path / "ok"
    assert main(["select", "--candidates", str(path), "--max-ppl-increase", "0.1", "--min-speedup", "1.2",
                 "--out", str(out)]) == 0
    assert json.loads((out / "selection.json").read_text())["chosen"] == "s30"
    assert (out / "candidates.csv").read_text().count("\n") == 1 + len(CANDIDATES)
    parsed = _check_html((out / "report.html").read_text())
    assert parsed.tags.count("svg") == 1 and "Pareto" in " ".join(parsed.text)

    none = tmp_path / "none"
    assert main(["select", "--candidates", str(path), "--min-accuracy-retention", "0.99", "--min-speedup", "1.5",
                 "--out", str(none)]) == 1
    assert json.loads((none / "selection.json").read_text())["chosen"] is None
    assert main(["select", "--candidates", str(tmp_path / "missing.json"), "--max-ppl-increase", "0.1",
                 "--min-speedup", "1"]) == 2


def test_report_renders_without_measurements_of_some_kinds():
    result = _result("onnx-only", "/x", 50.0, 100)
    html = render_html([result])  # no latency percentiles: the plot is replaced by a note, nothing breaks
    assert "no latency measurements" in html and html.count("<svg") == 1


# ---- latency table ----

def test_latency_table_covers_the_grid_and_predicts_sums(tmp_path):
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "head_dim": 32, "vocab_size": 256, "rms_norm_eps": 1e-6}
    pairs, ffns = default_grids(config, ffn_steps=4)
    assert pairs == [(1, 1), (2, 1), (2, 2), (4, 2)] and ffns == [32, 64, 96, 128]
    table = measure_latency_table(config, batch=2, context=16, device="cpu", repeats=2, warmup=1, ffns=ffns)
    assert set(table.attention_ms) == {"1,1", "2,1", "2,2", "4,2"} and set(table.mlp_ms) == {"32", "64", "96", "128"}
    assert all(v > 0 for v in [*table.attention_ms.values(), *table.mlp_ms.values(), table.lm_head_ms])

    widths = [(4, 2, 128), (0, 0, 64), (2, 1, 0)]  # a removed attention, a removed MLP
    expected = table.attention_ms["4,2"] + table.mlp_ms["128"] + table.mlp_ms["64"] + table.attention_ms["2,1"]
    assert table.predict_latency(widths) == pytest.approx(expected + table.lm_head_ms)
    between = table.mlp(80)  # interpolated between the measured 64 and 96
    assert min(table.mlp_ms["64"], table.mlp_ms["96"]) <= between <= max(table.mlp_ms["64"], table.mlp_ms["96"])
    table.save(tmp_path / "latency.json")
    assert type(table).load(tmp_path / "latency.json").predict_latency(widths) == table.predict_latency(widths)

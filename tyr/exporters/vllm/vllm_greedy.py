"""Greedy generation in vLLM, run as a script in its own process: ``python vllm_greedy.py REQUEST.json RESULT.json``.

A separate process keeps the caller free of vLLM's engine state (threads, global config); the engine runs inside
it, not in engine-core and worker processes of its own. This file imports nothing from tyr, so the same script also
checks a folder on a machine where tyr is not installed (the trust_remote_code path). Prompts are token ids, so
vLLM and transformers see exactly the same input.

``VllmProbe`` is a vLLM worker extension: ``collective_rpc("tyr_probe")`` returns the model class vLLM built and
the KV cache it allocated per attention layer, so callers can check that removed attention layers have none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import BaseModel, Field


class GreedyRequest(BaseModel):
    model: str
    prompts: list[list[int]] = Field(description="prompt token ids, one list per prompt")
    max_tokens: int = 16
    dtype: str = "float32"
    max_model_len: int = 256
    enforce_eager: bool = True
    trust_remote_code: bool = False
    seed: int = 0


class LayerCache(BaseModel):
    num_kv_heads: int
    head_size: int
    shape: list[int] = Field(description="shape of the KV cache tensor bound to this attention layer")


class GreedyResult(BaseModel):
    tokens: list[list[int]]
    model_class: str
    kv_cache: dict[str, LayerCache] = Field(description="attention layer name -> its KV cache")
    tyr_imported: bool = Field(description="whether the worker process imported tyr (its vLLM plugin)")
    vllm_version: str
    device: str
    engine_seconds: float
    generate_seconds: float


class VllmProbe:
    """Worker extension (mixed into vLLM's worker class); ``self`` is the worker."""

    def tyr_probe(self) -> dict:
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        layers = {}
        for name, layer in self.vllm_config.compilation_config.static_forward_context.items():
            cache = getattr(layer, "kv_cache", None)
            if isinstance(cache, (list, tuple)):  # older vLLM: one tensor per virtual engine
                cache = cache[0] if cache else None
            if cache is None or not hasattr(cache, "shape") or not hasattr(layer, "num_kv_heads"):
                continue
            layers[name] = {"num_kv_heads": int(layer.num_kv_heads), "head_size": int(layer.head_size),
                            "shape": list(cache.shape)}
        return {"model_class": type(model).__name__, "kv_cache": layers, "tyr_imported": "tyr" in sys.modules}


def run(request: GreedyRequest) -> GreedyResult:
    import time

    # Import the probe under a module name the worker processes can import too.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # A check needs tokens and the probe, not serving speed: the engine core and its worker run in this process
    # instead of two more interpreters that each import vLLM and torch (most of an engine start on a CPU).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    start = time.perf_counter()
    llm = LLM(model=request.model, dtype=request.dtype, max_model_len=request.max_model_len,
              enforce_eager=request.enforce_eager, trust_remote_code=request.trust_remote_code, seed=request.seed,
              worker_extension_cls=f"{Path(__file__).stem}.VllmProbe")
    engine_seconds = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=request.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request.prompts], params, use_tqdm=False)
    generate_seconds = time.perf_counter() - start
    probe = llm.collective_rpc("tyr_probe")[0]
    return GreedyResult(tokens=[list(o.outputs[0].token_ids) for o in outputs], model_class=probe["model_class"],
                        kv_cache=probe["kv_cache"], tyr_imported=probe["tyr_imported"], vllm_version=vllm.__version__,
                        device=str(current_platform.device_type), engine_seconds=engine_seconds,
                        generate_seconds=generate_seconds)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    request = GreedyRequest.model_validate_json(Path(argv[0]).read_text())
    result = run(request)
    Path(argv[1]).write_text(result.model_dump_json(indent=1))
    return 0


if __name__ == "__main__":  # vLLM's workers re-import the main script: the engine starts only here
    sys.exit(main(sys.argv[1:]))

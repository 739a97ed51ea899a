"""A locust user that streams /v1/completions and records per-request token timings.

Importing locust monkey-patches the interpreter with gevent, so only the load subprocess imports this module
(`python -m tyr.serving.load`); it also works as a plain locustfile:
`python -m locust -f tyr/serving/locust_user.py --headless ...` with TYR_PROMPTS_FILE / TYR_MODEL_NAME set.

Each completed request yields one record: time to first token, the gaps between streamed chunks (vLLM sends one
chunk per generated token unless a stream interval is configured), end-to-end time and output tokens (from the
final usage chunk). Every chunk received, including those of requests cut off when the load stops, also counts
toward the tokens-received tally used for output tokens/s.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, constant, task


class CompletionStreamUser(HttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as the last one finishes

    # Set by the runner before users start (class attributes are shared by all users in the process).
    model_name: str = os.environ.get("TYR_MODEL_NAME", "tyr-bench")
    prompts: list[list[int]] = []
    output_tokens: int = int(os.environ.get("TYR_OUTPUT_TOKENS", "32"))
    request_timeout_s: float = float(os.environ.get("TYR_REQUEST_TIMEOUT_S", "120"))
    records: list[dict] = []
    tally = {"chunks": 0}

    def on_start(self) -> None:
        self.client.trust_env = False  # never send loopback traffic through a proxy from the environment
        if not CompletionStreamUser.prompts and os.environ.get("TYR_PROMPTS_FILE"):
            with open(os.environ["TYR_PROMPTS_FILE"]) as f:
                CompletionStreamUser.prompts = json.load(f)
        self.rng = random.Random(id(self))

    @task
    def stream_completion(self) -> None:
        prompt = self.rng.choice(self.prompts)
        payload = {"model": self.model_name, "prompt": prompt, "max_tokens": self.output_tokens,
                   "min_tokens": self.output_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True}}
        record = {"start": time.time(), "ok": False, "error": None, "ttft_s": None, "e2e_s": None, "itl_s": [],
                  "output_tokens": 0, "chunks": 0}
        sent = time.perf_counter()
        last = None
        try:
            with self.client.post("/v1/completions", json=payload, stream=True, timeout=self.request_timeout_s,
                                  catch_response=True, name="/v1/completions (stream)") as response:
                if response.status_code != 200:
                    record["error"] = f"HTTP {response.status_code}: {response.text[:300]}"
                    response.failure(record["error"])
                else:
                    for line in response.iter_lines():
                        if not line.startswith(b"data: "):
                            continue
                        data = line[6:]
                        if data == b"[DONE]":
                            break
                        event = json.loads(data)
                        if "error" in event:
                            record["error"] = f"stream error: {event['error']}"
                            break
                        if event.get("usage"):
                            record["output_tokens"] = event["usage"]["completion_tokens"]
                        if not event.get("choices"):
                            continue
                        now = time.perf_counter()
                        if last is None:
                            record["ttft_s"] = now - sent
                        else:
                            record["itl_s"].append(now - last)
                        last = now
                        record["chunks"] += 1
                        self.tally["chunks"] += 1
                    if record["error"] is None and last is not None:
                        record["ok"] = True
                        record["e2e_s"] = last - sent
                        record["output_tokens"] = record["output_tokens"] or record["chunks"]
                        response.success()
                    else:
                        record["error"] = record["error"] or "stream ended without tokens"
                        response.failure(record["error"])
        except Exception as err:  # connection refused, timeouts, bad JSON: a failed request, not a crashed load
            record["error"] = f"{type(err).__name__}: {err}"
        self.records.append(record)

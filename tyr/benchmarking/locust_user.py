"""A locust user that streams /v1/completions and records per-request token timings, plus its runner.

This file is standalone (stdlib + locust only) and runs as its own process:
`python -I tyr/benchmarking/locust_user.py SPEC.json RECORDS.json` (see tyr.benchmarking.load.run_load).
Importing locust monkey-patches the interpreter with gevent, so it must be the first thing imported and never
happen in the tyr process; -I keeps this folder's modules off sys.path. Locust runs as a library (Environment + LocalRunner) for
exactly `duration_s` seconds, then the users are stopped.

Each completed request yields one record: time to first token, the gaps between streamed chunks, end-to-end time
and output tokens (from the final usage chunk). Chunks carry their token ids (return_token_ids), so tokens
received inside the window, including those of requests cut off when the load stops, are counted exactly even
when the server merges several tokens into one chunk.
"""

from locust import HttpUser, constant, task  # first: gevent monkey-patching

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


class CompletionStreamUser(HttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as the last one finishes

    # Set by the runner before users start (class attributes are shared by all users in the process).
    model_name: str = "tyr-bench"
    prompts: list = []
    output_tokens: int = 32
    request_timeout_s: float = 120.0
    records: list = []
    tally = {"tokens": 0, "chunks": 0}

    def on_start(self) -> None:
        self.client.trust_env = False  # never send loopback traffic through a proxy from the environment
        self.rng = random.Random(id(self))

    @task
    def stream_completion(self) -> None:
        payload = {"model": self.model_name, "prompt": self.rng.choice(self.prompts), "max_tokens": self.output_tokens,
                   "min_tokens": self.output_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
                   "return_token_ids": True, "stream_options": {"include_usage": True}}
        record = {"start": time.time(), "ok": False, "error": None, "ttft_s": None, "e2e_s": None, "itl_s": [],
                  "output_tokens": 0, "chunks": 0}
        sent, last, received = time.perf_counter(), None, 0
        try:
            with self.client.post("/v1/completions", json=payload, stream=True, timeout=self.request_timeout_s,
                                  catch_response=True, name="/v1/completions (stream)") as response:
                if response.status_code != 200:
                    record["error"] = f"HTTP {response.status_code}: {response.text[:300]}"
                else:
                    for line in response.iter_lines():
                        if not line.startswith(b"data: "):
                            continue
                        if line[6:] == b"[DONE]":
                            break
                        event = json.loads(line[6:])
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
                        tokens = len(event["choices"][0].get("token_ids") or [None])
                        received += tokens
                        record["chunks"] += 1
                        self.tally["chunks"] += 1
                        self.tally["tokens"] += tokens
                    if record["error"] is None and last is None:
                        record["error"] = "stream ended without tokens"
                if record["error"] is None:
                    record["ok"] = True
                    record["e2e_s"] = last - sent
                    record["output_tokens"] = record["output_tokens"] or received
                    response.success()
                else:
                    response.failure(record["error"])
        except Exception as err:  # connection refused, timeouts, bad JSON: a failed request, not a crashed load
            record["error"] = f"{type(err).__name__}: {err}"
        self.records.append(record)  # not reached when the runner kills the user mid-request (GreenletExit)


def run(spec: dict) -> dict:
    import gevent
    from locust.env import Environment

    load = spec["load"]
    CompletionStreamUser.host = spec["base_url"]
    CompletionStreamUser.model_name = spec["model_name"]
    CompletionStreamUser.prompts = spec["prompts"]
    CompletionStreamUser.output_tokens = load["output_tokens"]
    CompletionStreamUser.request_timeout_s = load["request_timeout_s"]
    runner = Environment(user_classes=[CompletionStreamUser]).create_local_runner()
    started = time.time()
    runner.start(load["users"], spawn_rate=load["spawn_rate"])
    gevent.sleep(load["duration_s"])
    # gevent switches only at I/O, so nothing lands between these reads: they all describe the same window.
    stopped = time.time()
    tally, requests = dict(CompletionStreamUser.tally), list(CompletionStreamUser.records)
    runner.quit()  # kills users mid-request; those partial requests are not recorded
    return {"started": started, "stopped": stopped, "tokens_received": tally["tokens"],
            "chunks_received": tally["chunks"], "requests": requests}


if __name__ == "__main__":
    spec_path, records_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        records = run(json.load(f))
    tmp = f"{records_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(records, f)
    os.replace(tmp, records_path)
    print(f"locust: {len(records['requests'])} requests, {records['tokens_received']} tokens in "
          f"{records['stopped'] - records['started']:.1f} s", flush=True)

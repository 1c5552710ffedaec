#!/usr/bin/env python3
"""Serving throughput and latency of ``xlab-serve``, against serialised single-request generation.

Model: random weights (``--d-model 256 --layers 4 --heads 4``, FFN 4x, RoPE, max_len ``--block 256``), ``--dtype``,
with a tokenizer of ``--num-tokens`` trained on the built-in ``python-topics`` corpus. Requests (``--requests``):
prompts cut from the corpus (8 to 48 tokens), ``max_tokens`` from a quarter of ``--max-tokens`` to all of it (so
requests end at different steps and new ones join running batches), temperature 0.8, seed i, so every mode
generates the same tokens (the bench counts the texts that are identical to the reference's).

Reference, measured in the same run and process as the clients, before the first load and after each (a shared
machine's speed drifts: each load's ratio is to the mean of the reference runs either side of it): the same
requests generated one after another with ``xlabml.inference.sample`` (no HTTP, no batching): tokens/s and
per-request latency.
Server: ``xlab-serve`` in a subprocess (``--max-batch 16``); for 1, 4 and 16 concurrent clients (threads, each
sending its requests back to back, not streamed), completion tokens/s over the wall time and the p50/p99 of the
request latencies. Both sides run torch with ``--threads`` threads (the clients' threads mostly wait).

    python bench/serve.py [--threads 2] [--requests 48] [--max-tokens 64] [--device cpu|cuda] [--dtype fp32|bf16]

Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from xlabml import inference  # noqa: E402
from xlabml.corpus import iter_builtin_texts  # noqa: E402
from xlabml.models import XLabModel  # noqa: E402
from xlabml.tokenizer import TokenizerTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import cpu_name  # noqa: E402  (bench/generate.py)

CONCURRENCY = (1, 4, 16)


def build(args, tmp: str):
    """The tokenizer, the model (eval, on the device) and a checkpoint of them in `tmp`; the requests."""
    texts = list(iter_builtin_texts("python-topics"))
    tokenizer = TokenizerTrainer().train(texts, args.num_tokens, os.path.join(tmp, "tok.model"))
    torch.manual_seed(0)
    model = XLabModel(len(tokenizer), args.block, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      d_ff=4 * args.d_model, dropout=0.0, position="rope")
    ckpt = os.path.join(tmp, "bench.ckpt")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"tokenizer_path": tokenizer.path},
                "XLabDataModule": {"tokenizer_hash": tokenizer.content_hash, "tokenizer_path": tokenizer.path}},
               ckpt)
    words = " ".join(texts).split()
    requests = []
    for i in range(args.requests):
        n = 4 + (i * 7) % 20  # words: about 8 to 48 tokens
        limit = args.max_tokens // 4 + (i * 13) % (args.max_tokens - args.max_tokens // 4 + 1)
        requests.append((" ".join(words[i * 50:i * 50 + n]), limit))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return tokenizer, model.to(args.device, dtype).eval().requires_grad_(False), ckpt, requests


def reference(args, tokenizer, model, requests) -> dict:
    """The requests one after another in this process: tokens/s, latencies, and each text."""
    eos = tokenizer.eos_id
    excluded = [tokenizer.sos_id, tokenizer.pad_id]
    latencies, texts, tokens = [], [], 0
    for warm in (True, False):
        start = time.perf_counter()
        for i, (prompt, limit) in enumerate(requests[:2] if warm else requests):
            t = time.perf_counter()
            ids = torch.tensor([tokenizer.sos_id] + tokenizer.encode(prompt), device=args.device)
            generator = torch.Generator(device=args.device).manual_seed(i)
            out = inference.sample(model, ids, limit, args.block, eos_class=eos, exclude_classes=excluded,
                                   temperature=0.8, generator=generator).tolist()
            if not warm:
                latencies.append(time.perf_counter() - t)
                texts.append(tokenizer.decode(out))
                tokens += min(len(out) + 1, limit)  # a closing <eos> counts, as in the server's usage
        wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "latencies": latencies, "texts": texts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _httpx():
    """The HTTP client under `openai`: httpx2 from openai 3, httpx before."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


def start_server(args, ckpt: str):
    httpx = _httpx()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "xlabml.serve.cli", ckpt, "--port", str(port), "-d", args.device, "--dtype",
               args.dtype,
               "--max-tokens", str(args.max_tokens), "--max-batch", "16", "--max-queue", str(args.requests),
               "--model-name", "bench"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"xlab-serve exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("xlab-serve did not start in 120 s")
        time.sleep(0.2)


def load(url: str, requests: list[tuple[str, int]], clients: int) -> dict:
    """`clients` threads send the requests back to back; returns tokens, wall time, latencies and texts."""
    httpx = _httpx()

    latencies, texts = [None] * len(requests), [None] * len(requests)
    tokens, order = [0] * len(requests), iter(range(len(requests)))

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in order:  # a shared iterator: each request once, in order of arrival
                t = time.perf_counter()
                prompt, limit = requests[i]
                r = http.post("/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": limit,
                                                       "temperature": 0.8, "seed": i})
                r.raise_for_status()
                latencies[i] = time.perf_counter() - t
                body = r.json()
                texts[i], tokens[i] = body["choices"][0]["text"], body["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return {"tokens": sum(tokens), "wall_s": time.perf_counter() - start, "latencies": latencies, "texts": texts}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {args.threads} threads"
    print(f"machine: {device}; torch {torch.__version__}")
    print(f"model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, max_len {args.block}, "
          f"vocabulary {args.num_tokens}, random weights; {args.requests} requests, max_tokens {args.max_tokens}, "
          "temperature 0.8")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model, ckpt, requests = build(args, tmp)
        refs = [reference(args, tokenizer, model, requests)]
        print(f"reference (serial inference.sample, in process): {speed(refs[0]):8.1f} tokens/s, latency "
              f"p50 {percentile(refs[0]['latencies'], 0.5):.3f} s, p99 {percentile(refs[0]['latencies'], 0.99):.3f} s")
        process, url = start_server(args, ckpt)
        results = {}
        try:
            load(url, requests[:4], 4)  # warm-up
            for clients in CONCURRENCY:
                run = load(url, requests, clients)
                refs.append(reference(args, tokenizer, model, requests))  # the server idles meanwhile
                ref_tps = (speed(refs[-2]) + speed(refs[-1])) / 2  # the reference runs either side of this one
                same = sum(a == b for a, b in zip(run["texts"], refs[0]["texts"]))
                results[clients] = {"tokens_per_s": round(speed(run), 1),
                                    "vs_reference": round(speed(run) / ref_tps, 2),
                                    "p50_s": round(percentile(run["latencies"], 0.5), 3),
                                    "p99_s": round(percentile(run["latencies"], 0.99), 3),
                                    "tokens": run["tokens"], "identical_texts": same}
                print(f"server, {clients:2d} client(s): {speed(run):8.1f} tokens/s ({speed(run) / ref_tps:4.2f}x the "
                      f"reference runs either side, {ref_tps:.1f} tokens/s), latency p50 "
                      f"{results[clients]['p50_s']:.3f} s, p99 {results[clients]['p99_s']:.3f} s; {run['tokens']} "
                      f"tokens (reference "
                      f"{refs[0]['tokens']}), texts identical to the reference: {same}/{len(requests)}")
        finally:
            process.terminate()
            process.wait(30)
    print(json.dumps({"machine": device, "reference_tokens_per_s": [round(speed(r), 1) for r in refs],
                      "reference_p50_s": round(percentile(refs[0]["latencies"], 0.5), 3),
                      "reference_p99_s": round(percentile(refs[0]["latencies"], 0.99), 3),
                      "server": {str(c): r for c, r in results.items()}}))


def speed(run: dict) -> float:
    return run["tokens"] / run["wall_s"]


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generation speed of ``xlabml.inference`` on the release-size model, against the weight-streaming floor.

Model: d_model 512, 6 layers, 8 heads, FFN 2048, vocabulary 32768, max_len 512, random weights, fp32, eval.
CPU (``--threads``, default 2): 16-token prompt, 128 new tokens (no <eos>), tokens/s of
  sampling batch 1, greedy batch 1, beam search width 4 (output tokens/s), sampling batch 8 (total tokens/s);
  and the weight-streaming floor measured in the same run: one pass of matrix-vector products over every weight
  matrix of the model (the head included) with the fastest of PyTorch's kernels for it (F.linear's BLAS GEMV, a
  matmul on the transposed matrix, oneDNN on a packed matrix; each is printed), the fastest any batch-1 decoder
  built on PyTorch kernels can go here.
  Then, rounds interleaved: batch-1 greedy tokens/s eager and with ``compile=True`` (inductor with frozen weights;
  its compile time printed), each in float32 and bfloat16 (``--dtypes``, ``--no-compile``); batch-8 sampling in
  both dtypes; and the bfloat16 weight-streaming floor.
GPU (when CUDA is available): batch-1 greedy decode tokens/s, eager and with ``compile=True``, and its fraction of
  the HBM roofline (bytes read per token x tokens/s / copy bandwidth measured here).

Each figure is the best of ``--repeats`` timed runs after a warm-up (on a shared machine the best run is the one
least disturbed by other work). The last line is JSON.

    python bench/generate.py [--threads 2] [--repeats 3] [--no-gpu] [--no-compile] [--dtypes fp32 bf16]

On a machine busy with other work, wall-clock figures at 2 threads mostly measure the scheduler (OpenMP workers
spinning while descheduled); ``--omp-passive`` lets idle workers sleep, and ``--cpu-time`` times one thread by its
CPU time, whose ratios to the floor (measured the same way) hardly depend on the other work.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

if "--omp-passive" in sys.argv:  # read by OpenMP when torch loads it, so before the import
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xlabml import inference, packed  # noqa: E402
from xlabml.layers import Decoder  # noqa: E402

CONFIG = dict(n_vocab=32768, max_len=512, d_model=512, n_layers=6, n_heads=8, d_ff=2048, dropout=0.0)
# measured on these machines (2 threads): the seed's XLab (recompute per token, one sequence at a time) and
# Hugging Face transformers GPT-2 with identical dimensions and its KV cache
REFERENCES = {
    "seed_xlab": {"sample_b1": 18, "greedy_b1": 20, "beam4": 8},
    "hf_gpt2": {"sample_b1": 80, "greedy_b1": 84, "beam4": 45, "sample_b8": 283},
    "floor_tok_s": 185,
}
TARGETS = {"sample_b1": 150, "greedy_b1": 150, "beam4": 100, "sample_b8": 800, "fraction_of_floor": 0.8}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


CLOCK = time.perf_counter  # time.thread_time with --cpu-time


def floor_pass_seconds(model: torch.nn.Module, passes: int = 20) -> dict[str, float]:
    """Best time of one pass of matrix-vector products (1 x in) @ W^T over all weight matrices, for each way
    PyTorch offers to compute it: ``F.linear`` (BLAS GEMV on the (out, in) matrix), a matmul against the matrix
    stored transposed (in, out), and oneDNN's matmul on the matrix reordered into its blocked layout. The floor
    is the fastest of them: no batch-1 decoder built on PyTorch kernels reads the weights faster."""
    weights = weight_matrices(model)
    vectors = {n: torch.randn(1, n, dtype=weights[0].dtype) for n in {d for w in weights for d in w.shape}}
    transposed = [w.t().contiguous() for w in weights]
    calls = {
        "F.linear": lambda: [F.linear(vectors[w.shape[1]], w) for w in weights],
        "x @ W^T stored transposed": lambda: [vectors[w.shape[0]] @ w for w in transposed],
    }
    if packed.supported():
        reordered = [(torch.ops.mkldnn._reorder_linear_weight(w), w.shape[1]) for w in weights]
        calls["oneDNN packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(vectors[n], p, None, "none", [], "")
                                          for p, n in reordered]
    seconds = {}
    with torch.inference_mode():
        for name, call in calls.items():
            best = float("inf")
            for _ in range(passes + 2):
                start = CLOCK()
                call()
                best = min(best, CLOCK() - start)
            seconds[name] = best
    return seconds


def best_seconds(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        sync()
        best = min(best, CLOCK() - start)
    return best


def decode_breakdown(model, prompt, n: int, block: int) -> dict:
    """Where a batch-1 greedy token's time goes: one run with every linear layer's forward timed (plain, or
    packed: generation swaps the model's linears for ``packed.PackedLinear`` stand-ins)."""
    spent = [0.0]
    originals = {cls: cls.forward for cls in (torch.nn.Linear, packed.PackedLinear)}

    def timed(forward):
        def wrapper(self, *args, **kwargs):
            start = CLOCK()
            out = forward(self, *args, **kwargs)
            spent[0] += CLOCK() - start
            return out
        return wrapper

    for cls, forward in originals.items():
        cls.forward = timed(forward)
    try:
        start = CLOCK()
        inference.greedy_search(model, prompt, n, block)
        total = CLOCK() - start
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
    return {"ms_per_token": round(total / n * 1e3, 3), "matmul_ms_per_token": round(spent[0] / n * 1e3, 3)}


def bench_cpu(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Decoder(**CONFIG).eval().requires_grad_(False)
    prompt = torch.randint(4, CONFIG["n_vocab"], (args.prompt,))
    prompts8 = [torch.randint(4, CONFIG["n_vocab"], (args.prompt,)) for _ in range(8)]
    n, block = args.new, CONFIG["max_len"]
    runs = {
        "sample_b1": (lambda: inference.sample(model, prompt, n, block, generator=torch.Generator().manual_seed(0)),
                      n),
        "greedy_b1": (lambda: inference.greedy_search(model, prompt, n, block), n),
        "beam4": (lambda: inference.beam_search(model, prompt, 4, n, block), n),
        "sample_b8": (lambda: inference.sample(model, prompts8, n, block, generator=torch.Generator().manual_seed(0)),
                      8 * n),
    }
    floors = [floor_pass_seconds(model)]
    results = {}
    for name, (fn, tokens) in runs.items():
        results[name] = round(tokens / best_seconds(fn, args.repeats), 1)
        floors.append(floor_pass_seconds(model))  # interleaved: the machine's state next to each figure
    breakdown = decode_breakdown(model, prompt, n, block)
    floors.append(floor_pass_seconds(model))
    by_kernel = {name: 1.0 / min(f[name] for f in floors) for name in floors[0]}
    floor = max(by_kernel.values())
    results["floor_tok_s"] = round(floor, 1)
    results["floor_by_kernel_tok_s"] = {name: round(v, 1) for name, v in by_kernel.items()}
    results["fraction_of_floor"] = round(max(results["sample_b1"], results["greedy_b1"]) / floor, 3)
    results["greedy_fraction_of_floor"] = round(results["greedy_b1"] / floor, 3)
    results["sample_fraction_of_floor"] = round(results["sample_b1"] / floor, 3)
    results["breakdown"] = {**breakdown, "floor_pass_ms": round(1e3 / floor, 3),
                            "matmul_vs_floor": round(breakdown["matmul_ms_per_token"] * floor / 1e3, 2)}
    results["variants"] = bench_variants(args, model, prompt, prompts8)
    return results


def bench_variants(args, model, prompt, prompts8) -> dict:
    """Batch-1 greedy (and batch-8 sampling) tokens/s of the same model eager and compiled, in float32 and
    bfloat16, interleaved round by round (each figure the best of its rounds), with the bfloat16 floor."""
    n, block = args.new, CONFIG["max_len"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    models = {"fp32": model, "bf16": half}
    runs = {f"{kind}_{dtype}": (models[dtype], kind == "compiled") for dtype in args.dtypes
            for kind in ("eager", "compiled") if kind == "eager" or args.compile}
    out = {"compile_s": {}}
    for name, (m, compile) in runs.items():  # warm-up; compiles once per model (timed)
        start = time.perf_counter()
        inference.greedy_search(m, prompt, n, block, compile=compile)
        if compile:
            out["compile_s"][name] = round(time.perf_counter() - start, 1)
    best = {name: float("inf") for name in runs}
    best_b8 = {dtype: float("inf") for dtype in args.dtypes}
    for _ in range(args.repeats):
        for name, (m, compile) in runs.items():
            best[name] = min(best[name], once_seconds(
                lambda: inference.greedy_search(m, prompt, n, block, compile=compile)))
        for dtype in args.dtypes:
            best_b8[dtype] = min(best_b8[dtype], once_seconds(lambda: inference.sample(
                models[dtype], prompts8, n, block, generator=torch.Generator().manual_seed(0))))
    out["greedy_b1"] = {name: round(n / seconds, 1) for name, seconds in best.items()}
    out["sample_b8"] = {dtype: round(8 * n / seconds, 1) for dtype, seconds in best_b8.items()}
    if "bf16" in args.dtypes:
        out["floor_bf16_tok_s"] = round(1.0 / min(floor_pass_seconds(half).values()), 1)
    return out


def once_seconds(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    x = torch.empty(256 * 2 ** 20, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    seconds = best_seconds(lambda: y.copy_(x), 10, torch.cuda.synchronize)
    return 2 * x.numel() * x.element_size() / seconds


def bench_gpu(args) -> dict:
    device = torch.device("cuda")
    dtype = getattr(torch, args.gpu_dtype)
    torch.manual_seed(0)
    model = Decoder(**CONFIG).to(device=device, dtype=dtype).eval().requires_grad_(False)
    prompt = torch.randint(4, CONFIG["n_vocab"], (args.prompt,), device=device)
    # bytes read per decoded token: every parameter except the embedding table (one row of it is read)
    bytes_per_token = sum(p.numel() * p.element_size() for p in model.parameters())
    bytes_per_token -= model.embedding.weight.numel() * model.embedding.weight.element_size()
    bandwidth = copy_bandwidth(device)
    out = {"device": torch.cuda.get_device_name(), "dtype": args.gpu_dtype, "bandwidth_gb_s": round(bandwidth / 1e9),
           "model_mb": round(bytes_per_token / 2 ** 20, 1), "roofline_tok_s": round(bandwidth / bytes_per_token)}
    n, block = args.gpu_new, CONFIG["max_len"]
    for label, compile in (("eager", False), ("compiled", True)):
        try:
            def run():
                return inference.greedy_search(model, prompt, n, block, compile=compile)
            run()  # compiles (when asked) and warms up
            seconds = best_seconds(run, args.repeats, torch.cuda.synchronize)
            tok_s = n / seconds
            out[f"{label}_tok_s"] = round(tok_s, 1)
            out[f"{label}_fraction_of_roofline"] = round(tok_s * bytes_per_token / bandwidth, 3)
        except Exception as error:  # noqa: BLE001 - report and go on: the CPU figures still stand
            out[f"{label}_error"] = f"{type(error).__name__}: {error}"[:300]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per prompt (CPU)")
    parser.add_argument("--gpu-new", type=int, default=256, help="new tokens per prompt (GPU)")
    parser.add_argument("--gpu-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                        help="precisions of the eager/compiled comparison (default: both)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled decode step (inductor takes a minute or more per dtype on 2 cores)")
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by its CPU time instead of the wall clock: the ratios to the floor "
                        "then hardly depend on other work running on the machine (the absolute figures are "
                        "one thread's)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. On a machine "
                        "busy with other work, spinning threads keep the decode step (many small parallel ops) "
                        "waiting for descheduled workers; on an idle machine spinning is faster")
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK, args.threads, args.no_gpu = time.thread_time, 1, True
    started = time.perf_counter()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}; {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}; clock: "
          f"{'thread CPU time' if args.cpu_time else 'wall'}")
    print(f"model: {CONFIG}, random weights; prompt {args.prompt} tokens, {args.new} new tokens, "
          f"best of {args.repeats}")
    result = {"clock": "thread CPU time" if args.cpu_time else "wall", "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "prompt": args.prompt,
              "new_tokens": args.new}
    if not args.no_cpu:
        cpu = bench_cpu(args)
        result.update(cpu)
        seed, hf = REFERENCES["seed_xlab"], REFERENCES["hf_gpt2"]
        print(f"\n{'CPU fp32 tokens/s':<28}{'xlabml':>9}{'seed':>7}{'HF GPT-2':>10}{'target':>8}  met")
        for name in ("sample_b1", "greedy_b1", "beam4", "sample_b8"):
            met = cpu[name] >= TARGETS[name]
            print(f"{name:<28}{cpu[name]:>9.1f}{seed.get(name, '-'):>7}{hf.get(name, '-'):>10}{TARGETS[name]:>8}"
                  f"  {'yes' if met else 'NO'}")
        print(f"{'weight-streaming floor':<28}{cpu['floor_tok_s']:>9.1f}{'':>7}{'':>10}"
              f"{'(~' + str(REFERENCES['floor_tok_s']) + ' here when idle)':>8}")
        print("  matrix-vector passes/s by kernel: " + ", ".join(
            f"{name} {v}" for name, v in cpu["floor_by_kernel_tok_s"].items()))
        print(f"batch-1 fraction of floor: sampling {cpu['sample_fraction_of_floor']:.0%}, greedy "
              f"{cpu['greedy_fraction_of_floor']:.0%} (target >= {TARGETS['fraction_of_floor']:.0%})")
        b = cpu["breakdown"]
        print(f"batch-1 greedy, per token: {b['ms_per_token']} ms, of which the matrix products "
              f"{b['matmul_ms_per_token']} ms ({b['matmul_vs_floor']}x the floor pass of {b['floor_pass_ms']} ms) "
              f"and everything else {b['ms_per_token'] - b['matmul_ms_per_token']:.3f} ms")
        v = cpu["variants"]
        eager = v["greedy_b1"].get("eager_fp32")
        print("batch-1 greedy tokens/s, same run, rounds interleaved: " + ", ".join(
            f"{name} {tok_s}" + (f" ({tok_s / eager:.2f}x eager fp32)" if eager and name != "eager_fp32" else "")
            for name, tok_s in v["greedy_b1"].items()))
        if v["compile_s"]:
            print("  compile time (first call): " + ", ".join(f"{k} {s} s" for k, s in v["compile_s"].items()))
        print("batch-8 sampling tokens/s: " + ", ".join(f"{k} {t}" for k, t in v["sample_b8"].items())
              + (f"; bf16 weight-streaming floor {v['floor_bf16_tok_s']} passes/s" if v.get("floor_bf16_tok_s")
                 else ""))
        result["targets_met"] = {name: cpu[name] >= TARGETS[name] for name in ("sample_b1", "greedy_b1", "beam4",
                                                                              "sample_b8")}
        result["targets_met"]["fraction_of_floor"] = cpu["fraction_of_floor"] >= TARGETS["fraction_of_floor"]
    result["gpu"] = None
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = bench_gpu(args)
        result["gpu"] = gpu
        print(f"\nGPU {gpu['device']} {gpu['dtype']}: copy bandwidth {gpu['bandwidth_gb_s']} GB/s, "
              f"{gpu['model_mb']} MiB read per token -> roofline {gpu['roofline_tok_s']} tokens/s")
        for label in ("eager", "compiled"):
            if f"{label}_tok_s" in gpu:
                print(f"  batch-1 greedy decode, {label}: {gpu[f'{label}_tok_s']} tokens/s "
                      f"({gpu[f'{label}_fraction_of_roofline']:.1%} of roofline)")
            else:
                print(f"  {label}: failed: {gpu[f'{label}_error']}")
    result["references"] = REFERENCES
    result["targets"] = TARGETS
    result["load_average"] = round(os.getloadavg()[0], 1)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

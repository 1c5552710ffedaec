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
from pathlib import Path

if "--omp-passive" in sys.argv:  # read by OpenMP when torch loads it, so before the import
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xlabml import inference, packed  # noqa: E402
from xlabml.layers import Decoder  # noqa: E402
from xlabml.quantize import Int4Linear, Int8Linear, quantize, quantize_int8  # noqa: E402

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


LINEAR_CLASSES = (torch.nn.Linear, packed.PackedLinear, Int8Linear, Int4Linear)


def decode_breakdown(model, prompt, n: int, block: int) -> dict:
    """Where a batch-1 greedy token's time goes: one run with every linear layer's forward timed (plain, packed:
    generation swaps the model's linears for ``packed.PackedLinear`` stand-ins, or quantized)."""
    spent = [0.0]
    originals = {cls: cls.forward for cls in LINEAR_CLASSES}

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


def int8_pass_seconds(model: torch.nn.Module, passes: int = 20) -> float:
    """Best time of one pass of matrix-vector products over the model's weight matrices quantized to int8, with
    the kernel ``xlabml.quantize`` uses (``aten._weight_int8pack_mm``, bfloat16 activations): int8's floor."""
    operands = [(*quantize_int8(w), w.shape[1]) for w in weight_matrices(model)]
    operands = [(q, s.to(torch.bfloat16), n) for q, s, n in operands]
    vectors = {n: torch.randn(1, n, dtype=torch.bfloat16) for _, _, n in operands}
    with torch.inference_mode():
        return best_seconds(lambda: [torch.ops.aten._weight_int8pack_mm(vectors[n], q, s) for q, s, n in operands],
                            passes)


def variant_models(model: torch.nn.Module, names) -> dict:
    """The model as each variant runs it: fp32, bf16 (cast), int8 and int4 (``xlabml.quantize`` of the fp32
    model: int8 per channel, int4 in groups of 128)."""
    makers = {"fp32": lambda: model, "bf16": lambda: copy.deepcopy(model).to(torch.bfloat16),
              "int8": lambda: quantize(copy.deepcopy(model), "int8"),
              "int4": lambda: quantize(copy.deepcopy(model), "int4", group_size=128)}
    return {name: makers[name]() for name in names}


def bench_variants(args, model, prompt, prompts8) -> dict:
    """Batch-1 greedy (and batch-8 sampling) tokens/s of the same model eager and compiled, in float32 and
    bfloat16 and with int8/int4 weights, interleaved round by round (each figure the best of its rounds), with
    the bfloat16 and int8 floors and each variant's per-token split (eager)."""
    n, block = args.new, CONFIG["max_len"]
    models = variant_models(model, args.dtypes)
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
        out["floor_bf16_tok_s"] = round(1.0 / min(floor_pass_seconds(models["bf16"]).values()), 1)
    if "int8" in args.dtypes:
        out["floor_int8_tok_s"] = round(1.0 / int8_pass_seconds(model), 1)
    out["split"] = {dtype: decode_breakdown(m, prompt, n, block) for dtype, m in models.items()}
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


# ---------------------------------------------------------------------------------------------------------------
# against llama.cpp and Hugging Face transformers, on one Llama-layout model of the release dimensions

LLAMA_CONFIG = dict(CONFIG, position="rope", norm="rmsnorm", ffn="swiglu", bias=False, embedding_scale=1.0)
LLAMA_CANDIDATES = {  # name -> (engine, precision, compiled)
    "xlab fp32": ("xlab", "fp32", False), "xlab fp32 compiled": ("xlab", "fp32", True),
    "xlab bf16": ("xlab", "bf16", False), "xlab bf16 compiled": ("xlab", "bf16", True),
    "xlab int8": ("xlab", "int8", False), "xlab int8 compiled": ("xlab", "int8", True),
    "llama.cpp f32": ("llama.cpp", "f32", False), "llama.cpp f16": ("llama.cpp", "f16", False),
    "llama.cpp q8_0": ("llama.cpp", "q8_0", False),
}
# the comparisons the targets name: ours (the better of eager and compiled) against llama.cpp's, and the factor
LLAMA_TARGETS = {"fp32": ("f32", 0.9), "bf16": ("f16", 1.0), "int8": ("q8_0", 1.0)}


def llama_model_dir(directory: Path, checkpoint: str | None = None) -> Path:
    """A Llama-layout XLab checkpoint of the release dimensions (random weights unless `checkpoint` is given), its
    tokenizer, and its GGUF exports (f32, f16, q8_0) in `directory`."""
    from xlabml.checkpoints import DATA_STATE_KEY
    from xlabml.corpus import iter_builtin_texts
    from xlabml.interop.gguf import export_gguf
    from xlabml.models import XLabModel
    from xlabml.tokenizer import TokenizerTrainer

    ckpt = directory / "model.ckpt"
    if checkpoint:
        ckpt = Path(checkpoint)
    elif not ckpt.exists():
        texts = list(iter_builtin_texts("python-topics"))[:30]
        tokenizer = TokenizerTrainer({"num_threads": 1}).train(iter(texts), 700, directory / "tokenizer.model")
        torch.manual_seed(0)
        model = XLabModel(**LLAMA_CONFIG)
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                    "datamodule_hyper_parameters": {"tokenizer_path": str(tokenizer.path)},
                    DATA_STATE_KEY: {"tokenizer_hash": tokenizer.content_hash, "tokenizer_path": str(tokenizer.path)}},
                   ckpt)
    for kind in ("f32", "f16", "q8_0"):
        if not (directory / f"model-{kind}.gguf").exists():
            export_gguf(ckpt, directory / f"model-{kind}.gguf", out_type=kind)
    (directory / "checkpoint").write_text(str(ckpt))
    return directory


def run_candidate(args) -> dict:
    """One candidate of the llama.cpp comparison, in this process: batch-1 greedy tokens/s (best of --repeats
    after a warm-up), 16-token prompt, --new tokens, --threads threads."""
    engine, precision, compiled = LLAMA_CANDIDATES[args.candidate]
    directory = Path(args.model_dir)
    prompt = list(range(10, 10 + args.prompt))
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(str(directory / f"model-{precision}.gguf"), n_ctx=CONFIG["max_len"],
                              n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

        def run():
            out = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                out.append(token)
                if len(out) == args.new:
                    return out

        run()
        best, eval_ms = float("inf"), float("inf")
        for _ in range(args.repeats):
            llama_cpp.llama_perf_context_reset(llm.ctx)
            start = CLOCK()
            run()
            best = min(best, CLOCK() - start)
            perf = llama_cpp.llama_perf_context(llm.ctx)
            eval_ms = min(eval_ms, perf.t_eval_ms / max(perf.n_eval, 1))
        return {"tok_s": round(args.new / best, 1), "eval_tok_s": round(1e3 / eval_ms, 1)}
    from xlabml.checkpoints import load_checkpoint

    torch.set_num_threads(args.threads)
    model = load_checkpoint((directory / "checkpoint").read_text(), "cpu", tokenizer=False).model
    model = model.eval().requires_grad_(False)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if precision == "int8":
        quantize(model, "int8")
    x = torch.tensor(prompt)
    n, block = args.new, CONFIG["max_len"]
    start = time.perf_counter()
    inference.greedy_search(model, x, n, block, compile=compiled)
    warm = time.perf_counter() - start
    seconds = best_seconds(lambda: inference.greedy_search(model, x, n, block, compile=compiled), args.repeats)
    out = {"tok_s": round(n / seconds, 1), "warm_s": round(warm, 1)}
    if not compiled:
        split = decode_breakdown(model, x, n, block)
        out["split"] = {"ms_per_token": split["ms_per_token"], "matmul_ms_per_token": split["matmul_ms_per_token"]}
    return out


def bench_llama_cpp(args) -> dict:
    """Every LLAMA_CANDIDATES entry in its own process, rounds interleaved, the load average before each round;
    figures kept per round, best over all rounds and over the idle ones (load < 0.5 before the round)."""
    import subprocess
    import tempfile

    directory = Path(args.model_dir or tempfile.mkdtemp(prefix="xlab-bench-llama-"))
    directory.mkdir(parents=True, exist_ok=True)
    llama_model_dir(directory, args.llama_checkpoint)
    names = [n for n in LLAMA_CANDIDATES if args.compile or not LLAMA_CANDIDATES[n][2]]
    rounds = []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        figures = {}
        for name in names:
            command = [sys.executable, os.path.abspath(__file__), "--candidate", name, "--model-dir", str(directory),
                       "--threads", str(args.threads), "--repeats", str(args.repeats), "--new", str(args.new),
                       "--prompt", str(args.prompt)] + (["--cpu-time"] if args.cpu_time else [])
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            figures[name] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        rounds.append({"load_before": round(load, 2), "idle": load < 0.5, "figures": figures})
        print(f"round {r + 1}: load {load:.2f}{' (idle)' if load < 0.5 else ''}: " + ", ".join(
            f"{n} {f.get('tok_s', f.get('error'))}" for n, f in figures.items()), flush=True)
    return {"model": LLAMA_CONFIG, "rounds": rounds, **summarize_llama(rounds, names)}


def summarize_llama(rounds: list, names: list) -> dict:
    out = {}
    for label, chosen in (("all", rounds), ("idle", [r for r in rounds if r["idle"]])):
        best = {n: max((r["figures"][n].get("tok_s", 0) for r in chosen), default=None) for n in names}
        out[f"best_{label}"] = best if chosen else None
    targets = {}
    for ours, (theirs, factor) in LLAMA_TARGETS.items():
        per_round = []
        for r in rounds:
            mine = max(r["figures"].get(n, {}).get("tok_s", 0) for n in (f"xlab {ours}", f"xlab {ours} compiled"))
            other = r["figures"].get(f"llama.cpp {theirs}", {}).get("tok_s")
            if mine and other:
                per_round.append(mine / other)
        per_round.sort()
        median = per_round[len(per_round) // 2] if per_round else None
        targets[ours] = {"vs": f"llama.cpp {theirs}", "needed": factor, "median_ratio": median and round(median, 3),
                         "met": bool(median and median >= factor)}
    out["targets"] = targets
    return out


def print_llama(result: dict) -> None:
    print("\nbatch-1 greedy tokens/s, Llama layout of the release dimensions, each candidate in its own process "
          "(best of its runs per round):")
    names = list(result["best_all"])
    for label in ("all", "idle"):
        best = result[f"best_{label}"]
        if best:
            print(f"  best over {label} rounds: " + ", ".join(f"{n} {best[n]}" for n in names))
        else:
            print("  no round started on an idle machine (load average < 0.5)")
    for ours, t in result["targets"].items():
        print(f"  target {ours} >= {t['needed']}x {t['vs']}: median per-round ratio {t['median_ratio']} -> "
              f"{'met' if t['met'] else 'NOT met'}")
    for n in names:
        splits = [r["figures"][n].get("split") for r in result["rounds"] if r["figures"][n].get("split")]
        if splits:
            s = min(splits, key=lambda x: x["ms_per_token"])
            print(f"  {n}: {s['ms_per_token']} ms/token, of which matrix products {s['matmul_ms_per_token']} ms")


def bench_hf(args) -> dict:
    """Beam search (4 beams) and batch-8 sampling, output tokens/s: XLab against transformers' generate on the
    same Llama-layout model (exported with export-hf), in this process, rounds interleaved."""
    import tempfile
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from xlabml.checkpoints import load_checkpoint
    from xlabml.interop.hf import export_hf

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    directory = Path(args.model_dir or tempfile.mkdtemp(prefix="xlab-bench-llama-"))
    directory.mkdir(parents=True, exist_ok=True)
    llama_model_dir(directory, args.llama_checkpoint)
    checkpoint = (directory / "checkpoint").read_text()
    if not (directory / "hf").exists():
        export_hf(checkpoint, directory / "hf")
    ours = load_checkpoint(checkpoint, "cpu", tokenizer=False).model.eval().requires_grad_(False)
    theirs = AutoModelForCausalLM.from_pretrained(directory / "hf", torch_dtype=torch.float32).eval()
    n, block = args.new, CONFIG["max_len"]
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 700, (args.prompt,), generator=generator)
    prompts8 = torch.randint(4, 700, (8, args.prompt), generator=generator)
    hf_args = dict(max_new_tokens=n, min_new_tokens=n, suppress_tokens=None, begin_suppress_tokens=None,
                   pad_token_id=0, eos_token_id=None)
    runs = {
        "xlab beam4": (lambda: inference.beam_search(ours, prompt, 4, n, block), n),
        "hf beam4": (lambda: theirs.generate(prompt[None], num_beams=4, do_sample=False, **hf_args), n),
        "xlab sample_b8": (lambda: inference.sample(ours, prompts8, n, block, top_k=None), 8 * n),
        "hf sample_b8": (lambda: theirs.generate(prompts8, attention_mask=torch.ones_like(prompts8), do_sample=True,
                                                  top_k=0, top_p=1.0, **hf_args), 8 * n),
    }
    best = {name: float("inf") for name in runs}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        for fn, _ in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, (fn, _) in runs.items():
                best[name] = min(best[name], once_seconds(fn))
    tok_s = {name: round(tokens / best[name], 1) for name, (_, tokens) in runs.items()}
    return {"tok_s": tok_s, "beam4_vs_hf": round(tok_s["xlab beam4"] / tok_s["hf beam4"], 2),
            "sample_b8_vs_hf": round(tok_s["xlab sample_b8"] / tok_s["hf sample_b8"], 2)}


# ---------------------------------------------------------------------------------------------------------------
# speculative decoding, on briefly trained character-level models of Tiny Shakespeare


SPEC_TARGET = dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048)  # the release model's blocks
SPEC_DRAFT = dict(d_model=384, n_layers=2, n_heads=6, d_ff=1536)  # 5.4x fewer block weights
SPEC_CONTEXT = 64


def trained_char_models(args):
    """Target and draft trained on Tiny Shakespeare's first 90% (bench/quality.py's recipe: AdamW, warm-up and
    cosine decay, batch 12 of SPEC_CONTEXT characters), each cached in --spec-cache by its settings."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import quality

    text = quality.load_corpus(args.corpus)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    cache = Path(args.spec_cache)
    cache.mkdir(parents=True, exist_ok=True)
    models = {}
    for role, arch in (("target", SPEC_TARGET), ("draft", SPEC_DRAFT)):
        torch.manual_seed(args.seed)
        model = Decoder(len(vocab), SPEC_CONTEXT, dropout=0.0, **arch)
        name = "-".join(f"{k}{v}" for k, v in arch.items()) + f"-ctx{SPEC_CONTEXT}-steps{args.spec_steps}-v{len(vocab)}"
        path = cache / f"{name}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            print(f"{role}: {arch}, loaded from {path}")
        else:
            start = time.perf_counter()
            loss = quality.train(model, ids[:cut], args.spec_steps, 12, SPEC_CONTEXT, 1e-3, args.seed)
            torch.save(model.state_dict(), path)
            print(f"{role}: {arch}, trained {args.spec_steps} steps in {time.perf_counter() - start:.0f} s, "
                  f"last loss {loss:.3f} nats/char")
        models[role] = model.eval().requires_grad_(False)
    heldout = ids[cut:]
    return models["target"], models["draft"], heldout


def bench_speculative(args) -> dict:
    """Plain greedy (and sampling) of the target against speculative decoding with the draft, k drafts per round,
    rounds interleaved; tokens/s, acceptance rate, and whether greedy outputs equal the target's."""
    from xlabml.speculative import SpeculativeStats, speculative_sample

    torch.set_num_threads(args.threads)
    target, draft, heldout = trained_char_models(args)
    blocks = lambda m: sum(p.numel() for b in m.blocks for p in b.parameters())  # noqa: E731
    prompts = [heldout[i * 1000:i * 1000 + args.prompt] for i in range(4)]
    n, keep = args.new, SPEC_CONTEXT // 2  # past the 64-character context windows restart at 32 characters
    window = dict(context_keep=keep)
    runs = {"plain greedy": lambda p, st: inference.greedy_search(target, p, n, SPEC_CONTEXT, **window),
            "plain greedy, compiled": lambda p, st: inference.greedy_search(target, p, n, SPEC_CONTEXT,
                                                                           compile=True, **window)}
    for k in args.draft_tokens:
        for compiled in (False, True):
            runs[f"speculative greedy k={k}{', draft compiled' if compiled else ''}"] = (
                lambda p, st, k=k, c=compiled: speculative_sample(target, draft, p, n, SPEC_CONTEXT, temperature=0.0,
                                                                  draft_tokens=k, stats=st, compile=c, **window))
    runs["plain sampling T=0.8"] = lambda p, st: inference.sample(
        target, p, n, SPEC_CONTEXT, temperature=0.8, generator=torch.Generator().manual_seed(0), **window)
    k = args.draft_tokens[len(args.draft_tokens) // 2]
    runs[f"speculative sampling T=0.8 k={k}, draft compiled"] = lambda p, st: speculative_sample(
        target, draft, p, n, SPEC_CONTEXT, temperature=0.8, draft_tokens=k, stats=st, compile=True,
        generator=torch.Generator().manual_seed(0), **window)
    reference = [inference.greedy_search(target, p, n, SPEC_CONTEXT, **window) for p in prompts]
    best = {name: float("inf") for name in runs}
    stats = {name: SpeculativeStats() for name in runs}
    identical = {name: True for name in runs if "greedy" in name}
    for name, fn in runs.items():  # warm-up (compiles), and the outputs
        for p, expected in zip(prompts, reference):
            out = fn(p, stats[name])
            if name in identical:
                identical[name] &= torch.equal(out, expected)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], once_seconds(lambda: [fn(p, SpeculativeStats()) for p in prompts]))
    tok_s = {name: round(len(prompts) * n / seconds, 1) for name, seconds in best.items()}
    plain = tok_s["plain greedy"]
    return {"target_block_weights": blocks(target), "draft_block_weights": blocks(draft),
            "tok_s": tok_s, "speedup_vs_plain_greedy": {k: round(v / plain, 2) for k, v in tok_s.items()},
            "acceptance_rate": {k: round(v.acceptance_rate, 3) for k, v in stats.items() if v.drafted},
            "greedy_identical_to_target": identical}


def print_speculative(r: dict) -> None:
    print(f"\nspeculative decoding: target blocks {r['target_block_weights'] / 1e6:.1f}M weights, draft "
          f"{r['draft_block_weights'] / 1e6:.2f}M ({r['target_block_weights'] / r['draft_block_weights']:.1f}x "
          f"smaller); character-level Tiny Shakespeare, 4 held-out prompts")
    print(f"{'':<52}{'tokens/s':>10}{'vs plain greedy':>17}{'accepted':>10}{'= target':>10}")
    for name, tok_s in r["tok_s"].items():
        acc = r["acceptance_rate"].get(name)
        same = r["greedy_identical_to_target"].get(name)
        print(f"{name:<52}{tok_s:>10}{r['speedup_vs_plain_greedy'][name]:>16}x"
              f"{(f'{acc:.0%}' if acc is not None else '-'):>10}{('-' if same is None else str(same)):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per prompt (CPU)")
    parser.add_argument("--gpu-new", type=int, default=256, help="new tokens per prompt (GPU)")
    parser.add_argument("--gpu-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                        choices=("fp32", "bf16", "int8", "int4"),
                        help="variants of the eager/compiled comparison: float32, bfloat16, and int8/int4 weights "
                        "(xlabml.quantize of the float32 model) (default: all)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled decode step (inductor takes a minute or more per dtype on 2 cores)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the default CPU section")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="batch-1 greedy against llama.cpp (llama-cpp-python must be importable, e.g. with "
                        "PYTHONPATH): XLab fp32/bf16/int8, eager and compiled, and llama.cpp f32/f16/q8_0 on one "
                        "Llama-layout model of the release dimensions (export-gguf), each candidate in its own "
                        "process per round, rounds interleaved")
    parser.add_argument("--hf", action="store_true",
                        help="beam search (4) and batch-8 sampling against transformers' generate on that model")
    parser.add_argument("--speculative", action="store_true",
                        help="speculative decoding on briefly trained character-level models (a release-size "
                        "target and a draft with 5.4x fewer block weights): tokens/s and acceptance")
    parser.add_argument("--rounds", type=int, default=3, help="--llama-cpp rounds (default 3)")
    parser.add_argument("--model-dir", help="--llama-cpp/--hf: where the model and its exports are kept "
                        "(default: a new temporary directory)")
    parser.add_argument("--llama-checkpoint", help="--llama-cpp/--hf: a Llama-layout checkpoint to use instead of "
                        "random weights")
    parser.add_argument("--candidate", choices=tuple(LLAMA_CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help="--speculative: the text (default: Tiny Shakespeare)")
    parser.add_argument("--spec-steps", type=int, default=300, help="--speculative: training steps of each model")
    parser.add_argument("--spec-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "xlab-bench"),
                        help="--speculative: where trained models are kept between runs")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6], help="--speculative: k values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by its CPU time instead of the wall clock: the ratios to the floor "
                        "then hardly depend on other work running on the machine (the absolute figures are "
                        "one thread's; --llama-cpp's candidates, llama.cpp and ours, run one thread each, timed by "
                        "their process's CPU time)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. On a machine "
                        "busy with other work, spinning threads keep the decode step (many small parallel ops) "
                        "waiting for descheduled workers; on an idle machine spinning is faster")
    args = parser.parse_args()
    global CLOCK
    if args.candidate:  # one candidate of --llama-cpp, in its own process
        if args.cpu_time:  # the process's CPU time: llama.cpp's threads and torch's alike (1 thread each)
            CLOCK = time.process_time
        print(json.dumps(run_candidate(args)))
        return
    if args.cpu_time:
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
        print("batch-8 sampling tokens/s: " + ", ".join(f"{k} {t}" for k, t in v["sample_b8"].items()))
        floors = [f"{d} {v[f'floor_{d}_tok_s']}" for d in ("bf16", "int8") if v.get(f"floor_{d}_tok_s")]
        if floors:
            print("weight-streaming floors (passes/s over the matrices): " + ", ".join(floors))
        for dtype, split in v["split"].items():
            print(f"  {dtype} eager, per token: {split['ms_per_token']} ms, of which the matrix products "
                  f"{split['matmul_ms_per_token']} ms, everything else "
                  f"{split['ms_per_token'] - split['matmul_ms_per_token']:.3f} ms")
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
    if args.llama_cpp:
        result["llama_cpp"] = bench_llama_cpp(args)
        print_llama(result["llama_cpp"])
    if args.hf:
        hf = result["hf"] = bench_hf(args)
        print("\nagainst transformers' generate, same Llama-layout model, output tokens/s: " + ", ".join(
            f"{k} {v}" for k, v in hf["tok_s"].items()) + f"; beam 4 {hf['beam4_vs_hf']}x HF, batch 8 "
            f"{hf['sample_b8_vs_hf']}x HF")
    if args.speculative:
        result["speculative"] = bench_speculative(args)
        print_speculative(result["speculative"])
    result["references"] = REFERENCES
    result["targets"] = TARGETS
    result["load_average"] = round(os.getloadavg()[0], 1)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

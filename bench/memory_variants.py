#!/usr/bin/env python3
"""Memory and long-context variants on Tiny Shakespeare at nanoGPT's CPU budget: held-out bits/char, step time,
KV cache bytes, and perplexity against context length.

Every trained row is one `bench/shakespeare.py` run (the public CLI: `./xlab.py fit`, then `./xlab.py validate` on
the checkpoint), the same budget as its ablation (2,000 steps of 12 x 64 characters, 4 layers, d_model 128), one
change each against the RoPE model, several seeds. Held-out = the last 10% of the corpus, as there.

- bits/char (trained rows): `xlab.py validate` over the whole held-out split: non-overlapping 64-token windows,
  except the memory rows (consecutive 64-token segments of 12 rows, each with the memory of its row's previous 64
  tokens: `data.segments`) and the context-extended row (256-token windows, its new length).
- bits/char (cache rows): the RoPE row's model scored token by token over the whole held-out split exactly as
  generation sees it (`xlabml.inference.score`: rows of 512 tokens scored at once, each token from the cache
  after its predecessors in its row; `--eval-tokens N` scores only the split's first N tokens): the exact sliding window of 64 tokens (the uncompressed reference), int8 KV, sinks + window,
  a window alone, H2O.
- step time vs classic: one training step (forward, backward, AdamW) of each trained row's model on a 12 x 64
  batch, all rows interleaved in one process, each row's fastest of several rounds (the least disturbed).
- KV bytes per token: the cache generation keeps for a 2,048-token context (a 2,048-slot cache; what a bounded
  cache, a memory's rolling window or a linear state keeps, whatever the context), over 2,048, batch 1, fp32.
- perplexity against context length (plot): the held-out split cut into chunks of 4,096 tokens, each scored from
  its own start in one pass; the value at L = 256 ... 4,096 is the bits/char over the first L tokens of every
  chunk. For RoPE with its whole context (trained on 64), RoPE with sinks + window, Transformer-XL (its segments
  with memory), linear attention and the context-extended model.

Stages (each resumable; runs and evaluations are cached under bench/out/): `--stage train` (the fits), `eval`
(scores per seed), `report` (speed, bytes, table, plot, JSON line); `all` does the three. Two processes may split
the seeds: `--seed-list 1` and `--seed-list 2`, then `--stage report`.

    bench/memory_variants.py --threads 1 --seeds 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import shakespeare as sk  # noqa: E402

REPO = sk.REPO
OUT = REPO / "bench" / "out" / "memory_variants"
EXTEND_LEN, EXTEND_STEPS, EXTEND_SCALE = 256, 200, 4.0
MEMORY = 64
CONTEXTS = [256, 512, 1024, 2048, 4096]
STREAM_ROW_LEN = 512  # tokens per streamed row: rows are scored at once, so more rows, fewer sequential steps

ROPE = {"position": "rope"}
# trained rows: (label, arch, model keywords, settings overrides); the arch names are bench/shakespeare.py variants
TRAINED = [
    ("classic seed (sinusoidal)", "classic", {}, {}),
    ("RoPE", "rope", ROPE, {}),
    (f"RoPE + Transformer-XL memory {MEMORY}", "xl", {**ROPE, "memory_len": MEMORY}, {}),
    (f"RoPE + XL memory {MEMORY}, KV recompute", "xl-recompute",
     {**ROPE, "memory_len": MEMORY, "memory_grad": "recompute"}, {}),
    ("linear attention (RoPE features)", "linear", {**ROPE, "attention": "linear"}, {}),
    ("RoPE + 4 attention registers", "registers", {**ROPE, "registers": 4}, {}),
    ("RoPE + KV shared by layer pairs", "kv-share", {**ROPE, "kv_share": 2}, {}),
    ("RoPE + local(16)/global layers", "layer-windows",
     {**ROPE, "layer_windows": ["local", "global"], "sliding_window": 16}, {}),
    (f"RoPE, context extended to {EXTEND_LEN} (PI x{EXTEND_SCALE:g})", "rope-extended",
     {**ROPE, "rope_scaling": "linear", "rope_scale": EXTEND_SCALE},
     {"seq_len": EXTEND_LEN, "steps": EXTEND_STEPS, "lr": 3e-4, "min_lr": 3e-5, "warmup": 20}),
    (f"RoPE, context extended to {EXTEND_LEN} (YaRN x{EXTEND_SCALE:g})", "rope-extended-yarn",
     {**ROPE, "rope_scaling": "yarn", "rope_scale": EXTEND_SCALE},
     {"seq_len": EXTEND_LEN, "steps": EXTEND_STEPS, "lr": 3e-4, "min_lr": 3e-5, "warmup": 20}),
]
EXTENDED = {"rope-extended", "rope-extended-yarn"}  # rows that continue the RoPE row's checkpoint at EXTEND_LEN
SEGMENT_ARCHS = {"xl", "xl-recompute"}
# cache rows: the RoPE row's model, scored through generation's cache with these options
CACHES = [
    ("RoPE, exact sliding window 64 (uncompressed reference)", {}),
    ("+ int8 KV cache", {"kv_dtype": "int8"}),
    ("+ attention sinks 4 + window 60 (StreamingLLM)", {"sink_tokens": 4, "window": 60}),
    ("+ window 64 without sinks", {"window": 64}),
    ("+ H2O: budget 64 (32 recent + 32 heavy hitters)", {"kv_budget": 64}),
]
# perplexity against context length: (label, arch of the model, how the chunk is scored)
CURVES = [
    ("RoPE, whole chunk (trained on 64)", "rope", "full"),
    ("RoPE + sinks 4 + window 60", "rope", "sinks"),
    (f"Transformer-XL memory {MEMORY}", "xl", "memory"),
    ("linear attention", "linear", "full"),
    (f"context-extended (PI x{EXTEND_SCALE:g} at {EXTEND_LEN})", "rope-extended", "full"),
    (f"context-extended (YaRN x{EXTEND_SCALE:g} at {EXTEND_LEN})", "rope-extended-yarn", "full"),
]


def _rope_run_dir(args, s: dict, split: dict, extra: list[str]) -> Path:
    base = sk.resolve_settings(_run_args(args, s["seed"]), {"arch": "rope"})
    return sk.WORK / "runs" / sk.run_name(base, extra, args.threads, split["digest"])


def _register(args, split: dict, extra: list[str]) -> None:
    """Adds this benchmark's variants to bench/shakespeare.py's (architectures, and config edits)."""
    for _, arch, model, overrides in TRAINED:
        if arch not in ("classic", "rope"):
            sk.ARCHS[arch] = model
        if arch in EXTENDED:
            overrides["steps"] = args.extend_steps

    def segments(config, s):
        config["data"]["segments"] = True

    def extend(config, s):
        ckpt = _rope_run_dir(args, s, split, extra) / "checkpoints" / "final.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"the context-extended row continues the RoPE row's checkpoint {ckpt}: train it first")
        config["model"]["init_from"] = str(ckpt)  # a new run from its weights, at the longer length

    for arch in SEGMENT_ARCHS:
        sk.ARCH_CONFIG[arch] = segments
    for arch in EXTENDED:
        sk.ARCH_CONFIG[arch] = extend


def _run_args(args, seed: int) -> argparse.Namespace:
    argv = ["--threads", str(args.threads)] if getattr(args, "threads", None) else []
    argv += ["--steps", str(args.steps)] if getattr(args, "steps", None) else []
    run_args, _ = sk.parse_args(argv)
    run_args.seed, run_args.force = seed, False
    return run_args


def _settings(args, seed: int, arch: str, overrides: dict) -> dict:
    s = sk.resolve_settings(_run_args(args, seed), {"arch": arch, **overrides})
    if arch in EXTENDED:  # --steps sets the other rows' budget; the continuation has its own (--extend-steps)
        s["steps"] = overrides["steps"]
    return s


def run_dir(args, seed, arch, overrides, split, extra) -> Path:
    return sk.WORK / "runs" / sk.run_name(_settings(args, seed, arch, overrides), extra, args.threads, split["digest"])


# ------------------------------------------------------------------------------------------------------ train

# the rows the context curves need first: a run cut short still has them
TRAIN_ORDER = ["classic", "rope", "rope-extended", "xl", "linear", "registers", "kv-share", "layer-windows",
               "xl-recompute", "rope-extended-yarn"]


def train(args, split, extra, seeds) -> None:
    for seed in seeds:
        for label, arch, _, overrides in sorted(TRAINED, key=lambda row: TRAIN_ORDER.index(row[1])):
            s = _settings(args, seed, arch, overrides)
            started = time.perf_counter()
            try:
                result = sk.run_one(_run_args(args, seed), s, split, extra, quiet=True)
            except sk.RunBusy:
                print(f"[train] {label} seed {seed}: running in another process", flush=True)
                continue
            print(f"[train] {label} seed {seed}: bpc {result['bpc']:.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)


# ------------------------------------------------------------------------------------------------------- eval

def _load(path: Path):
    from xlabml.models import XLabModel
    return XLabModel.load_from_checkpoint(str(path), map_location="cpu").eval().requires_grad_(False).model


def heldout_ids(split: dict) -> list[int]:
    from xlabml.tokenizer import Tokenizer
    tok_path = sk.tokenizer_file(_settings(argparse.Namespace(), 1, "rope", {}), split)[0]
    tok = Tokenizer.load(str(tok_path))
    return [tok[tok.sos_token], *tok.encode(split["heldout"].read_text(encoding="utf-8")), tok[tok.eos_token]]


def streamed_nll(model, ids, block_size: int, **options) -> tuple[float, int]:
    """Summed NLL and count of every target of `ids` scored as generation sees it, in rows of STREAM_ROW_LEN."""
    import torch

    from xlabml import inference
    ids = torch.tensor(ids)
    n = len(ids) - 1
    n_rows = max(1, n // STREAM_ROW_LEN)
    length = n // n_rows
    rows = torch.stack([ids[r * length:(r + 1) * length + 1] for r in range(n_rows)])
    total = float(inference.score(model, rows, block_size, **options).double().sum())
    count = n_rows * length
    if n > count:  # the tail, from its own start
        total += float(inference.score(model, ids[None, count:], block_size, **options).double().sum())
        count = n
    return total, count


def chunks(ids, length: int):
    import torch
    ids = torch.tensor(ids)
    count = (len(ids) - 1) // length
    return torch.stack([ids[c * length:(c + 1) * length + 1] for c in range(count)])  # c L+1


def chunk_nll(model, rows, how: str):
    """NLL (c, L) of every target of every chunk (c, L+1), each chunk scored from its own start: the mean over a
    chunk's first l targets is its loss at context length l (causal: a token never sees what follows)."""
    import torch
    import torch.nn.functional as F

    from xlabml import inference
    from xlabml.memory import SegmentMemory
    with torch.inference_mode():
        if how == "full":  # one row at a time: a 4,096-token forward is big enough
            return torch.cat([F.cross_entropy(model(row[None, :-1])[0].float(), row[1:], reduction="none")[None]
                              for row in rows])
        if how == "sinks":
            return inference.score(model, rows, model.max_len, sink_tokens=4, window=60)
        if how == "memory":
            memory, out = SegmentMemory(), []
            length = rows.shape[1] - 1
            for start in range(0, length, model.max_len):
                x = rows[:, start:min(start + model.max_len, length)]
                y = rows[:, start + 1:start + 1 + x.shape[1]]
                logits = model(x, memory=memory.segment(torch.full((len(rows),), start == 0)))
                out.append(F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none"))  # c l
            return torch.cat(out, dim=1)
    raise ValueError(how)


def evaluate(args, split, extra, seeds) -> None:
    import torch
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ids = heldout_ids(split)
    chars_per_target = split["heldout_chars"] / (len(ids) - 1)
    ids = ids[:args.eval_tokens + 1] if args.eval_tokens else ids
    to_bpc = lambda total, count: total / count / chars_per_target / math.log(2)  # noqa: E731
    for seed in seeds:
        dirs = {arch: run_dir(args, seed, arch, overrides, split, extra) for _, arch, _, overrides in TRAINED}
        path = eval_path(args, seed, split, extra)
        out = json.loads(path.read_text()) if path.is_file() else {"caches": {}, "curves": {}}
        if not (dirs["rope"] / "checkpoints" / "final.ckpt").is_file():
            print(f"[eval] seed {seed}: the RoPE row is not trained yet", flush=True)
            continue
        rope = _load(dirs["rope"] / "checkpoints" / "final.ckpt")
        for label, options in CACHES:
            if label not in out["caches"]:
                started = time.perf_counter()
                out["caches"][label] = to_bpc(*streamed_nll(rope, ids, rope.max_len, **options))
                print(f"[eval] seed {seed} {label}: {out['caches'][label]:.4f} bits/char "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                _write(path, out)
        for label, arch, how in CURVES:
            if not (dirs[arch] / "result.json").is_file():  # trained and scored: its checkpoint is final
                print(f"[eval] seed {seed} {label}: not trained yet (run --stage eval again later)", flush=True)
                continue
            model = rope if arch == "rope" else _load(dirs[arch] / "checkpoints" / "final.ckpt")
            curve = out["curves"].setdefault(label, {})
            if all(str(length) in curve for length in CONTEXTS):
                continue
            started = time.perf_counter()
            nll = chunk_nll(model, chunks(ids, CONTEXTS[-1]), how).double()  # c L
            for length in CONTEXTS:
                curve[str(length)] = to_bpc(float(nll[:, :length].sum()), nll[:, :length].numel())
            print(f"[eval] seed {seed} {label}: " + ", ".join(f"{length} {curve[str(length)]:.4f}"
                                                              for length in CONTEXTS)
                  + f" bits/char ({time.perf_counter() - started:.0f} s)", flush=True)
            _write(path, out)


def eval_path(args, seed: int, split: dict, extra: list[str]) -> Path:
    """Where one seed's scores are kept: named by its RoPE run (settings, seed, corpus) and the tokens scored."""
    rope = run_dir(args, seed, "rope", {}, split, extra).name
    return OUT / f"eval-{rope}-{args.eval_tokens or 'all'}.json"


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- report

SPEED_CODE = r"""
import json, sys, time, torch
from xlabml.memory import SegmentMemory
from xlabml.models import XLabModel
variants, steps, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
runs = {}
for label, kw in variants.items():
    model = XLabModel(**kw).model.train()
    memory = SegmentMemory(recompute=kw.get("memory_grad") == "recompute") if kw.get("memory_len") else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(4, kw["n_vocab"], (12, kw["max_len"]))
    runs[label] = (model, opt, x, memory)
def step(model, opt, x, memory):
    logits = model(x, memory=memory) if memory is not None else model(x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
times = {label: [] for label in variants}
for run in runs.values():
    for _ in range(3):
        step(*run)
for _ in range(rounds):  # interleaved: every variant sees the same machine load
    for label, run in runs.items():
        start = time.perf_counter()
        for _ in range(steps):
            step(*run)
        times[label].append((time.perf_counter() - start) / steps)
print(json.dumps({label: min(t) for label, t in times.items()}))
"""


def model_kwargs(arch_model: dict, vocab: int, max_len: int = 64) -> dict:
    preset = sk.PRESETS["nanogpt-cpu"]
    return {"n_vocab": vocab, "max_len": max_len, "d_model": preset["d_model"], "n_layers": preset["n_layers"],
            "n_heads": preset["n_heads"], "d_ff": preset["d_ff"], "dropout": 0.0, **arch_model}


def measure_speed(args, vocab: int, steps: int = 5, rounds: int = 6) -> dict:
    """Seconds per training step of every trained row at the base length (the extension row's steps are 4x
    longer, so it is left out), interleaved in one process."""
    variants = {label: model_kwargs(model, vocab) for label, arch, model, _ in TRAINED if arch not in EXTENDED}
    env = dict(os.environ, PYTHONPATH=sk.python_path(), **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    out = subprocess.run([sys.executable, "-c", SPEED_CODE, json.dumps(variants), str(steps), str(rounds)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def kv_bytes(vocab: int) -> dict:
    """Cache bytes per token of a 2,048-token context, fp32, batch 1 (see the module doc)."""
    from xlabml.layers import Decoder
    context = 2048
    out = {}

    def per_token(decoder, **options):
        cache = decoder.init_cache(1, max_len=decoder.context_len if decoder.memory_len else context, **options)
        return sum(b.numel() * b.element_size() for b in cache.buffers()) / context

    for label, arch, model, _ in TRAINED:
        out[label] = per_token(Decoder(**model_kwargs(model, vocab)))
    rope = Decoder(**model_kwargs(ROPE, vocab))
    for label, options in CACHES:
        out[label] = per_token(rope, **options)
    return out


def report(args, split, extra, seeds) -> dict:
    from xlabml.tokenizer import Tokenizer
    results = sk.results_dir(split)
    results.mkdir(parents=True, exist_ok=True)
    vocab = len(Tokenizer.load(str(sk.tokenizer_file(_settings(args, 1, "rope", {}), split)[0])))
    trained = {label: [] for label, *_ in TRAINED}
    for seed in seeds:
        for label, arch, _, overrides in TRAINED:
            path = run_dir(args, seed, arch, overrides, split, extra) / "result.json"
            if path.is_file():
                trained[label].append(json.loads(path.read_text()))
    evals = [json.loads(p.read_text()) for seed in seeds
             if (p := eval_path(args, seed, split, extra)).is_file()]
    speed_path = results / "memory_variants_speed.json"
    if args.speed or not speed_path.is_file():
        speed_path.write_text(json.dumps(measure_speed(args, vocab), indent=1))
    speed = json.loads(speed_path.read_text())
    base = speed.get(TRAINED[0][0])
    bytes_ = kv_bytes(vocab)

    def cell(values):
        if not values:
            return "-", None
        mid = statistics.median(values)
        spread = f" ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""
        return f"{mid:.3f}{spread}", mid

    lines = ["| variant | held-out bits/char | scored as | step time vs classic | KV bytes/token @2,048 | seeds |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    summary = {}
    protocols = {"xl": "segments + memory", "xl-recompute": "segments + memory",
                 **{arch: f"{EXTEND_LEN}-token windows" for arch in EXTENDED}}
    for label, arch, _, _ in TRAINED:
        text, mid = cell([r["bpc"] for r in trained[label]])
        summary[label] = mid
        ratio = f"{speed[label] / base:.2f}x" if base and label in speed else "-"
        lines.append(f"| {label} | {text} | {protocols.get(arch, '64-token windows')} | {ratio} | "
                     f"{bytes_[label]:,.0f} | {len(trained[label])} |")
    for label, _ in CACHES:
        text, mid = cell([e["caches"][label] for e in evals if label in e["caches"]])
        summary[label] = mid
        lines.append(f"| {label} | {text} | streamed, as generated | (RoPE) | {bytes_[label]:,.0f} | "
                     f"{sum(label in e['caches'] for e in evals)} |")
    curves = {}
    for label, *_ in CURVES:
        points = {}
        for length in CONTEXTS:
            values = [e["curves"][label][str(length)] for e in evals if str(length) in e["curves"].get(label, {})]
            if values:
                points[length] = (statistics.mean(values), (max(values) - min(values)) / 2)
        curves[label] = points
    loads = [r["load_avg"] for rs in trained.values() for r in rs] or [0.0]
    steps = args.steps or sk.PRESETS["nanogpt-cpu"]["steps"]
    budget = "as in ablation.md: " if steps == sk.PRESETS["nanogpt-cpu"]["steps"] else "cut from ablation.md's 2,000: "
    command = f"bench/memory_variants.py --threads {args.threads or 1} --seeds {len(seeds)}"
    scored = f"its first {args.eval_tokens:,} tokens" if args.eval_tokens else "all of it"
    command += (f" --eval-tokens {args.eval_tokens}" if args.eval_tokens else "")
    command += (f" --steps {args.steps}" if args.steps else "") + (
        f" --extend-steps {args.extend_steps}" if args.extend_steps != EXTEND_STEPS else "")
    note = (f"\nMedian of the seeds (± half the range). Budget {budget}{steps:,} steps of 12 x 64 characters, "
            f"4 layers, d_model 128, 4 heads, d_ff 512, AdamW (beta2 0.99, wd 0.1), warmup 100 + cosine 1e-3 -> 1e-4, "
            f"no dropout; every row but the classic one uses RoPE. The context-extended rows continue each seed's RoPE "
            f"checkpoint (`model.init_from`) for {args.extend_steps} steps of 12 x {EXTEND_LEN} with RoPE scaled "
            f"x{EXTEND_SCALE:g} (position interpolation, or YaRN), lr 3e-4 -> 3e-5. Held-out: the last 10% of {Path(split['corpus']).name} (sha256 {split['digest']}, "
            f"{split['heldout_chars']:,} characters): all of it for the trained rows; {scored} for the cache rows "
            f"and the context curves. 'scored as': 64-token windows = "
            f"`xlab.py validate`, non-overlapping windows from fresh context; segments + memory = consecutive "
            f"64-token segments of 12 rows, each with the memory of its row's previous {MEMORY} tokens; streamed = "
            f"every token from generation's cache after all its predecessors (`xlabml.inference.score`, "
            f"rows of {STREAM_ROW_LEN:,} tokens). "
            f"Step time: one training step on 12 x 64, all trained rows interleaved in one process, fastest of 6 "
            f"rounds; the memory rows include their memory, the recompute row its second forward. KV bytes: the "
            f"cache generation keeps for a 2,048-token context (2,048 slots; bounded caches, the memory model's "
            f"rolling window of {MEMORY} + 64 and linear attention's state whatever the context) / 2,048, fp32, "
            f"batch 1. Machine: {platform.node()}, {os.cpu_count()} cores shared with other jobs (load average "
            f"{min(loads):.1f}-{max(loads):.1f}), torch threads per run: {args.threads or 'default'}. Command: "
            f"`{command}`.\n")
    table = "\n".join(lines) + "\n" + note
    context_lines = ["| context (tokens) | " + " | ".join(str(c) for c in CONTEXTS) + " |",
                     "| --- | " + " | ".join("---:" for _ in CONTEXTS) + " |"]
    for label, points in curves.items():
        context_lines.append(f"| {label} | " + " | ".join(
            f"{points[c][0]:.3f}" if c in points else "-" for c in CONTEXTS) + " |")
    table += "\nBits/char against context length (mean of the seeds; the first L tokens of each 4,096-token held-out chunk, scored from the chunk's start):\n\n"
    table += "\n".join(context_lines) + "\n"
    (results / "memory_variants.md").write_text(table)
    figures = {"bpc": summary, "speed_vs_classic": {k: v / base for k, v in speed.items()} if base else {},
               "kv_bytes_per_token_2048": bytes_, "context_bpc": {k: {c: v[0] for c, v in p.items()}
                                                                  for k, p in curves.items()},
               "corpus": split["digest"], "seeds": len(seeds)}
    (results / "memory_variants.json").write_text(json.dumps(figures, indent=1))
    references = [e["caches"][CACHES[0][0]] for e in evals if CACHES[0][0] in e["caches"]]
    reference = statistics.median(references) if references else None  # the table's value, not one seed's
    plot(curves, results / "memory_context.png", reference, steps)
    print(table)
    return figures


def plot(curves: dict, path: Path, reference: float | None, steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        if not points:
            continue
        xs = sorted(points)
        ax.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs], marker="o", capsize=3,
                    label=label, linewidth=1.3)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=0.8,
                   label=f"RoPE, exact sliding window of 64 (streamed) {reference:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
    ax.set_xlabel("context L: the first L tokens of each 4,096-token held-out chunk, scored from its start")
    ax.set_ylabel("held-out bits/char over the first L tokens")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.set_title(f"Tiny Shakespeare, nanoGPT's CPU model, {steps:,} steps on 64 tokens: bits/char vs context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=sk.DEFAULT_CORPUS)
    p.add_argument("--seeds", type=int, default=2, help="seeds 1..N (default 2)")
    p.add_argument("--seed-list", help="comma-separated seeds this process trains/evaluates (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--stage", choices=["train", "eval", "report", "all"], default="all")
    p.add_argument("--speed", action="store_true", help="measure step times again (else reuse the last)")
    p.add_argument("--steps", type=int, help="training steps of every row (default: the budget's; for a smoke test)")
    p.add_argument("--eval-tokens", type=int, help="score only the first N held-out tokens (default: all of them)")
    p.add_argument("--extend-steps", type=int, default=EXTEND_STEPS,
                   help=f"steps of the context-extended row at {EXTEND_LEN} tokens (default {EXTEND_STEPS})")
    args = p.parse_args(argv)
    split = sk.split_corpus(args.corpus.expanduser().resolve(), sk.WORK)
    extra: list[str] = []
    _register(args, split, extra)
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(1, args.seeds + 1))
    if args.stage in ("train", "all"):
        train(args, split, extra, seeds)
    if args.stage in ("eval", "all"):
        evaluate(args, split, extra, seeds)
    if args.stage in ("report", "all"):
        figures = report(args, split, extra, list(range(1, args.seeds + 1)))
        print(json.dumps(figures))


if __name__ == "__main__":
    main()

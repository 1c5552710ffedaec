#!/usr/bin/env python3
"""What half precision and quantization cost a trained model: held-out bits per character in float32, bfloat16,
float16, and with int8 and int4 weights.

Trains a character-level model briefly on a text corpus (default: Tiny Shakespeare, first 90% of its characters;
nanoGPT's CPU configuration: 4 layers, d_model 128, 4 heads, FFN 512, context 64, batch 12), then scores the
held-out 10% with the same weights cast to each dtype, and quantized (``xlabml.quantize``: int8 per output
channel; int4 in groups of 128 where the kernel takes the matrix, else int8), the way ``xlabml.inference`` runs
them (CPU linear layers on packed weights, ``xlabml.packed``, or on the int8/int4 kernels; logits cast to float32
before the softmax):

    bpc = (loss summed over every held-out target character) / (held-out target characters) / ln 2

over non-overlapping windows of the model's context, each starting fresh (its first character is context only).
The difference to float32 is the quality cost; the targets are <= 0.005 bits/char for bfloat16 and <= 0.02 for
int8.

    python bench/quality.py [--corpus PATH] [--steps 1000] [--position sinusoidal] [--threads 2]

The last line is JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from xlabml import packed  # noqa: E402
from xlabml.layers import Decoder  # noqa: E402
from xlabml.quantize import quantize  # noqa: E402

# the corpus sits in the workspace's shared folder, beside the checkout or beside its worktree folder
CORPORA = [REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
           REPO.parent.parent / "shared" / "data" / "tinyshakespeare.txt"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_BF16 = 0.005  # bits/char
TARGET_INT8 = 0.02
QUANTIZED = {"int8": {"scheme": "int8"}, "int4": {"scheme": "int4", "group_size": 128}}  # of the float32 model


def load_corpus(path: Path | None) -> str:
    candidates = [path] if path else CORPORA
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise SystemExit(f"corpus not found: {', '.join(map(str, candidates))}; give one with --corpus")


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of `length + 1` ids sharing their end points (w, length + 1)."""
    n = (len(ids) - 1) // length
    return ids[:n * length + 1].unfold(0, length + 1, length)


def train(model: Decoder, data: torch.Tensor, steps: int, batch: int, length: int, lr: float, seed: int) -> float:
    """AdamW with linear warm-up and cosine decay to lr/10 on random windows; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    decay = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(
            math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach())


@torch.inference_mode()
def bits_per_char(model: Decoder, heldout: torch.Tensor, length: int, batch: int = 64) -> float:
    model.eval()
    w = windows(heldout, length)
    total = 0.0
    with packed.prepacked(model):
        for i in range(0, len(w), batch):
            chunk = w[i:i + batch]
            logits = model(chunk[:, :-1]).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return total / (w.shape[0] * length) / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--position", default="sinusoidal", help="the model's position encoding (default: the "
                        "release model's)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    text = load_corpus(args.corpus)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    train_ids, heldout = ids[:cut], ids[cut:]
    length = 64
    torch.manual_seed(args.seed)
    model = Decoder(len(vocab), length, d_model=128, n_layers=4, n_heads=4, d_ff=512, dropout=0.0,
                    position=args.position)
    print(f"corpus: {len(text):,} characters, {len(vocab)} distinct; train {cut:,}, held out {len(heldout):,}; "
          f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"model: 4 layers, d_model 128, 4 heads, FFN 512, context {length}, position {args.position}; "
          f"{args.steps} steps of batch 12, AdamW lr {args.lr}")
    t = time.perf_counter()
    last_loss = train(model, train_ids, args.steps, 12, length, args.lr, args.seed)
    train_s = time.perf_counter() - t
    print(f"trained in {train_s:.1f} s, last training loss {last_loss:.3f} nats/char")
    bpc = {}
    for name, dtype in DTYPES.items():
        bpc[name] = round(bits_per_char(copy.deepcopy(model).to(dtype), heldout, length), 5)
    for name, spec in QUANTIZED.items():
        bpc[name] = round(bits_per_char(quantize(copy.deepcopy(model), **spec), heldout, length), 5)
    print(f"\n{'dtype':<8}{'bits/char':>11}{'vs fp32':>10}")
    for name, value in bpc.items():
        print(f"{name:<8}{value:>11.4f}{value - bpc['fp32']:>+10.4f}")
    cost = round(bpc["bf16"] - bpc["fp32"], 5)
    met = "met" if abs(cost) <= TARGET_BF16 else "NOT met"
    print(f"bf16 costs {cost:+.4f} bits/char (target <= {TARGET_BF16}): {met}")
    int8 = round(bpc["int8"] - bpc["fp32"], 5)
    print(f"int8 costs {int8:+.4f} bits/char (target <= {TARGET_INT8}): "
          f"{'met' if int8 <= TARGET_INT8 else 'NOT met'}")
    print(json.dumps({"bpc": bpc, "bf16_minus_fp32": cost, "fp16_minus_fp32": round(bpc["fp16"] - bpc["fp32"], 5),
                      "int8_minus_fp32": int8, "int4_minus_fp32": round(bpc["int4"] - bpc["fp32"], 5),
                      "target_bf16": TARGET_BF16, "target_int8": TARGET_INT8, "steps": args.steps,
                      "position": args.position,
                      "train_s": round(train_s, 1), "load_average": round(os.getloadavg()[0], 1),
                      "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()

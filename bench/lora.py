#!/usr/bin/env python3
"""What LoRA saves against a full fine-tune of the same model, measured in one run.

Model: the release architecture of ``conf/xlab.yaml`` (6 layers, d_model 512, 8 heads, FFN 2048, 32768-token
vocabulary, sequence 512) unless ``--small``; adapters: ``conf/extra/lora.yaml``'s settings (rank 8, alpha 16,
dropout 0.05, targets attn.qkv, attn.proj, ffn.fc, ffn.proj). Figures, each next to its full fine-tune
reference:

- trainable parameters and the size of a saved checkpoint (weights + AdamW state, as Lightning saves it; a LoRA
  checkpoint keeps the adapters and their moments only, ``XLabModel.on_save_checkpoint``);
- a training step (forward, backward, AdamW step) on random tokens, fp32 on the CPU: the best of ``--steps``
  steps after one warm-up step, interleaved with the reference, the same step with every weight trainable;
- a forward pass of the trained adapters (``eval``) against a copy after ``merge_lora``, interleaved likewise
  (which also gives the largest logit difference between the two).

    python bench/lora.py [--steps 5] [--batch 2] [--seq 256] [--threads 2] [--small]

The last line printed is one JSON object with all figures.
"""

import argparse
import copy
import io
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import torch  # noqa: E402
import yaml  # noqa: E402

from xlabml.lora import apply_lora, merge_lora, trainable_parameters  # noqa: E402
from xlabml.models import XLabModel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
RELEASE = dict(n_vocab=32768, max_len=512, d_model=512, n_layers=6, n_heads=8, d_ff=2048, dropout=0.0)
SMALL = dict(n_vocab=512, max_len=128, d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0)


def lora_settings() -> dict:
    with open(os.path.join(ROOT, 'conf', 'extra', 'lora.yaml')) as f:
        return yaml.safe_load(f)['model']['lora']


def build(arch: dict, lora: dict | None) -> XLabModel:
    torch.manual_seed(0)
    model = XLabModel(**arch)
    if lora is not None:  # as XLabModel(lora=...) does, without a base file to read
        apply_lora(model.model, **lora)
    return model


def train_step(model: XLabModel, optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss, _, _ = model.batch_loss(batch, accuracy=False)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def checkpoint_bytes(model: XLabModel, optimizer) -> int:
    """Size of weights + optimizer state saved with torch.save; a LoRA run saves its adapters only."""
    checkpoint = {'state_dict': model.state_dict(), 'optimizer_states': [optimizer.state_dict()]}
    if any(not p.requires_grad for p in model.parameters()):
        keys = {n for n, p in model.named_parameters() if p.requires_grad}
        checkpoint['state_dict'] = {k: v for k, v in checkpoint['state_dict'].items() if k in keys}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return len(buffer.getvalue())


def forward(model: XLabModel, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(x)
        return time.perf_counter() - start, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--seq', type=int, default=256)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--small', action='store_true', help='a 2-layer, 64-wide model instead of the release one')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch, lora = SMALL if args.small else RELEASE, lora_settings()
    seq = min(args.seq, arch['max_len'])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch['n_vocab'], (args.batch, seq + 1), generator=g)
    batch = {'x': tokens[:, :-1], 'y': tokens[:, 1:]}

    full, adapted = build(arch, None).train(), build(arch, lora).train()
    n_full, n_lora = trainable_parameters(full), trainable_parameters(adapted)
    optimizers = full.configure_optimizers(), adapted.configure_optimizers()
    times = [[], []]
    for i in range(args.steps + 1):  # interleaved: load from other processes hits both alike
        for k, model in enumerate((full, adapted)):
            seconds = train_step(model, optimizers[k], batch)
            if i:  # the first step allocates the optimizer state
                times[k].append(seconds)
    full_step, lora_step = min(times[0]), min(times[1])
    full_bytes, lora_bytes = checkpoint_bytes(full, optimizers[0]), checkpoint_bytes(adapted, optimizers[1])
    adapted.eval()
    merged_model = copy.deepcopy(adapted)
    merge_lora(merged_model.model)
    times = [[], []]
    for i in range(args.steps + 1):
        for k, model in enumerate((adapted, merged_model)):
            seconds, logits = forward(model, batch['x'])
            if i:
                times[k].append(seconds)
            if k == 0:
                unmerged = logits
            else:
                merged = logits
    unmerged_s, merged_s = min(times[0]), min(times[1])
    max_diff = float((merged - unmerged).abs().max())

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}; model {'small' if args.small else 'release'} "
          f"({n_full / 1e6:.1f}M parameters), batch {args.batch} x {seq}, fp32, LoRA {lora}")
    print(f"  trainable parameters  LoRA {n_lora:>12,}   full fine-tune {n_full:>12,}   ({n_lora / n_full:.2%})")
    print(f"  checkpoint            LoRA {lora_bytes / 1e6:>10.2f} MB   full fine-tune "
          f"{full_bytes / 1e6:>10.2f} MB   ({lora_bytes / full_bytes:.2%})")
    print(f"  training step         LoRA {lora_step * 1e3:>10.1f} ms   full fine-tune {full_step * 1e3:>10.1f} ms   "
          f"(ratio {lora_step / full_step:.2f})")
    print(f"  forward pass          adapters {unmerged_s * 1e3:>7.1f} ms   merged {merged_s * 1e3:>17.1f} ms   "
          f"(ratio {unmerged_s / merged_s:.2f}); largest logit difference {max_diff:.2e}")
    print(json.dumps({
        'model': 'small' if args.small else 'release', 'batch': args.batch, 'seq': seq, 'threads': args.threads,
        'load_average': round(os.getloadavg()[0], 1), 'lora': lora,
        'trainable_params': n_lora, 'checkpoint_mb': round(lora_bytes / 1e6, 2),
        'step_ms': round(lora_step * 1e3, 1), 'forward_adapters_ms': round(unmerged_s * 1e3, 1),
        'merged_max_abs_diff': max_diff,
        'reference': {'trainable_params': n_full, 'checkpoint_mb': round(full_bytes / 1e6, 2),
                      'step_ms': round(full_step * 1e3, 1), 'forward_merged_ms': round(merged_s * 1e3, 1)},
        'step_ratio': round(lora_step / full_step, 3), 'forward_ratio': round(unmerged_s / merged_s, 3)}))


if __name__ == '__main__':
    main()

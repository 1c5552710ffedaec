#!/usr/bin/env python3
"""Where batch-1 compiled decoding spends its time on a GPU: the per-token time of `inference.greedy_search(...,
compile=True)` (CUDA graphs) for 1 and 12 layers of GPT-2-small width (d_model 768, vocabulary 32,768, bf16), then
a `torch.profiler` table of 32 decode steps of the 12-layer model, by host time and by GPU time, and the GPU time
and kernel count per token. If the GPU time per token is close to the measured time per token, the kernels
themselves (their count and each one's latency), not the host, bound the speed.

    python bench/decode_profile.py [--new 256]

Without a CUDA device it says so and exits 0.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import torch  # noqa: E402

CONFIG = dict(n_vocab=32768, max_len=1024, d_model=768, n_heads=12, d_ff=3072)


def model_of(n_layers):
    from xlabml.models import XLabModel
    torch.manual_seed(0)
    return XLabModel(**CONFIG, n_layers=n_layers, dropout=0.0, pad_index=None).cuda().to(torch.bfloat16).eval()


def per_token_s(model, new):
    """Seconds per generated token: a run of `new` tokens minus one of `new // 4` (prefill and setup cancel)."""
    from xlabml import inference
    prompt = torch.randint(0, CONFIG['n_vocab'], (32,), device='cuda')
    run = lambda n: inference.greedy_search(model, prompt, n, block_size=CONFIG['max_len'], compile=True)
    run(new)  # compilation, graph capture
    times = {}
    for n in (new, new // 4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(n)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - start
    return (times[new] - times[new // 4]) / (new - new // 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--new', type=int, default=256, help='tokens per timed run')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench/decode_profile.py profiles GPU decoding; nothing to measure here")
        return
    from torch.profiler import ProfilerActivity, profile
    from xlabml import inference
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for n_layers in (1, 12):
        print(f"layers {n_layers:2d}: compiled decode {per_token_s(model_of(n_layers), args.new) * 1e3:.3f} ms/token",
              flush=True)
    model = model_of(12)
    prompt = torch.randint(0, CONFIG['n_vocab'], (32,), device='cuda')
    steps = 32
    inference.greedy_search(model, prompt, 2 * steps, block_size=CONFIG['max_len'], compile=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        inference.greedy_search(model, prompt, steps, block_size=CONFIG['max_len'], compile=True)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    print(table.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    print(f"{steps} tokens: {len(kernels)} GPU kernels ({len(kernels) / steps:.0f} a token), GPU time "
          f"{gpu_us / steps / 1e3:.3f} ms a token")


if __name__ == '__main__':
    main()

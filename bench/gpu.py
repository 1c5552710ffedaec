#!/usr/bin/env python3
"""GPU throughput of XLab at GPT-2-small size (12 layers, d_model 768, 12 heads, FFN 3072, vocabulary 32,768,
sequence 1024): training tokens/s and model FLOPs utilisation (MFU) in bf16, and batch-1 greedy decoding
tokens/s with the fraction of the memory bandwidth it uses, each eager and compiled (``torch.compile``; decoding
through ``xlabml.inference`` with CUDA graphs), measured in the same run so the ratio is the figure to quote.

Training: bf16-mixed autocast, AdamW, the chunked loss (the model's default ``loss_chunk_size``), random tokens;
FLOPs per token = 6 N (N: parameters that multiply, the head included, embeddings not) + 12 L T d for the
attention scores (PaLM, appendix B); MFU = tokens/s x FLOPs per token / the device's peak dense bf16 FLOP/s.
Decoding: bf16 weights, a 32-token prompt, ``--new`` tokens; a step must read every matrix once (bytes of the
weights that multiply, the head included) plus the KV cache written so far (the least it can read: a static cache
reads all its slots); bandwidth fraction = those bytes per token x tokens/s / the device's peak memory bandwidth.
Peaks come from a table of known GPUs or the flags.

    python bench/gpu.py [--batch 16] [--steps 20] [--new 256] [--peak-tflops 989] [--peak-tbps 3.35]

Without a CUDA device it says so and exits 0. The last line printed is one JSON object with all figures.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import torch  # noqa: E402

CONFIG = dict(n_vocab=32768, max_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072)
# (name fragment as torch.cuda.get_device_name reports it, dense bf16 TFLOP/s, memory TB/s), most specific first
DEVICES = [
    ('GH200', 989, 4.0), ('H200', 989, 4.8), ('H100 PCIe', 756, 2.0), ('H100 NVL', 835, 3.9), ('H100', 989, 3.35),
    ('A100-SXM4-80GB', 312, 2.04), ('A100 80GB PCIe', 312, 1.94), ('A100', 312, 1.555), ('L40S', 362, 0.864),
    ('L4', 121, 0.3), ('A10G', 70, 0.6), ('A10', 125, 0.6), ('RTX 4090', 165, 1.008), ('RTX 3090', 71, 0.936),
    ('V100', 125, 0.9),
]


def peaks(name, tflops, tbps):
    known = next(((f, b) for fragment, f, b in DEVICES if fragment in name), (None, None))
    return (tflops or known[0]), (tbps or known[1])


def model_of(dtype=None, **kwargs):
    from xlabml.models import XLabModel
    torch.manual_seed(0)
    model = XLabModel(**CONFIG, dropout=0.0, pad_index=None, **kwargs).cuda()
    return model.to(dtype) if dtype is not None else model


def matmul_parameters(model):
    """Parameters that take part in a matrix product for every token: linear layers' weights (the head too)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train(batch, steps, warmup, compile_model):
    from xlabml.models import default_optimizer
    model = model_of().train()
    if compile_model:
        model.model.compile()
    optimizer = default_optimizer(model.parameter_groups())
    g = torch.Generator(device='cuda').manual_seed(0)
    data = torch.randint(0, CONFIG['n_vocab'], (batch, CONFIG['max_len'] + 1), device='cuda', generator=g)
    batch_dict = {'x': data[:, :-1], 'y': data[:, 1:]}
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss, _, _ = model.batch_loss(batch_dict, accuracy=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = matmul_parameters(model)
    flops_per_token = 6 * n + 12 * CONFIG['n_layers'] * CONFIG['max_len'] * CONFIG['d_model']
    return {'tokens_per_s': steps * batch * CONFIG['max_len'] / seconds, 'flops_per_token': flops_per_token,
            'step_s': seconds / steps, 'peak_memory_bytes': torch.cuda.max_memory_allocated(),
            'loss': loss.item()}


def decode(new, compile_model, prompt_len=32):
    from xlabml import inference
    model = model_of(torch.bfloat16).eval()
    prompt = torch.randint(0, CONFIG['n_vocab'], (prompt_len,), device='cuda',
                           generator=torch.Generator(device='cuda').manual_seed(1))
    run = lambda: inference.greedy_search(model, prompt, new, block_size=CONFIG['max_len'], compile=compile_model)
    run()  # warm-up: compilation and graph capture, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    weight_bytes = 2 * matmul_parameters(model)
    # the KV cache read per step: keys and values of every layer for the tokens so far (mean context)
    head_dim = CONFIG['d_model'] // CONFIG['n_heads']
    kv_bytes = 2 * CONFIG['n_layers'] * model.model.n_kv_heads * head_dim * 2 * (prompt_len + new / 2)
    return {'tokens_per_s': len(tokens) / seconds, 'bytes_per_token': weight_bytes + kv_bytes,
            'weight_bytes': weight_bytes, 'tokens': tokens.tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=16, help='training batch (rows of 1024 tokens)')
    parser.add_argument('--steps', type=int, default=20, help='timed training steps')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation)')
    parser.add_argument('--new', type=int, default=256, help='tokens generated per decode run')
    parser.add_argument('--peak-tflops', type=float, help="the device's dense bf16 peak (default: from a table)")
    parser.add_argument('--peak-tbps', type=float, help="the device's memory bandwidth (default: from a table)")
    parser.add_argument('--no-compile', action='store_true', help='eager only')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures GPU training and decoding throughput; nothing to measure here "
              "(bench/train.py and bench/generate.py measure the CPU)")
        print(json.dumps({'benchmark': 'gpu', 'cuda': False, 'torch': torch.__version__}))
        return
    torch.backends.cuda.matmul.allow_tf32 = True  # what a user's fp32 parts would run at; bf16 is unaffected
    name = torch.cuda.get_device_name()
    peak_tflops, peak_tbps = peaks(name, args.peak_tflops, args.peak_tbps)
    modes = [False] if args.no_compile else [False, True]
    training = {}
    decoding = {}
    for compiled in modes:
        key = 'compiled' if compiled else 'eager'
        training[key] = train(args.batch, args.steps, args.warmup * (4 if compiled else 1), compiled)
        decoding[key] = decode(args.new, compiled)
        if peak_tflops:
            training[key]['mfu'] = training[key]['tokens_per_s'] * training[key]['flops_per_token'] / (
                peak_tflops * 1e12)
        if peak_tbps:
            decoding[key]['bandwidth_fraction'] = decoding[key]['tokens_per_s'] * decoding[key]['bytes_per_token'] / (
                peak_tbps * 1e12)
    same_tokens = len(modes) == 2 and decoding['eager']['tokens'] == decoding['compiled']['tokens']

    print(f"device: {name}, torch {torch.__version__}; peaks: {peak_tflops} bf16 TFLOP/s, {peak_tbps} TB/s "
          f"({'flags' if args.peak_tflops or args.peak_tbps else 'table'}; None = unknown device, pass the flags)")
    with torch.device('meta'):
        from xlabml.models import XLabModel
        print(f"model: {CONFIG}, {matmul_parameters(XLabModel(**CONFIG)) / 1e6:.1f}M parameters in matrices")
    for key, r in training.items():
        print(f"  training {key:8s} batch {args.batch} x {CONFIG['max_len']}: {r['tokens_per_s']:12,.0f} tokens/s, "
              f"step {r['step_s'] * 1e3:.1f} ms, MFU {r.get('mfu', float('nan')):.1%}, peak memory "
              f"{r['peak_memory_bytes'] / 2**30:.1f} GiB")
    for key, r in decoding.items():
        print(f"  decoding {key:8s} batch 1, {args.new} tokens: {r['tokens_per_s']:10,.1f} tokens/s, "
              f"{r['bytes_per_token'] / 1e6:.0f} MB read per token, "
              f"{r.get('bandwidth_fraction', float('nan')):.1%} of peak bandwidth")
    if len(modes) == 2:
        speedup = lambda d: d['compiled']['tokens_per_s'] / d['eager']['tokens_per_s']
        print(f"  compiled / eager: training {speedup(training):.2f}x, decoding {speedup(decoding):.2f}x; "
              f"compiled decoding gave the eager tokens: {same_tokens}")
    for r in decoding.values():
        r.pop('tokens')
    print(json.dumps({'benchmark': 'gpu', 'cuda': True, 'device': name, 'torch': torch.__version__,
                      'config': CONFIG, 'batch': args.batch, 'new_tokens': args.new, 'peak_tflops': peak_tflops,
                      'peak_tbps': peak_tbps, 'training': training, 'decoding': decoding,
                      'compiled_decode_same_tokens': same_tokens}))


if __name__ == '__main__':
    main()

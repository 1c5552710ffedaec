#!/usr/bin/env python3
"""Training throughput of the XLab model: a plain PyTorch loop vs Lightning ``Trainer.fit`` on the same model,
so the framework's overhead is visible.

Reference configuration (CPU, fp32, 2 threads): 4 layers, d_model 128, 4 heads, FFN 512, seq 64, batch 12,
vocabulary 65 (character level), random tokens. Reference: nanoGPT at these dims trains at about 20,000
tokens/s on these 2-core machines (38 ms per 768-token iteration; quoted, not measured here). Target: the
Lightning fit at least 1.2x that.

Lightning is timed twice: "minimal" (no logger, checkpointing, progress bar or model summary) and "default"
(a TensorBoard/CSV logger, checkpointing, progress bar and summary as a plain ``Trainer()`` has). Each figure
is the best of ``--repeats`` runs, interleaved, because these machines are shared; besides whole-run wall
throughput it prints a "fast-step" figure from the 10th-percentile step time, which varies much less under
load from other processes. With CUDA, a GPU section
times GPT-2-small dims in bf16 and prints the model FLOPs utilisation (MFU).

    python bench/train.py [--steps 100] [--repeats 3] [--compile] [--threads 2]

The last line printed is one JSON object with all figures.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

NANOGPT_TOKENS_PER_S = 20_000  # nanoGPT, same dims, 2 cores (38 ms per 12 x 64 tokens), from the issue
TARGET_FACTOR = 1.2
REFERENCE = dict(n_vocab=65, max_len=64, d_model=128, n_layers=4, n_heads=4, d_ff=512)
BATCH = 12
GPT2_SMALL = dict(n_vocab=50304, max_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072)
PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12}


class RandomTokens(Dataset):
    """``steps * batch`` random windows, as a data module yields them (dict of x, y)."""

    def __init__(self, n_vocab, seq_len, count, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, n_vocab, (count, seq_len + 1), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        return {'x': row[:-1], 'y': row[1:]}


def build(config, dropout, compile_model, **kwargs):
    from xlabml.models import XLabModel
    torch.manual_seed(0)
    return XLabModel(**config, dropout=dropout, compile=compile_model, pad_index=None, **kwargs)


def loader(config, steps, batch):
    return DataLoader(RandomTokens(config['n_vocab'], config['max_len'], steps * batch), batch_size=batch,
                      shuffle=True, drop_last=True)


def plain_loop(config, steps, warmup, batch, dropout, compile_model, device='cpu', autocast=None):
    """Timing of forward + backward + AdamW step, written by hand over the same model and data."""
    from xlabml.models import default_optimizer
    module = build(config, dropout, False)
    model = module.model.to(device).train()
    if compile_model:
        model.compile()
    optimizer = default_optimizer(module.parameter_groups())
    stamps = []
    for i, b in enumerate(loader(config, warmup + steps, batch)):
        if i >= warmup:
            if device != 'cpu':
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        x, y = b['x'].to(device, non_blocking=True), b['y'].to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device != 'cpu':
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    return Timing(stamps, batch * config['max_len'])


def matmul_bound(config, batch, repeats=20):
    """Tokens/s if a training step did nothing but its matrix products: every linear layer of the model (the
    head included) timed alone at the step's shape (batch x seq rows), forward and backward (input and weight
    gradients, bias sum), best of `repeats`, summed. The rest of the step (attention, norms, activations,
    optimizer, framework) only adds to this, so it bounds what any implementation of this model can reach."""
    module = build(config, 0.0, False)
    rows = batch * config['max_len']
    seconds = 0.0
    for layer in (m for m in module.model.modules() if isinstance(m, torch.nn.Linear)):
        layer = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        x = torch.randn(rows, layer.in_features, requires_grad=True)
        grad = torch.randn(rows, layer.out_features)
        best = float('inf')
        for _ in range(repeats + 3):
            start = time.perf_counter()
            layer(x).backward(grad)
            best = min(best, time.perf_counter() - start)
        seconds += best
    return rows / seconds


def profile_step(config, batch, steps=20, warmup=5, rows=12):
    """Self CPU time per step of the ops a plain training step spends most in (torch.profiler), so what the
    matrix-product bound leaves out can be seen op by op."""
    from torch.profiler import profile
    from xlabml.models import default_optimizer
    module = build(config, 0.0, False)
    model = module.model.train()
    optimizer = default_optimizer(module.parameter_groups())

    def step(b):
        loss = F.cross_entropy(model(b['x']).flatten(0, 1), b['y'].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = list(loader(config, warmup + steps, batch))
    for b in batches[:warmup]:
        step(b)
    with profile() as prof:
        for b in batches[warmup:]:
            step(b)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in events[:rows]]


class Timing:
    """Step boundaries of one run -> throughput over the whole run (wall) and over its fast steps.

    On a shared machine a run's wall time mixes our work with waits for the CPU; the 10th-percentile step
    time is what a step costs when the process has the cores, and moves much less from run to run."""

    def __init__(self, stamps, tokens_per_step):
        self.steps = [b - a for a, b in zip(stamps, stamps[1:])]
        self.tokens_per_step = tokens_per_step
        self.wall = len(self.steps) * tokens_per_step / (stamps[-1] - stamps[0])
        fast = sorted(self.steps)[len(self.steps) // 10]
        self.fast = tokens_per_step / fast


def lightning_fit(config, steps, warmup, batch, dropout, compile_model, default, accelerator='cpu',
                  precision='32-true'):
    """Timing of ``Trainer.fit`` (batch start to batch start after the warmup steps, by a callback: every
    per-step cost of the loop, hooks and logging is inside)."""
    import lightning as L

    class Timer(L.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_start(self, trainer, module, b, batch_idx):
            if batch_idx >= warmup:
                if accelerator == 'gpu':
                    torch.cuda.synchronize()
                self.stamps.append(time.perf_counter())

        def on_train_end(self, trainer, module):
            if accelerator == 'gpu':
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    timer = Timer()
    module = build(config, dropout, compile_model)
    with tempfile.TemporaryDirectory() as root:
        settings = dict(accelerator=accelerator, devices=1, precision=precision, max_steps=warmup + steps,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, callbacks=[timer])
        if not default:
            settings.update(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer = L.Trainer(**settings)
        # the default progress bar and model summary still run, but stay out of this script's report
        with contextlib.ExitStack() as quiet:
            if default:
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            trainer.fit(module, loader(config, warmup + steps, batch))
    return Timing(timer.stamps, batch * config['max_len'])


def gpu_section(steps, warmup, compile_model):
    config, batch = GPT2_SMALL, 8
    module = build(config, 0.0, False)
    # matmul parameters: everything but the embedding tables (lookups), plus the head (counted even if tied)
    n_params = sum(p.numel() for n, p in module.model.named_parameters() if 'embedding' not in n)
    n_params += module.model.head.weight.numel() if module.hparams.tie_embeddings else 0
    # per token: 6 N for the matmuls forward + backward, plus 12 L T d for attention scores (PaLM appendix B)
    flops_per_token = 6 * n_params + 12 * config['n_layers'] * config['max_len'] * config['d_model']
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16)
    plain = plain_loop(config, steps, warmup, batch, 0.0, compile_model, device='cuda', autocast=autocast)
    fit = lightning_fit(config, steps, warmup, batch, 0.0, compile_model, default=False, accelerator='gpu',
                        precision='bf16-mixed')
    plain, fit = plain.wall, fit.wall
    result = {'device': name, 'config': config, 'batch': batch, 'precision': 'bf16-mixed',
              'plain_tokens_per_s': round(plain), 'lightning_tokens_per_s': round(fit),
              'flops_per_token': flops_per_token, 'peak_flops': peak}
    if peak:
        result['plain_mfu'] = round(plain * flops_per_token / peak, 4)
        result['lightning_mfu'] = round(fit * flops_per_token / peak, 4)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=100, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=10, help='untimed steps before timing (compilation)')
    parser.add_argument('--repeats', type=int, default=3, help='runs per setting; the best is reported')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--dropout', type=float, default=0.0)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (plain and Lightning)')
    parser.add_argument('--no-gpu', action='store_true', help='skip the GPU section even if CUDA is available')
    parser.add_argument('--profile', action='store_true', help='also print the ops a plain step spends most in')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')
    import logging
    import lightning  # noqa: F401  (sets its own log level on import; quiet it after)
    logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
    if args.compile:
        args.warmup = max(args.warmup, 20)

    common = dict(steps=args.steps, warmup=args.warmup, batch=BATCH, dropout=args.dropout,
                  compile_model=args.compile)
    runs = {'plain': [], 'lightning_minimal': [], 'lightning_default': []}
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits all settings alike
        runs['plain'].append(plain_loop(REFERENCE, **common))
        runs['lightning_minimal'].append(lightning_fit(REFERENCE, **common, default=False))
        runs['lightning_default'].append(lightning_fit(REFERENCE, **common, default=True))
    bound = matmul_bound(REFERENCE, BATCH)
    target = TARGET_FACTOR * NANOGPT_TOKENS_PER_S
    wall = {k: max(r.wall for r in v) for k, v in runs.items()}  # best run, whole-run wall time
    fast = {k: max(r.fast for r in v) for k, v in runs.items()}  # best run, 10th-percentile step

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} "
          f"(a shared machine: figures are the best of {args.repeats} interleaved runs)")
    print(f"config: {REFERENCE}, batch {BATCH}, fp32, dropout {args.dropout}, compile {args.compile}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"  {'tokens/s':18s} {'wall':>9s} {'fast-step':>10s}   wall per run")
    for k, v in runs.items():
        print(f"  {k:18s} {wall[k]:9,.0f} {fast[k]:10,.0f}   {', '.join(f'{r.wall:,.0f}' for r in v)}")
    for name, figures in (('wall', wall), ('fast-step', fast)):
        print(f"  {name:9s} Lightning / plain: minimal {figures['lightning_minimal'] / figures['plain']:.3f}, "
              f"default {figures['lightning_default'] / figures['plain']:.3f}; vs nanoGPT "
              f"{NANOGPT_TOKENS_PER_S:,} (quoted): minimal {figures['lightning_minimal'] / NANOGPT_TOKENS_PER_S:.2f}x, "
              f"default {figures['lightning_default'] / NANOGPT_TOKENS_PER_S:.2f}x (target {TARGET_FACTOR}x: "
              f"{'met' if min(figures['lightning_minimal'], figures['lightning_default']) >= target else 'MISSED'})")
    print(f"  matrix products alone (forward + backward of every linear, same run): {bound:,.0f} tokens/s; "
          f"Lightning reaches {max(wall['lightning_minimal'], wall['lightning_default']) / bound:.0%} of it (wall), "
          f"{max(fast['lightning_minimal'], fast['lightning_default']) / bound:.0%} (fast-step)")

    if args.profile:
        print("  self CPU ms per step of a plain step (torch.profiler; the profiler adds a few %): " + ", ".join(
            f"{name} {ms:.2f}" for name, ms in profile_step(REFERENCE, BATCH)))

    gpu = None
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = gpu_section(steps=30, warmup=10 if not args.compile else 20, compile_model=args.compile)
        print(f"GPU {gpu['device']}: GPT-2 small bf16, batch {gpu['batch']} x {GPT2_SMALL['max_len']}: plain "
              f"{gpu['plain_tokens_per_s']:,} tokens/s, Lightning {gpu['lightning_tokens_per_s']:,} tokens/s, MFU "
              f"{gpu.get('plain_mfu', 'n/a')} / {gpu.get('lightning_mfu', 'n/a')} (peak {gpu['peak_flops']})")
    else:
        print("GPU: CUDA not available, section skipped")

    print(json.dumps({
        'benchmark': 'train', 'threads': args.threads, 'compile': args.compile, 'config': REFERENCE,
        'batch': BATCH, 'steps': args.steps, 'repeats': args.repeats, 'load_average': os.getloadavg()[0],
        **{f'{k}_tokens_per_s': round(v) for k, v in wall.items()},
        **{f'{k}_fast_step_tokens_per_s': round(v) for k, v in fast.items()},
        'ratio_minimal': round(wall['lightning_minimal'] / wall['plain'], 3),
        'ratio_default': round(wall['lightning_default'] / wall['plain'], 3),
        'ratio_minimal_fast_step': round(fast['lightning_minimal'] / fast['plain'], 3),
        'ratio_default_fast_step': round(fast['lightning_default'] / fast['plain'], 3),
        'matmul_bound_tokens_per_s': round(bound),
        'reference_nanogpt_tokens_per_s': NANOGPT_TOKENS_PER_S, 'target_tokens_per_s': target,
        'target_met_wall': min(wall['lightning_minimal'], wall['lightning_default']) >= target,
        'target_met_fast_step': min(fast['lightning_minimal'], fast['lightning_default']) >= target,
        'runs_wall': {k: [round(r.wall) for r in v] for k, v in runs.items()}, 'gpu': gpu,
    }))


if __name__ == '__main__':
    main()

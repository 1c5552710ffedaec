#!/usr/bin/env python3
"""Peak memory of one training step of the release model (``conf/xlab.yaml``: 6 layers, d_model 512, 8 heads,
FFN 2048, vocabulary 32,768, sequence 512, bf16-mixed), chunked loss (``loss_chunk_size``) against the plain one,
with and without activation checkpointing, measured in the same run; and the step time of each.

What is measured:
  * "loss": the head and the cross-entropy alone, forward and backward, from the final hidden states (the part
    the chunked loss changes); target: chunked peak <= 25% of the plain one at equal loss (<= 1e-5 relative).
  * "step": a whole optimizer step (forward, loss, backward, AdamW), after a first step that allocated the
    optimizer state; its peak above the memory held between steps (weights and AdamW state) is the activations,
    gradients and logits. Target: the chunked step at most 5% slower than the plain one.

On CPU (default when there is no CUDA device) the batch is scaled down (``--batch``, default 8 rows of 512
tokens) with chunks of 512 rows (8 chunks a batch; below about 512 rows a chunk's share of the head's weight
gradient costs CPU time), and memory is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before the measured step) over its resident set before it, each variant in a fresh process
run with glibc's mmap threshold fixed at 64 KiB, so that a freed tensor leaves the resident set at once. Attention
dropout is off on CPU: there SDPA with dropout falls back to the math kernel, which keeps (b, h, t, t) float32
scores that a GPU's flash/memory-efficient kernels never store. Step times on CPU are judged by the process's CPU
time (a shared machine's wall time includes waiting for a core). On a GPU the batch is the release one (256),
the chunk the model's default, and memory is ``torch.cuda.max_memory_allocated``; a variant that runs out of
memory is reported as such.

Then the per-GPU memory of the release run is derived from these figures (see ``derive``): arithmetic, labelled
as such, not a GPU measurement.

    python bench/memory.py [--batch 8] [--chunk 512] [--repeats 3] [--threads 2] [--cpu]

The last line printed is one JSON object with all figures.
"""

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RELEASE = dict(n_vocab=32768, max_len=512, d_model=512, n_layers=6, n_heads=8, d_ff=2048, dropout=0.1)
RELEASE_BATCH = 256
VARIANTS = {'plain': False, 'chunked': False, 'plain+ckpt': True, 'chunked+ckpt': True}  # -> checkpointing


# ------------------------------------------------------------------------------------------- measuring

class Peak:
    """Peak memory above the level at ``start()``: CUDA's allocator statistics, or on CPU the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set at the start."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _status(field):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))

    def start(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset VmHWM to the current resident set
            self.base = self._status('VmRSS')

    def stop(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status('VmHWM') - self.base


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build(chunk, checkpointing, device):
    from xlabml.models import XLabModel
    torch.manual_seed(0)
    model = XLabModel(**RELEASE, loss_chunk_size=chunk, activation_checkpointing=checkpointing,
                      dropout_attn=device.type == 'cuda', pad_index=None)
    return model.to(device).train()


def batch_of(rows, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, RELEASE['n_vocab'], (rows, RELEASE['max_len'] + 1), generator=g)
    return {'x': data[:, :-1].to(device), 'y': data[:, 1:].to(device)}


def measure_loss(chunk, rows, device):
    """Peak memory and value of the head + loss, forward and backward, from hidden states (b t c)."""
    from xlabml.losses import linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    shape = (rows, RELEASE['max_len'], RELEASE['d_model'])
    hidden = torch.randn(shape, generator=g).to(device).requires_grad_()
    weight = (0.02 * torch.randn(RELEASE['n_vocab'], RELEASE['d_model'], generator=g)).to(device).requires_grad_()
    bias = torch.zeros(RELEASE['n_vocab'], device=device, requires_grad=True)
    targets = batch_of(rows, device)['y']
    peak = Peak(device)
    peak.start()
    with autocast(device):
        if chunk is None:
            loss = F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, 1), targets.flatten())
        else:
            nll, n, _ = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=chunk, accuracy=False)
            loss = nll / n
    loss.backward()
    return {'peak_bytes': peak.stop(), 'loss': loss.item()}


class Trainee:
    """The release model, its AdamW and a fixed batch: ``step()`` is one training step."""

    def __init__(self, chunk, checkpointing, rows, device):
        from xlabml.models import default_optimizer
        self.device = device
        self.model = build(chunk, checkpointing, device)
        self.optimizer = default_optimizer(self.model.parameter_groups())
        self.batch = batch_of(rows, device)

    def step(self):
        with autocast(self.device):
            loss, _, _ = self.model.batch_loss(self.batch, accuracy=False)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed_step(self):
        """(wall seconds, CPU seconds of this process) of one step."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.step()
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    def held_bytes(self):
        held = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return held + sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))


def measure_step(chunk, checkpointing, rows, device):
    """Peak memory above the weights and AdamW state of one training step (after a first one), and the loss of
    the first step."""
    trainee = Trainee(chunk, checkpointing, rows, device)
    first = trainee.step().item()
    peak = Peak(device)
    peak.start()
    trainee.step()
    return {'peak_bytes': peak.stop(), 'held_bytes': trainee.held_bytes(), 'loss': first}


def time_steps(chunks, rows, device, repeats):
    """Wall and CPU seconds of ``repeats`` steps of each model (no checkpointing), taken in turn so that load
    from elsewhere hits all alike, after one untimed step each."""
    trainees = {name: Trainee(chunk, False, rows, device) for name, chunk in chunks.items()}
    for trainee in trainees.values():
        trainee.step()
    times = {name: ([], []) for name in trainees}
    for _ in range(repeats):
        for name, trainee in trainees.items():
            wall, cpu = trainee.timed_step()
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return times


def saved_per_token(checkpointing, device, rows=2):
    """Bytes autograd keeps for backward per token of the trunk (embedding to final norm, the head and loss
    excluded) under bf16 autocast: every tensor saved in the forward pass whose first dimension is the batch
    (or batch x time), each storage counted once. An exact count of what backward needs, not an RSS figure;
    it leaves out autocast's bf16 copies of the weights (counted with the weights)."""
    model = build(None, checkpointing, device)
    x = batch_of(rows, device)['x']
    storages = {}

    def pack(t):
        if t.dim() and t.size(0) in (rows, rows * RELEASE['max_len']):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device):
        model(x, return_hidden=True)
    return sum(storages.values()) / (rows * RELEASE['max_len'])


def child(spec):
    """Runs one measurement in this (fresh) process and prints its result as JSON."""
    torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    if spec['what'] == 'loss':
        result = measure_loss(spec['chunk'], spec['rows'], device)
    else:
        result = measure_step(spec['chunk'], spec['ckpt'], spec['rows'], device)
    print(json.dumps(result))


def run_child(spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    out = subprocess.run([sys.executable, __file__, '--child', json.dumps(spec)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(spec, device):
    """On CPU each measurement in a fresh process (clean allocator state); on GPU in this one."""
    if device.type == 'cpu':
        return run_child(spec)
    torch.cuda.empty_cache()
    try:
        if spec['what'] == 'loss':
            return measure_loss(spec['chunk'], spec['rows'], device)
        return measure_step(spec['chunk'], spec['ckpt'], spec['rows'], device)
    except torch.cuda.OutOfMemoryError:
        return {'oom': True}


# ------------------------------------------------------------------------------------------------ main

def derive(loss, saved, rows, chunk):
    """Per-GPU memory of the release run (conf/xlab.yaml) from the measured figures: the state is arithmetic on
    the parameter count; activations are the measured bytes saved per token times the batch's tokens; the plain
    loss grows with the rows (measured bytes per row); the chunked loss is its measured peak with its chunk
    resized to the model's default (two float32 chunks of logits: 8 bytes x vocabulary per row) and its per-row
    part (gradient and float32 copy of the hidden states: 8 bytes x width) resized to the batch."""
    import yaml
    from xlabml.models import XLabModel
    config = yaml.safe_load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'conf',
                                              'xlab.yaml')))
    micro = config['data']['batch_size']
    default_chunk = config['model'].get('loss_chunk_size') or \
        inspect.signature(XLabModel).parameters['loss_chunk_size'].default
    with torch.device('meta'):
        model = XLabModel(**RELEASE)
    n = model.model.num_parameters()
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    v, d, t = RELEASE['n_vocab'], RELEASE['d_model'], RELEASE['max_len']
    state = {'weights fp32': 4 * n, 'bf16 weight copies (autocast)': 2 * matrices, 'gradients fp32': 4 * n,
             'AdamW state': 8 * n}
    figures = {'parameters': n, 'micro_batch': micro, 'loss_chunk_size': default_chunk, **state}
    lines = [f"{n / 1e6:.1f}M parameters: " + ', '.join(f"{k} {gib(b).strip()}" for k, b in state.items())
             + f" = {gib(sum(state.values())).strip()}"]
    plain_per_row = loss['plain']['peak_bytes'] / (rows * t) if not loss['plain'].get('oom') else None
    for batch in sorted({micro, RELEASE_BATCH}):
        tokens = batch * t
        act = {'no checkpointing': saved[False] * tokens,
               # checkpointed: the blocks' inputs, plus one block's activations while it is recomputed
               'activation checkpointing': saved[True] * tokens + saved[False] * tokens / RELEASE['n_layers']}
        logits = {'chunked loss': loss['chunked']['peak_bytes'] + 8 * v * (default_chunk - chunk)
                  + 8 * d * (tokens - rows * t)}
        if plain_per_row:
            logits['plain loss'] = plain_per_row * tokens
        for a_name, a in act.items():
            for l_name, lo in logits.items():
                total = sum(state.values()) + a + lo
                figures[f'batch {batch}, {a_name}, {l_name}'] = {'activations': a, 'loss': lo, 'total': total}
                lines.append(f"batch {batch:3d} x {t}: activations ({a_name}) {gib(a)}, {l_name} {gib(lo)}, "
                             f"with the state {gib(total)}")
    return {'figures': figures, 'lines': lines}


def gib(n):
    return f"{n / 2**30:7.2f} GiB" if n is not None else '      OOM'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=None,
                        help=f'rows of 512 tokens (default: 8 on CPU, {RELEASE_BATCH} on GPU)')
    parser.add_argument('--chunk', type=int, default=None,
                        help="loss_chunk_size of the chunked loss (rows; default: XLabModel's default, scaled down "
                        "with the batch on CPU so that a batch has as many chunks as the release batch)")
    parser.add_argument('--repeats', type=int, default=3, help='timed steps per variant, interleaved')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--cpu', action='store_true', help='measure on the CPU even with a CUDA device')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    device = torch.device('cuda' if torch.cuda.is_available() and not args.cpu else 'cpu')
    rows = args.batch or (RELEASE_BATCH if device.type == 'cuda' else 8)
    if args.chunk is None:  # the model's default; on a CPU's small batch, 512 rows (8 chunks of a batch of 8)
        from xlabml.models import XLabModel
        args.chunk = inspect.signature(XLabModel).parameters['loss_chunk_size'].default if device.type == 'cuda' \
            else 512
    torch.set_num_threads(args.threads)
    variants = {name: (args.chunk if name.startswith('chunked') else None, ckpt) for name, ckpt in VARIANTS.items()}
    base = dict(rows=rows, device=device.type, threads=args.threads)

    loss = {name: run(dict(base, what='loss', chunk=variants[name][0]), device) for name in ('plain', 'chunked')}
    steps = {name: run(dict(base, what='step', chunk=chunk, ckpt=ckpt), device)
             for name, (chunk, ckpt) in variants.items()}
    # step times: on a shared CPU the process's CPU time is the steadier figure (wall time includes waiting)
    chunks = {name: variants[name][0] for name in ('plain', 'chunked')}
    try:
        measured = time_steps(chunks, rows, device, args.repeats)
    except torch.cuda.OutOfMemoryError:  # the plain loss at the release batch on a smaller GPU
        torch.cuda.empty_cache()
        measured = {'chunked': time_steps({'chunked': chunks['chunked']}, rows, device, args.repeats)['chunked'],
                    'plain': ([], [])}
    times = {name: measured[name][0] for name in chunks}
    cpu_times = {name: measured[name][1] for name in chunks}
    median = {k: statistics.median(v) if v else None for k, v in times.items()}
    saved = {ckpt: saved_per_token(ckpt, device) for ckpt in (False, True)}
    cpu_median = {k: statistics.median(v) if v else None for k, v in cpu_times.items()}

    tokens = rows * RELEASE['max_len']
    peak = lambda r: None if r.get('oom') else r['peak_bytes']
    loss_ratio = (peak(loss['chunked']) / peak(loss['plain'])
                  if peak(loss['plain']) and peak(loss['chunked']) is not None else None)
    loss_rel = (abs(loss['chunked']['loss'] - loss['plain']['loss']) / loss['plain']['loss']
                if not (loss['plain'].get('oom') or loss['chunked'].get('oom')) else None)
    step_rel = (abs(steps['chunked']['loss'] - steps['plain']['loss']) / steps['plain']['loss']
                if not (steps['plain'].get('oom') or steps['chunked'].get('oom')) else None)
    slowdown = median['chunked'] / median['plain'] - 1 if median['plain'] and median['chunked'] else None
    cpu_slowdown = (cpu_median['chunked'] / cpu_median['plain'] - 1 if device.type == 'cpu' and cpu_median['plain']
                    else None)
    # on a CPU the target is judged on CPU time (see above), on a GPU on wall time
    judged = cpu_slowdown if device.type == 'cpu' else slowdown
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f'{platform.machine()} CPU'
    method = ('torch.cuda.max_memory_allocated above the allocated memory at the start' if device.type == 'cuda'
              else 'peak RSS growth (VmHWM after clear_refs, fresh process, glibc mmap threshold 64 KiB)')
    print(f"machine: {name}, torch {torch.__version__}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"release model {RELEASE}, bf16 autocast, batch {rows} x {RELEASE['max_len']} = {tokens:,} tokens, "
          f"loss_chunk_size {args.chunk}; memory: {method}")
    print(f"  head + loss, forward and backward:   plain {gib(peak(loss['plain']))}   chunked "
          f"{gib(peak(loss['chunked']))}   chunked / plain {loss_ratio if loss_ratio is None else round(loss_ratio, 4)}"
          f" (target <= 0.25), loss relative difference {loss_rel if loss_rel is None else f'{loss_rel:.1e}'} "
          f"(target <= 1e-5)")
    held = next((r['held_bytes'] for r in steps.values() if 'held_bytes' in r), None)
    print(f"  one training step, above the weights and AdamW state held between steps ({gib(held)}):")
    for k, r in steps.items():
        per_token = None if r.get('oom') else r['peak_bytes'] / tokens
        print(f"    {k:13s} {gib(peak(r))}   {per_token and f'{per_token / 1024:8.1f} KiB per token'}")
    seconds = lambda d: ', '.join(f"{k} {v:.3f} s" for k, v in d.items() if v is not None)
    print(f"  step time, median of {args.repeats} (same run): wall {seconds(median)}"
          + (f"; CPU time {seconds(cpu_median)}" if device.type == 'cpu' else ''))
    judged_text = 'n/a' if judged is None else f'{judged:+.1%}'
    step_rel_text = 'n/a' if step_rel is None else f'{step_rel:.1e}'
    print(f"  chunked vs plain step: {judged_text} ({'CPU' if device.type == 'cpu' else 'wall'} time; target <= "
          f"+5%); first-step loss relative difference {step_rel_text}")
    derived = derive(loss, saved, rows, args.chunk)
    print("derived for conf/xlab.yaml, per GPU (arithmetic on the figures above, not measured on a GPU; each total "
          "is the sum of parts that peak at different moments, an upper bound):")
    for line in derived['lines']:
        print('  ' + line)

    print(json.dumps({
        'benchmark': 'memory', 'device': name, 'memory_method': method, 'config': RELEASE, 'batch': rows,
        'tokens': tokens, 'loss_chunk_size': args.chunk, 'threads': args.threads,
        'loss_peak_bytes': {k: peak(v) for k, v in loss.items()}, 'loss_peak_ratio': loss_ratio,
        'loss_rel_diff': loss_rel, 'step_peak_bytes': {k: peak(v) for k, v in steps.items()},
        'held_bytes': held, 'step_loss_rel_diff': step_rel, 'step_s_median': median,
        'step_cpu_s_median': cpu_median, 'step_slowdown_wall': slowdown, 'step_slowdown_cpu': cpu_slowdown,
        'step_s': times, 'load_average': os.getloadavg()[0],
        'saved_bytes_per_token': {'plain': saved[False], 'checkpointed': saved[True]},
        'derived_release_per_gpu_bytes': derived['figures'],
        'targets_met': {'memory': loss_ratio is not None and loss_ratio <= 0.25,
                        'loss': loss_rel is not None and loss_rel <= 1e-5,
                        'speed': judged is not None and judged <= 0.05},
    }))


if __name__ == '__main__':
    main()

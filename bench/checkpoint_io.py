#!/usr/bin/env python
"""Cost of atomic checkpoint saving: ``XLabCheckpointIO`` against Lightning's default ``TorchCheckpointIO``.

The checkpoint is that of the release model (conf/xlab.yaml: 32768 tokens, 512 wide, 6 layers, d_ff 2048, untied
head) with AdamW's two moments, as Lightning writes it: weights + optimizer state, about 0.6 GB in fp32. Each
save runs in a fresh process (so peak memory is that save's own) and writes into a temporary folder on the same
file system as the system's temporary directory (Lightning's default stages the file there: on another file
system its final move becomes a copy). Figures, medians of ``--repeats`` saves per variant, variants alternated:
wall time of ``save_checkpoint``, and the process's peak resident memory above its resident memory before the
save (Lightning's default first serializes the whole checkpoint into memory; ours streams it into the file). It
also times ``load_checkpoint`` and a pass over every loaded number (ours reads through ``read_checkpoint``,
memory-mapped, so the pass is where it reads the file). Saves include fsync for ours (durable before the rename),
none for Lightning's. Ends with one JSON line.

    python bench/checkpoint_io.py [--repeats 3] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from xlabml.checkpoints import XLabCheckpointIO
from xlabml.models import XLabModel

variant, path = sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = XLabModel(32768, 512, d_model=512, n_layers=6, n_heads=8, d_ff=2048, dropout=0.0)
state = model.state_dict()
moments = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
           for i, p in enumerate(model.parameters())}
checkpoint = {"state_dict": state, "hyper_parameters": dict(model.hparams), "global_step": 10, "epoch": 0,
              "optimizer_states": [{"state": moments, "param_groups": [{"params": list(moments), "lr": 1e-3}]}],
              "pytorch-lightning_version": "2.6.6"}
io = XLabCheckpointIO() if variant == "xlab" else TorchCheckpointIO()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the peak so far (model, moments)
start = time.perf_counter()
io.save_checkpoint(checkpoint, path)
saved = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del checkpoint, moments, state, model
start = time.perf_counter()
loaded = io.load_checkpoint(path)
tensors = [*loaded["state_dict"].values(),
           *(t for s in loaded["optimizer_states"][0]["state"].values() for t in s.values())]
n = sum(t.numel() for t in tensors)
sum(float(t.sum()) for t in tensors)  # read every number: a memory-mapped load reads lazily
read = time.perf_counter() - start
print(json.dumps({"save_s": saved, "load_s": read, "extra_peak_mb": max(0, peak - before) / 1024,
                  "file_mb": os.path.getsize(path) / 1e6, "numbers": n}))
"""


def run(variant: str, folder: str) -> dict:
    path = os.path.join(folder, f"{variant}.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, ROOT, variant, path], capture_output=True, text=True,
                         env=env, check=True).stdout
    os.remove(path)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder to save in (default: a temporary one)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"torch": [], "xlab": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for _ in range(args.repeats):
            for variant in results:
                results[variant].append(run(variant, folder))
    median = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"checkpoint {median['xlab']['file_mb']:.0f} MB; medians of {args.repeats} saves each")
    for variant, name in (("torch", "Lightning TorchCheckpointIO (reference)"), ("xlab", "XLabCheckpointIO")):
        m = median[variant]
        print(f"  {name:40s} save {m['save_s']:6.2f} s  load {m['load_s']:6.2f} s  "
              f"extra peak memory {m['extra_peak_mb']:6.0f} MB")
    ratio = median["xlab"]["save_s"] / median["torch"]["save_s"]
    print(f"  save time ratio xlab/torch {ratio:.2f}")
    print(json.dumps({"file_mb": round(median["xlab"]["file_mb"], 1),
                      "save_s": round(median["xlab"]["save_s"], 3), "load_s": round(median["xlab"]["load_s"], 3),
                      "extra_peak_mb": round(median["xlab"]["extra_peak_mb"], 1),
                      "reference": {k: round(v, 3) for k, v in median["torch"].items() if k != "numbers"},
                      "save_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()

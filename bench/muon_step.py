#!/usr/bin/env python3
"""Cost of Muon's step on the shipped Shakespeare model (conf/extra/shakespeare.yaml: 4 layers, d_model 128, BPE
1K, head-QK 64, batches of 12 x 64 tokens), next to what it is compared with, all measured in the same run:

- the forward and backward pass of one batch (what a step costs without the optimizer);
- ``xlabml.optim.MuonAdamW``'s step (its matrices orthogonalised in one batched Newton-Schulz iteration per shape);
- ``torch.optim.Muon`` on the same matrices, one matrix at a time (the reference implementation's loop, which is
  what MuonAdamW did before it batched), plus a fused AdamW on the rest;
- a fused AdamW on every parameter (the optimizer the AdamW configs use).

Each figure is the median over ``--repeats`` rounds of ``--steps`` calls, the rounds interleaved. The last line is
one JSON object.

    python bench/muon_step.py [--threads 2] [--steps 30] [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xlabml.models import XLabModel  # noqa: E402
from xlabml.optim import MuonAdamW  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=30, help="calls per timed round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the median is reported)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = XLabModel(n_vocab=1024, max_len=64, d_model=128, n_layers=4, n_heads=4, d_ff=512, dropout=0.0,
                      position="rope", norm="rmsnorm", ffn="swiglu", head_qk=64, pad_index=None)
    x = torch.randint(0, 1024, (12, 65), generator=torch.Generator().manual_seed(0))
    batch = {"x": x[:, :-1], "y": x[:, 1:]}
    model.batch_loss(batch, accuracy=False)[0].backward()  # every parameter has a gradient from here on

    groups = model.parameter_groups()
    ours = MuonAdamW(groups, lr=0.02, weight_decay=0.2, adam_lr=3e-3, adam_betas=(0.9, 0.99), adam_weight_decay=0.4)
    matrices = [p for g in ours.param_groups if g["muon"] for p in g["params"]]
    rest = [p for g in ours.param_groups if not g["muon"] for p in g["params"]]
    reference = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.2, adjust_lr_fn="original")
    reference_rest = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.4, fused=True)
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.4, fused=True)

    def forward_backward():
        model.zero_grad(set_to_none=False)
        model.batch_loss(batch, accuracy=False)[0].backward()

    def reference_step():
        reference.step()
        reference_rest.step()

    timed = {"forward + backward": forward_backward, "MuonAdamW step (batched by shape)": ours.step,
             "torch.optim.Muon + AdamW step (one matrix at a time)": reference_step,
             "AdamW step (every parameter)": adamw.step}
    for fn in timed.values():  # warm up (optimizer states, allocator)
        for _ in range(3):
            fn()
    rounds = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            rounds[name].append((time.perf_counter() - start) / args.steps * 1e3)
    ms = {name: statistics.median(values) for name, values in rounds.items()}
    fb = ms["forward + backward"]
    print(f"threads {torch.get_num_threads()}; {len(matrices)} Muon matrices, "
          f"{sum(p.numel() for p in matrices):,} parameters; median of {args.repeats} rounds of {args.steps} calls")
    for name, value in ms.items():
        print(f"{name:55s} {value:7.2f} ms   {value / fb:5.2f}x forward + backward")
    batched, one_by_one = ms["MuonAdamW step (batched by shape)"], ms["torch.optim.Muon + AdamW step (one matrix at a time)"]
    print(f"batched / one matrix at a time: {batched / one_by_one:.2f}x; a training step (forward + backward + "
          f"optimizer) with MuonAdamW costs {(fb + batched) / (fb + ms['AdamW step (every parameter)']):.2f}x one "
          f"with AdamW")
    print(json.dumps({"threads": torch.get_num_threads(), "ms": ms}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Which CPU kernel streams int8 (and int4) weights fastest: matrix-vector passes/s over the release model's matrices.

One pass = one product (1 x in) @ W^T with each of the 25 weight matrices of the release model (d_model 512,
6 layers, FFN 2048, vocabulary 32768: per layer qkv, attention output, FFN in and out; then the head), the work of
one batch-1 decoded token. Candidates, all in the same run, rounds interleaved, each figure the best of its rounds:

- float references: float32 and bfloat16 weights packed for oneDNN (``xlabml.packed``: today's fastest);
- int8 weight-only, one scale per output channel: ``aten._weight_int8pack_mm`` with float32 and with bfloat16
  activations; the same through ``xlabml.quantize.Int8Linear`` (the layer's Python included), eager and compiled;
  inductor compiling ``F.linear(x, q.to(x.dtype)) * s`` with frozen weights (dequantization fused, or
  pattern-matched to a kernel); torchao's int8 weight-only tensors, eager and compiled (when torchao is
  installed);
- for reference, not weight-only: fbgemm's dynamic int8 linear (``quantized::linear_dynamic``: activations
  quantized to int8 per call, integer products);
- int4 weight-only in groups: ``aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations), group sizes 32 and 128.

Each candidate's output is checked against the float product (relative max error printed). The last line is JSON.

    python bench/quantize_kernels.py [--threads 2] [--rounds 5] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xlabml import packed  # noqa: E402
from xlabml.quantize import Int4Linear, Int8Linear, quantize_int8  # noqa: E402

D_MODEL, N_LAYERS, D_FF, N_VOCAB = 512, 6, 2048, 32768


def release_matrices(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(N_LAYERS) for s in ((3 * D_MODEL, D_MODEL), (D_MODEL, D_MODEL), (D_FF, D_MODEL),
                                                    (D_MODEL, D_FF))] + [(N_VOCAB, D_MODEL)]
    return [torch.randn(s, generator=generator) * 0.02 for s in shapes]


class Dequantizing(nn.Module):
    """``F.linear(x, q.to(x.dtype)) * s``: what inductor may fuse or pattern-match to an int8 kernel."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        q, s = quantize_int8(w)
        self.q = nn.Parameter(q, requires_grad=False)
        self.s = nn.Parameter(s.to(torch.bfloat16), requires_grad=False)
        self.in_features = w.shape[1]

    def forward(self, x):
        return F.linear(x, self.q.to(x.dtype)) * self.s


class Pass(nn.Module):
    """One pass: every layer applied to the vector of its input width."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, small, large):  # (1, d_model), (1, d_ff)
        return [layer(small if layer.in_features == D_MODEL else large) for layer in self.layers]


def linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    return layer


def compiled(module: nn.Module, **inductor):
    """torch.compile with frozen weights (as xlabml.inference compiles its decode step), plus inductor options."""
    fn = torch.compile(module, dynamic=False)

    def run(*args):
        with torch._inductor.config.patch(freezing=True, **inductor):
            return fn(*args)
    return run


def candidates(weights, args) -> dict:
    """name -> (callable taking (small, large) vectors, activation dtype)."""
    f32, bf16 = torch.float32, torch.bfloat16
    out = {}
    if packed.supported():
        for name, dtype in (("float32 packed (oneDNN)", f32), ("bfloat16 packed (oneDNN)", bf16)):
            reordered = [(torch.ops.mkldnn._reorder_linear_weight(w.to(dtype)), w.shape[1]) for w in weights]
            out[name] = (lambda s, l, r=reordered: [torch.ops.mkldnn._linear_pointwise(
                s if n == D_MODEL else l, p, None, "none", [], "") for p, n in r], dtype)
    quantized = [(*quantize_int8(w), w.shape[1]) for w in weights]
    for name, dtype in (("int8 _weight_int8pack_mm, float32 activations", f32),
                        ("int8 _weight_int8pack_mm, bfloat16 activations", bf16)):
        operands = [(q, s.to(dtype), n) for q, s, n in quantized]
        out[name] = (lambda s, l, o=operands: [torch.ops.aten._weight_int8pack_mm(
            s if n == D_MODEL else l, q, sc) for q, sc, n in o], dtype)
    layers = Pass([Int8Linear.from_linear(linear(w)) for w in weights])
    out["int8 xlabml Int8Linear, float32 model, eager"] = (layers, f32)
    if args.compile:
        out["int8 xlabml Int8Linear, float32 model, compiled"] = (compiled(layers), f32)
        out["int8 inductor: F.linear(x, q.to(bf16)) * s, frozen"] = (compiled(Pass(
            [Dequantizing(w) for w in weights])), bf16)
        out["int8 inductor, max-autotune CPP GEMM, frozen"] = (compiled(Pass(
            [Dequantizing(w) for w in weights]), max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"), bf16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        ao = Pass([linear(w).to(bf16) for w in weights])
        quantize_(ao, Int8WeightOnlyConfig())
        out["int8 torchao Int8WeightOnlyConfig, eager"] = (ao, bf16)
        if args.compile:
            out["int8 torchao Int8WeightOnlyConfig, compiled"] = (compiled(ao), bf16)
    except ImportError:
        print("torchao not installed: its candidates skipped")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        prepacked = [(torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
            w, quantize_int8(w)[1], torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8), None), w.shape[1])
            for w in weights]
        out["reference, not weight-only: fbgemm dynamic int8 (int8 activations)"] = (
            lambda s, l, p=prepacked: [torch.ops.quantized.linear_dynamic(s if n == D_MODEL else l, w)
                                       for w, n in p], f32)
    for group in (32, 128):
        int4 = Pass([Int4Linear.from_linear(linear(w), group) for w in weights])
        out[f"int4 _weight_int4pack_mm_for_cpu, groups of {group}"] = (int4, bf16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=10, help="timed passes per round")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{N_LAYERS * 4 + 1} matrices of the release model per pass")
    weights = release_matrices()
    vectors = torch.randn(1, D_MODEL), torch.randn(1, D_FF)
    reference = [F.linear(vectors[w.shape[1] != D_MODEL].double(), w.double()) for w in weights]
    best, error, loads = {}, {}, []
    with torch.inference_mode():
        runs = candidates(weights, args)
        for name, (fn, dtype) in runs.items():  # warm-up (compiles), and the check
            small, large = (v.to(dtype) for v in vectors)
            start = time.perf_counter()
            out = fn(small, large)
            if time.perf_counter() - start > 1:
                print(f"  {name}: first call {time.perf_counter() - start:.1f} s (compile)")
            error[name] = max(float((y.double() - r).abs().max() / r.abs().max()) for y, r in zip(out, reference))
            best[name] = float("inf")
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name, (fn, dtype) in runs.items():
                small, large = (v.to(dtype) for v in vectors)
                for _ in range(args.passes):
                    start = time.perf_counter()
                    fn(small, large)
                    best[name] = min(best[name], time.perf_counter() - start)
    print(f"\n{'candidate':<70}{'ms/pass':>9}{'passes/s':>10}{'vs f32 packed':>15}{'rel. error':>12}")
    base = best.get("float32 packed (oneDNN)")
    for name, seconds in best.items():
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"{name:<70}{seconds * 1e3:>9.2f}{1 / seconds:>10.1f}{ratio:>15}{error[name]:>12.1e}")
    print(f"load average per round: {', '.join(f'{x:.2f}' for x in loads)}")
    print(json.dumps({"passes_per_s": {k: round(1 / v, 1) for k, v in best.items()},
                      "relative_error": {k: float(f"{v:.2e}") for k, v in error.items()},
                      "threads": args.threads, "load_average": [round(x, 2) for x in loads],
                      "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()

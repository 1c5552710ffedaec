"""bench/memory_variants.py's own arithmetic: the streamed held-out score counts every target exactly once (rows and
tail) and equals the full-context loss where the window holds each row; the KV bytes per token follow the caches'
layouts (fp32, int8 with a scale per token and head, one KV per pair of layers)."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory_variants", REPO / "bench" / "memory_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(**kwargs):
    from xlabml.layers import Decoder
    torch.manual_seed(0)
    return Decoder(**{"n_vocab": 50, "max_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
                      "dropout": 0.0, "position": "rope", **kwargs}).eval()


@pytest.mark.parametrize("n_ids", [54, 49, 20, 2])
def test_streamed_nll_counts_every_target_once_and_equals_the_full_context_loss(bench, monkeypatch, n_ids):
    monkeypatch.setattr(bench, "STREAM_ROW_LEN", 16)
    model = tiny()
    ids = torch.randint(0, 50, (n_ids,), generator=torch.Generator().manual_seed(n_ids)).tolist()
    total, count = bench.streamed_nll(model, ids, block_size=32)  # every row and the tail fit the window
    assert count == n_ids - 1
    # the same cut by hand: rows of n // (n // 16) targets, then the tail from its own start
    n = n_ids - 1
    rows = max(1, n // 16)
    length = n // rows
    pieces = [ids[r * length:(r + 1) * length + 1] for r in range(rows)]
    if rows * length < n:
        pieces.append(ids[rows * length:])
    assert sum(len(p) - 1 for p in pieces) == n
    with torch.no_grad():
        expected = sum(F.cross_entropy(model(torch.tensor(p[:-1])[None])[0], torch.tensor(p[1:]),
                                       reduction="sum").item() for p in pieces)
    assert total == pytest.approx(expected, rel=1e-5)


def test_kv_bytes_follow_the_cache_layouts(bench):
    table = bench.kv_bytes(vocab=65)
    preset = bench.sk.PRESETS["nanogpt-cpu"]
    layers, heads, d = preset["n_layers"], preset["n_heads"], preset["d_model"]
    head_dim = d // heads
    fp32 = layers * 2 * heads * head_dim * 4  # keys and values of every layer, fp32
    int8 = layers * 2 * heads * (head_dim + 4)  # int8 values and one fp32 scale per token and head
    labels = {label: arch for label, arch, _, _ in bench.TRAINED}
    by_arch = {arch: table[label] for label, arch in labels.items()}
    per_slot = by_arch["rope"] - fp32  # what the cache keeps per slot besides keys and values (e.g. doc ids)
    assert 0 <= per_slot <= 8
    assert by_arch["classic"] == by_arch["rope"] == by_arch["registers"] == fp32 + per_slot
    assert by_arch["kv-share"] == fp32 / 2 + per_slot  # one KV per pair of layers
    assert table["+ int8 KV cache"] == int8 + per_slot
    # bounded caches: a fixed number of slots whatever the context, so far less than a full cache per token
    for label in ("+ attention sinks 4 + window 60 (StreamingLLM)", "+ window 64 without sinks",
                  "+ H2O: budget 64 (32 recent + 32 heavy hitters)"):
        assert table[label] < (fp32 + per_slot) * 80 / 2048, label
    # linear attention: a fixed state per layer and head (a head_dim x head_dim sum of key-value products and a
    # head_dim normaliser), fp32, over the 2,048 tokens
    assert by_arch["linear"] == layers * heads * (head_dim * head_dim + head_dim) * 4 / 2048


def test_extension_rows_keep_their_own_steps_when_the_budget_is_cut(bench):
    # `--steps 400 --extend-steps 60`: 400 steps for the trained rows, 60 for the continuations (the published
    # 400-step table's extension row had silently trained 400)
    import argparse
    args = argparse.Namespace(threads=1, steps=400, extend_steps=60, eval_tokens=None)
    bench._register(args, {"digest": "0" * 12}, [])
    steps = {arch: bench._settings(args, 1, arch, overrides)["steps"] for _, arch, _, overrides in bench.TRAINED}
    assert {arch for arch, n in steps.items() if n == 60} == bench.EXTENDED
    assert all(n == 400 for arch, n in steps.items() if arch not in bench.EXTENDED)

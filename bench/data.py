#!/usr/bin/env python
"""Speed of the data pipeline: encoding + windowing against raw SentencePiece, the cache, and the train loader.

Steps (one run, same machine, same text):
1. corpus: ``--corpus PATH`` (a .txt file, documents split by ``--sample-by``, or .jsonl/.parquet/.csv with a
   ``text`` column), default the built-in corpus repeated to ``--size-mb`` (50) MB, written as JSONL to a
   temporary directory; loaded once with ``datasets`` (Arrow; not timed as preparation);
2. a ``--num-tokens`` BPE tokenizer trained beforehand on the first ~4 MB of the corpus (not timed);
3. reference: raw ``sentencepiece`` batch encode of all documents in this process, with 1 thread and with
   all CPUs' threads (the faster is the reference wall time); CPU seconds are printed too, because on a shared
   machine wall times swing with other processes' load while CPU time does not;
4. ``TokenDataset`` (``datasets.map``, cache miss) + ``SequenceDataset`` index at ``num_proc`` 1 and 2; then a
   second preparation at ``num_proc`` 2 (cache hit);
5. train loader (``XLabDataModule.train_dataloader``, packed and padded, seq_len 64, batch 12, 0 workers):
   batches/s from the encoding cache, and from the same corpus opened with ``streaming: true`` (read, hash-split,
   tokenized and shuffled on the fly), against the steps/s of the reference model (``XLabModel`` 4 layers, d_model 128, 4 heads, d_ff
   512, seq_len 64, batch 12, fp32, forward + backward + AdamW step; the faster of 1 and all torch threads).

Targets: preparation at num_proc=2 <= 1.5x the raw SentencePiece single-process encode time; the cache hit
< 5% of the first preparation; the loaders (cached and streamed) faster than the model. Ends with one JSON line.

    python bench/data.py [--corpus PATH] [--size-mb 50] [--num-tokens 4096] [--sample-by paragraph]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402

from xlabml.corpus import iter_builtin_texts  # noqa: E402
from xlabml.datamodules import XLabDataModule  # noqa: E402
from xlabml.datasets import SequenceDataset, TokenDataset, load_source  # noqa: E402
from xlabml.tokenizer import TokenizerTrainer  # noqa: E402

SEQ_LEN, BATCH = 64, 12


def write_default_corpus(directory: str, size_mb: float) -> str:
    docs = list(iter_builtin_texts("python-docs"))
    one_pass = sum(len(d.encode("utf-8")) for d in docs)
    repeats = max(1, round(size_mb * 1e6 / one_pass))
    path = os.path.join(directory, f"python-docs-x{repeats}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeats):
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return path


def corpus_source(path: str, sample_by: str) -> dict | str:
    if path.endswith((".txt", ".text", ".md")):
        return {"path": "text", "data_files": path, "sample_by": sample_by}
    return path


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (datasets' num_proc workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn):
    """(wall seconds, CPU seconds, result): CPU time is stable on a busy machine, wall time is not."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def prepare(texts, tokenizer, num_proc: int, cache_dir: str):
    tokens = TokenDataset(texts, tokenizer, num_proc=num_proc, cache_dir=cache_dir)
    windows = SequenceDataset(tokens, SEQ_LEN, packed=True)
    return tokens, windows


def model_steps_per_s(n_vocab: int, steps: int = 30) -> tuple[float, str]:
    torch.manual_seed(0)
    try:
        from xlabml.models import XLabModel
        model = XLabModel(n_vocab, SEQ_LEN, d_model=128, n_layers=4, n_heads=4, d_ff=512, dropout=0.0)
        name = "xlabml.models.XLabModel(4 layers, d_model 128, 4 heads, d_ff 512)"
    except ImportError:  # the model module is not there: a torch stand-in of the same size
        layer = torch.nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
        body = torch.nn.TransformerEncoder(layer, 4)
        emb, head = torch.nn.Embedding(n_vocab, 128), torch.nn.Linear(128, n_vocab)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(SEQ_LEN)
        model = torch.nn.ModuleList([emb, body, head])
        model.forward = lambda x: head(body(emb(x), mask=mask, is_causal=True))
        name = "torch.nn.TransformerEncoder stand-in (xlabml.models not available)"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(4, n_vocab, (BATCH, SEQ_LEN))
    y = torch.randint(4, n_vocab, (BATCH, SEQ_LEN))

    def step():
        logits = model(x).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_vocab), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    seconds, _ = timed(lambda: [step() for _ in range(steps)])
    return steps / seconds, name


def stream_source(source: dict | str) -> dict:
    """The same corpus opened with ``streaming: true``."""
    source = {"data_files": source} if isinstance(source, str) else dict(source)
    return {**source, "streaming": True}


def loader_batches_per_s(datamodule: XLabDataModule, max_batches: int = 3000) -> float:
    loader = datamodule.train_dataloader()
    if hasattr(loader.sampler, "set_epoch"):  # a stream's loader has no sampler to set
        loader.sampler.set_epoch(0)
    iterator = iter(loader)
    next(iterator)  # start-up is not throughput
    count, start = 0, time.perf_counter()
    for _ in iterator:
        count += 1
        if count == max_batches:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="text/jsonl/parquet/csv file (default: built-in corpus repeated)")
    parser.add_argument("--size-mb", type=float, default=50.0)
    parser.add_argument("--num-tokens", type=int, default=4096)
    parser.add_argument("--sample-by", default="paragraph", choices=["line", "paragraph", "document"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="xlab-bench-data-")
    datasets.config.HF_DATASETS_CACHE = os.path.join(work, "hf")  # the corpus' Arrow copy goes with `work`
    try:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        print(f"machine: {platform.processor() or platform.machine()}, {cpus} CPUs available, load average "
              f"{load[0]:.1f} at start (shared machine: other processes may run), torch {torch.__version__}, "
              f"datasets {datasets.__version__}")
        path = args.corpus or write_default_corpus(work, args.size_mb)
        source = corpus_source(path, args.sample_by)
        seconds, texts = timed(lambda: load_source(source))
        texts = texts.flatten_indices() if texts._indices is not None else texts
        raw = list(texts["text"])  # the reference encodes Python strings; the pipeline reads Arrow
        mb = sum(len(t.encode("utf-8")) for t in raw) / 1e6
        print(f"corpus: {path} ({mb:.1f} MB, {len(texts)} documents; Arrow load {seconds:.1f} s, not counted)")

        sample, size = [], 0
        for text in raw:
            sample.append(text)
            size += len(text)
            if size > 4e6:
                break
        tokenizer = TokenizerTrainer().train(sample, args.num_tokens, os.path.join(work, "tok.model"))
        print(f"tokenizer: {args.num_tokens}-token BPE trained on {size / 1e6:.1f} MB (not timed)")

        sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
        raw_1, raw_1_cpu, _ = timed_cpu(lambda: sp.encode(raw, num_threads=1))
        raw_n, raw_n_cpu, raw_ids = timed_cpu(lambda: sp.encode(raw, num_threads=cpus))
        n_tokens = sum(map(len, raw_ids))
        del raw_ids
        raw_best = min(raw_1, raw_n)  # the reference: raw SentencePiece's faster single-process setting
        print(f"reference raw SentencePiece batch encode (one process): 1 thread {raw_1:.2f} s ({mb / raw_1:.1f} MB/s, "
              f"CPU {raw_1_cpu:.2f} s), {cpus} threads {raw_n:.2f} s ({mb / raw_n:.1f} MB/s, CPU {raw_n_cpu:.2f} s); "
              f"{n_tokens} tokens")

        results, cpu_results = {}, {}
        for num_proc in (1, 2):
            cache = os.path.join(work, f"cache-{num_proc}")
            seconds, cpu, (tokens, windows) = timed_cpu(lambda: prepare(texts, tokenizer, num_proc, cache))
            assert not tokens.from_cache and tokens.num_tokens == n_tokens
            results[num_proc], cpu_results[num_proc] = seconds, cpu
            print(f"encode+index num_proc={num_proc}: {seconds:.2f} s ({mb / seconds:.1f} MB/s) = "
                  f"{seconds / raw_best:.2f}x raw SentencePiece wall time; CPU {cpu:.2f} s = "
                  f"{cpu / raw_1_cpu:.2f}x raw 1-thread CPU; {len(windows)} packed windows of {SEQ_LEN}")
        hit, (tokens, _) = timed(lambda: prepare(texts, tokenizer, 2, os.path.join(work, "cache-2")))
        assert tokens.from_cache
        print(f"second preparation (cache hit, num_proc=2): {hit:.3f} s = {100 * hit / results[2]:.1f}% of the first")
        print(f"target: num_proc=2 <= 1.5x raw single-process: {results[2] / raw_best:.2f}x "
              f"({'met' if results[2] <= 1.5 * raw_best else 'missed'}); cache hit < 5%: "
              f"{'met' if hit < 0.05 * results[2] else 'missed'}")

        loader_rates = {}
        for packed in (True, False):
            dm = XLabDataModule(locations=source, splits={"train": 0}, num_tokens=args.num_tokens,
                                tokenizer_path=tokenizer.path, seq_len=SEQ_LEN, batch_size=BATCH, packed=packed,
                                cache_dir=os.path.join(work, "cache-dm"), num_proc=2)
            dm.prepare_data()
            dm.setup("fit")
            loader_rates["packed" if packed else "padded"] = loader_batches_per_s(dm)
            streamed = XLabDataModule(locations=stream_source(source), splits={"train": 0}, num_tokens=args.num_tokens,
                                      tokenizer_path=tokenizer.path, seq_len=SEQ_LEN, batch_size=BATCH, packed=packed)
            loader_rates["streamed " + ("packed" if packed else "padded")] = loader_batches_per_s(streamed)
        # On a busy machine torch's OpenMP threads can slow each other down: take the faster thread setting,
        # the stricter reference for the loader.
        default_threads = torch.get_num_threads()
        rates = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            rates[threads], model_name = model_steps_per_s(args.num_tokens)
        torch.set_num_threads(default_threads)
        model_threads = max(rates, key=rates.get)
        model_rate = rates[model_threads]
        model_name += f", best of torch threads {sorted(rates)} ({model_threads})"
        print(f"train loader (0 workers, batch {BATCH}x{SEQ_LEN}): packed {loader_rates['packed']:.0f} batches/s, "
              f"padded {loader_rates['padded']:.0f} batches/s; streamed (tokenized on the fly): packed "
              f"{loader_rates['streamed packed']:.0f} batches/s, padded {loader_rates['streamed padded']:.0f} batches/s; "
              f"reference model {model_name}: {model_rate:.1f} steps/s "
              f"({loader_rates['packed'] / model_rate:.0f}x headroom cached, "
              f"{loader_rates['streamed packed'] / model_rate:.0f}x streamed)")
        print(json.dumps({
            "corpus_mb": round(mb, 2), "documents": len(texts), "tokens": n_tokens, "cpus": cpus,
            "load_avg_start": round(load[0], 2),
            "raw_sp_1thread_s": round(raw_1, 3), "raw_sp_allthreads_s": round(raw_n, 3),
            "raw_sp_1thread_cpu_s": round(raw_1_cpu, 3), "prep_np1_cpu_s": round(cpu_results[1], 3),
            "prep_np2_cpu_s": round(cpu_results[2], 3), "prep_np1_cpu_vs_raw_sp_cpu": round(cpu_results[1] / raw_1_cpu, 3),
            "prep_np1_s": round(results[1], 3), "prep_np2_s": round(results[2], 3),
            "prep_np1_mb_s": round(mb / results[1], 2), "prep_np2_mb_s": round(mb / results[2], 2),
            "prep_np2_vs_raw_sp": round(results[2] / raw_best, 3), "cache_hit_s": round(hit, 3),
            "cache_hit_fraction": round(hit / results[2], 4),
            "loader_batches_s_packed": round(loader_rates["packed"], 1),
            "loader_batches_s_padded": round(loader_rates["padded"], 1),
            "loader_batches_s_streamed_packed": round(loader_rates["streamed packed"], 1),
            "loader_batches_s_streamed_padded": round(loader_rates["streamed padded"], 1),
            "model_steps_s": round(model_rate, 2), "model_steps_s_by_threads": {k: round(v, 2) for k, v in rates.items()},
            "reference": model_name,
        }))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

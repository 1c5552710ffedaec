#!/usr/bin/env python
"""Peak memory of tokenizer training: the whole train split against a bounded sample (tokenizer_sample_bytes).

Generates a corpus (``--corpus-mb``, default 48 MB) of documents of Zipf-distributed made-up words in sentences
and paragraphs (lognormal document sizes around 3 KB, like Wikipedia articles), as 8 JSONL files, and trains a
``--num-tokens`` BPE tokenizer through ``XLabDataModule`` (train split 0.95; the rest held out) in a fresh
process per setup, so each peak RSS is that setup's own:

- ``seed``: every train document, fed whole up to 4192 bytes per "sentence" (what the seed code did);
- ``all``: every train document, in sentence-sized pieces (``TokenizerTrainer.SENTENCE_BYTES``);
- ``sample``: a seeded random sample of ``--sample-mb`` (default 6 MB) of the documents (``tokenizer_sample_bytes``);
- ``stream``: the same budget sampled from the corpus opened with ``streaming: true``.

Prints, per setup: the bytes fed to SentencePiece, the peak RSS while the tokenizer is sampled and trained
(VmHWM, reset just before) and its rise over the RSS just before, split into the heap's rise (peak RssAnon:
what runs out) and the peak of mapped files (RssFile: Arrow data the kernel can drop), the time, and the held-out compression (bytes
per token over 300 held-out documents) so that a smaller sample's cost in quality shows. The reference is the
``all`` setup measured in the same run. Ends with one JSON line.

    python bench/tokenizer_memory.py [--corpus-mb 48] [--sample-mb 6] [--num-tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

SETUPS = ("seed", "all", "sample", "stream")


def write_corpus(directory: str, size_mb: float, seed: int = 0, files: int = 8) -> list[str]:
    """Documents of Zipf-distributed words: a vocabulary the size of a real language's, real-looking counts."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1.0 / np.arange(1, 27)
    lengths = rng.integers(1, 11, size=60_000)
    words = np.array(["".join(rng.choice(letters, n, p=weights / weights.sum())) for n in lengths])
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    zipf /= zipf.sum()
    stream = words[rng.choice(len(words), size=int(size_mb * 1e6 / 5) + 1000, p=zipf)].tolist()  # ~5 bytes/word
    paths = [os.path.join(directory, f"part-{i}.jsonl") for i in range(files)]
    handles = [open(p, "w", encoding="utf-8") for p in paths]
    written, doc, at = 0, 0, 0
    while written < size_mb * 1e6 and at < len(stream) - 1000:
        target = int(rng.lognormal(np.log(2500), 0.8))
        paragraphs, size = [], 0
        while size < target and at < len(stream) - 1000:
            sentences = []
            for n in rng.integers(5, 26, size=int(rng.integers(2, 7))):
                sentence = " ".join(stream[at:at + n])
                at += n
                sentences.append(sentence[0].upper() + sentence[1:] + ".")
            paragraphs.append(" ".join(sentences))
            size += len(paragraphs[-1]) + 1
        text = "\n".join(paragraphs)
        handles[doc % files].write(json.dumps({"text": text}) + "\n")
        written += len(text) + 1
        doc += 1
    for handle in handles:
        handle.close()
    return paths


def memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since start or since reset_peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1e3


class PeakWatcher(threading.Thread):
    """Samples RssAnon (the heap: what an out-of-memory kill counts) and RssFile (mapped files, e.g. Arrow data:
    page cache the kernel can drop) every 20 ms and keeps their peaks."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks, self._done = {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], memory_mb(field))

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return self.peaks


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux; ru_maxrss would also carry the parent's peak across exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(setup: str, corpus: str, sample_bytes: int, num_tokens: int, threads: int, out_dir: str) -> dict:
    """One setup in this (fresh) process: load, train, measure."""
    from xlabml.datamodules import XLabDataModule
    from xlabml.tokenizer import TokenizerTrainer

    fed = {"bytes": 0, "sentences": 0}
    original = TokenizerTrainer._sentences.__func__

    def counting(cls, texts, max_bytes, stats):
        for piece in original(cls, texts, max_bytes, stats):
            fed["bytes"] += len(piece.encode("utf-8"))
            fed["sentences"] += 1
            yield piece

    TokenizerTrainer._sentences = classmethod(counting)
    if setup == "seed":
        TokenizerTrainer.SENTENCE_BYTES = 4192
    source = {"path": "json", "data_files": corpus, "streaming": setup == "stream"}
    dm = XLabDataModule(locations=source, splits={"train": 0.95, "val": 0.05}, num_tokens=num_tokens,
                        tokenizer_path=os.path.join(out_dir, f"{setup}.model"), seq_len=64,
                        tokenizer_train_args={"num_threads": threads}, cache_dir=os.path.join(out_dir, "cache"),
                        tokenizer_sample_bytes=sample_bytes if setup in ("sample", "stream") else 10 ** 15)
    dm.texts()
    reset_peak()
    before, anon_before = memory_mb("VmRSS"), memory_mb("RssAnon")
    watcher = PeakWatcher()
    watcher.start()
    start = time.perf_counter()
    tokenizer = dm.tokenizer  # samples (or reads) the train split and trains
    train_s = time.perf_counter() - start
    peak, peaks = memory_mb("VmHWM"), watcher.stop()
    held = dm.texts()["val"]
    held = held.head(300) if hasattr(held, "head") else held.select(range(min(300, len(held))))["text"]
    held_bytes = sum(len(t.encode("utf-8")) for t in held)
    return {"setup": setup, "fed_mb": round(fed["bytes"] / 1e6, 2), "sentences": fed["sentences"],
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "training_rise_mb": round(peak - before, 1), "anon_rise_mb": round(peaks["RssAnon"] - anon_before, 1),
            "peak_file_mb": round(peaks["RssFile"], 1), "train_s": round(train_s, 2),
            "held_out_bytes_per_token": round(held_bytes / sum(map(len, tokenizer.encode(held))), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=48)
    parser.add_argument("--sample-mb", type=float, default=6)
    parser.add_argument("--num-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sample_bytes = int(args.sample_mb * 1e6)
    if args.child:
        print(json.dumps(child(args.child, args.corpus, sample_bytes, args.num_tokens, args.threads, args.out)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf")  # the children's Arrow copies go with tmp
        start = time.perf_counter()
        write_corpus(tmp, args.corpus_mb)
        corpus_mb = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 1e6
        print(f"corpus: {corpus_mb:.1f} MB of generated documents in 8 JSONL files "
              f"({time.perf_counter() - start:.0f} s to write); sample budget {args.sample_mb} MB; "
              f"{args.num_tokens}-token BPE, {args.threads} threads")
        rows = {}
        for setup in SETUPS:
            command = [sys.executable, os.path.abspath(__file__), "--child", setup, "--corpus",
                       os.path.join(tmp, "*.jsonl"), "--out", tmp, "--sample-mb", str(args.sample_mb),
                       "--num-tokens", str(args.num_tokens), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"setup {setup} failed:\n{done.stderr[-3000:]}")
            rows[setup] = json.loads(done.stdout.strip().splitlines()[-1])
            r = rows[setup]
            print(f"{setup:>6}: fed {r['fed_mb']:7.2f} MB in {r['sentences']:8d} sentences | peak RSS "
                  f"{r['peak_rss_mb']:7.1f} MB (rise {r['training_rise_mb']:6.1f} MB; heap rise "
                  f"{r['anon_rise_mb']:6.1f} MB, mapped files {r['peak_file_mb']:6.1f} MB) | "
                  f"{r['train_s']:6.1f} s | held-out {r['held_out_bytes_per_token']:.3f} bytes/token", flush=True)
    ref = rows["all"]
    ratios = {s: round(rows[s]["anon_rise_mb"] / max(ref["anon_rise_mb"], 1e-9), 3) for s in SETUPS}
    per_mb = {s: round(rows[s]["anon_rise_mb"] / max(rows[s]["fed_mb"], 1e-9), 2) for s in SETUPS}
    slope = (ref["anon_rise_mb"] - rows["sample"]["anon_rise_mb"]) / (ref["fed_mb"] - rows["sample"]["fed_mb"])
    print("heap rise relative to 'all' (the whole train split): " + ", ".join(f"{s} {ratios[s]:.3f}" for s in SETUPS))
    print("heap rise per MB fed: " + ", ".join(f"{s} {per_mb[s]:.2f}" for s in SETUPS)
          + f"; between 'sample' and 'all': {slope:.2f} MB per MB fed")
    print(json.dumps({
        "corpus_mb": round(corpus_mb, 1), "sample_mb": args.sample_mb, "num_tokens": args.num_tokens,
        "threads": args.threads, "setups": rows, "heap_rise_vs_all": ratios, "heap_rise_mb_per_mb_fed": per_mb,
        "heap_mb_per_mb_fed_sample_to_all": round(slope, 2),
        "reference": "setup 'all': the whole train split through the same trainer, measured in the same run",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), "
                   f"Python {platform.python_version()}",
    }))


if __name__ == "__main__":
    main()

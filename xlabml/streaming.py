"""Streamed corpora: documents read shard by shard while training consumes them, never stored on disk.

A data source with ``streaming: true`` is a Hugging Face ``IterableDataset`` (see ``xlabml.sources``). Here:

- :class:`TextStream`: the documents of one split of a stream. A document's split is decided by a keyed hash of
  its text (:func:`hash_fraction`), so every rank, worker and run agrees on it without counting the stream.
  Its shards (a file each) are dealt out to the data consumers (ranks × loader workers) by :func:`shard_plan`.
- :class:`StreamWindows`: a torch ``IterableDataset`` of exactly the windows ``SequenceDataset`` builds from the
  same documents (padded or packed), tokenized on the fly, shuffled in seeded blocks for training, and
  resumable exactly mid-epoch: ``state_dict``/``load_state_dict`` travel in ``StatefulDataLoader``'s state,
  which Lightning saves in its checkpoints.
- :func:`sample_stream`: a bounded, seeded sample of a stream's documents (what the tokenizer trains on).

A stream has no length: a training run over it ends at ``trainer.max_steps``; statistics that need a full pass
are estimated from the head of the stream (``XLabDataModule.compute_stats``) or not given.
"""
from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from xlabml.datasets import _available_cpus, _num_windows, packed_item, padded_item, resolve_step
from xlabml.tokenizer import Tokenizer

READ_BATCH = 256  # documents per read from a shard: a resumed position re-reads at most this many
_STATE_VERSION = 1


def hash_fraction(text: str, seed: int) -> float:
    """A keyed hash of `text` as a number in ``[0, 1)``: the same on every machine, process and run."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def shard_plan(num_shards: int, consumers: int, consumer: int, order: Sequence[int] | None = None
               ) -> list[tuple[int, bool]]:
    """The shards one data consumer reads, in order, each with whether it keeps only a stride of its documents.

    The shards, taken in `order` (default: as numbered), are dealt out whole and round robin as long as every
    consumer gets one more; every consumer reads the ones left over (fewer than `consumers`) and keeps every
    ``consumers``-th of their documents, counted across them. So the consumers' documents are disjoint, their
    union is the stream, each reads as many whole shards as the others, and no worker idles when there are
    fewer shards than consumers (at the cost of every consumer reading the leftover shards).

    Returns: ``[(shard, strided), ...]``.
    """
    order = list(range(num_shards)) if order is None else [int(s) for s in order]
    whole = num_shards // consumers * consumers
    return ([(order[i], False) for i in range(consumer, whole, consumers)]
            + [(order[i], True) for i in range(whole, num_shards)])


class TextStream:
    """The documents of one split of a streamed corpus, read shard by shard from a resumable position.

    Args:
        dataset: a ``datasets.IterableDataset`` with a ``text`` column (``xlabml.sources.load_locations``).
        low, high: the split's share of the hash range: a non-empty document belongs to the split when
            ``low <= hash_fraction(text, seed) < high`` (``0, 1``: every non-empty document).
        seed: the hash key (the data module's seed, so a seed gives one split everywhere).
    """

    def __init__(self, dataset: datasets.IterableDataset, low: float = 0.0, high: float = 1.0, seed: int = 42):
        if not 0 <= low <= high:
            raise ValueError(f"TextStream: expected 0 <= low <= high, got low={low!r}, high={high!r}")
        self.dataset, self.low, self.high, self.seed = dataset, float(low), float(high), seed

    def __repr__(self) -> str:
        return f"TextStream(shards={self.num_shards}, share=[{self.low:.4g}, {self.high:.4g}), seed={self.seed})"

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def contains(self, text: str | None) -> bool:
        """Whether a document belongs to this split (empty documents belong to none)."""
        if not text:
            return False
        if self.low <= 0 and self.high >= 1:
            return True
        return self.low <= hash_fraction(text, self.seed) < self.high

    def documents(self, plan: Sequence[tuple[int, bool]], consumers: int = 1, consumer: int = 0,
                  start: dict | None = None) -> Iterator[tuple[dict, str]]:
        """The split's documents in the shards of `plan` (see :func:`shard_plan`), from position `start`.

        Yields ``(position, text)``; ``position`` is where reading starts again to yield this document next
        (``{"shard": index in plan, "state": the shard's datasets state at the start of its current read,
        "row": documents of that read to skip, "seen": strided documents counted before this one}``).
        """
        shard_index, state, row, seen = ((start["shard"], start["state"], start["row"], start["seen"])
                                         if start is not None else (0, None, 0, 0))
        while shard_index < len(plan):
            shard, strided = plan[shard_index]
            # a fresh object per shard: one that loaded a state would load it again when iterated again
            source = self.dataset.shard(num_shards=self.num_shards, index=shard)
            if state is not None:
                source.load_state_dict(state)
            reads = source.iter(batch_size=READ_BATCH)  # .iter, not iter(): datasets' own worker split stays off
            try:
                for batch in reads:
                    texts = self._texts(batch)
                    for k in range(row, len(texts)):
                        mine, counted = not strided or seen % consumers == consumer, seen
                        seen += strided
                        if mine and self.contains(texts[k]):
                            yield {"shard": shard_index, "state": state, "row": k, "seen": counted}, texts[k]
                    state, row = source.state_dict(), 0
            finally:
                reads.close()
            shard_index, state, row = shard_index + 1, None, 0

    @staticmethod
    def _texts(batch: dict) -> list:
        if "text" not in batch:
            raise ValueError(f"streamed documents have no 'text' column (they have {sorted(batch)}); "
                             "set 'column' on the data source")
        return batch["text"]

    def head(self, n: int) -> list[str]:
        """The split's first `n` documents in stream order (all of them, if fewer)."""
        return [text for _, text in itertools.islice(self.documents(shard_plan(self.num_shards, 1, 0)), n)]


# --------------------------------------------------------------------------------------------- windows

class _Padder:
    """Padded windows of one document at a time (no state between documents)."""

    def __init__(self, seq_len: int, step: int, sos: int, eos: int):
        self.size, self.step, self.seq_len, self.sos, self.eos = seq_len + 1, step, seq_len, sos, eos

    def state(self) -> None:
        return None

    def load(self, state: None) -> None:
        pass

    def add(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        tokens = np.empty(len(ids) + 2, dtype=np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = self.sos, ids, self.eos
        for k in range(int(_num_windows(np.int64(len(tokens) - 1), self.seq_len, self.step))):
            yield tokens[k * self.step:k * self.step + self.size]

    def flush(self) -> Iterator[np.ndarray]:
        return iter(())


class _Packer:
    """Packed windows of a document stream: a buffer starting at the next window's first token.

    Its arrays are only ever rebound, never written to, so a state is a snapshot without copying.
    """

    def __init__(self, seq_len: int, step: int, sos: int, eos: int):
        self.size, self.step, self.sos, self.eos = seq_len + 1, step, sos, eos
        self.load(None)

    def state(self) -> tuple:
        return self.tokens, self.local, self.doc, self.next_doc, self.emitted

    def load(self, state: tuple | None) -> None:
        if state is None:
            state = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64), 0, False)
        self.tokens, self.local, self.doc, self.next_doc, self.emitted = state

    def add(self, ids: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        n = len(ids) + 2
        tokens = np.empty(n, dtype=np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = self.sos, ids, self.eos
        self.tokens = np.concatenate([self.tokens, tokens])
        self.local = np.concatenate([self.local, np.arange(n, dtype=np.int32)])
        self.doc = np.concatenate([self.doc, np.full(n, self.next_doc, dtype=np.int64)])
        self.next_doc += 1
        while len(self.tokens) >= self.size:
            yield self.tokens[:self.size], self.local[:self.size], self.doc[:self.size]
            self.tokens, self.local, self.doc = self.tokens[self.step:], self.local[self.step:], self.doc[self.step:]
            self.emitted = True

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The last window of the stream: there is one unless the previous window already reached the end."""
        if len(self.tokens) and (not self.emitted or len(self.tokens) > self.size - self.step):
            yield self.tokens, self.local, self.doc
        self.load(None)


def _batched(iterable, n: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


class StreamWindows(IterableDataset):
    """Training windows over a :class:`TextStream`: the items ``SequenceDataset`` builds, made on the fly.

    Each data consumer (rank × loader worker) reads its own shards (:func:`shard_plan`), encodes its documents
    in batches and cuts them into windows exactly as ``SequenceDataset`` does over the same documents in the
    same order: padded (one document per window) or packed (``positions``, ``doc_ids``). One pass over the
    split is a pass.

    Args:
        stream: the split's documents.
        tokenizer: encodes them (rebuilt from its model bytes in each worker).
        seq_len, step_size, packed, train_sos: as ``SequenceDataset``.
        shuffle: training order: each pass reads the shards in a seeded order (a function of seed and pass)
            and, with ``shuffle_buffer > 1``, yields each block of that many consecutive windows in a seeded
            permutation (a function of seed, pass, consumer and block).
        shuffle_buffer: windows per shuffled block: a block holds about ``12 * (seq_len + 1) * shuffle_buffer``
            bytes (packed) per consumer.
        seed: seed of the shard order and of the block permutations.
        cycle: passes follow each other without end (a run ends at ``max_steps``); else iteration stops at the
            end of a pass and the next iteration starts the next pass.
        resume: iteration starts where the last one stopped (or at a loaded state); without it (evaluation)
            every iteration starts at the beginning of pass 0.
        rank, world_size: this process's place among the data-parallel processes.
        encode_batch: documents encoded per tokenizer call.

    Item: a dict of LongTensors of shape ``(seq_len,)``: ``x``, ``y`` (and ``positions``, ``doc_ids`` when
    packed). State (``state_dict``): the pass, the block, the windows of the block already yielded and where
    the block starts (the document being cut, as a position in its shard, the packing buffer before it and the
    windows it had given); restoring it re-reads the block's documents and yields exactly the windows an
    uninterrupted iteration would have yielded next. It is valid only for the same ranks × workers.
    """

    def __init__(self, stream: TextStream, tokenizer: Tokenizer, seq_len: int, step_size: float | int = 1.0,
                 packed: bool = False, train_sos: bool = False, *, shuffle: bool = False, shuffle_buffer: int = 0,
                 seed: int = 42, cycle: bool = False, resume: bool = True, rank: int = 0, world_size: int = 1,
                 encode_batch: int = 64):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: expected an int >= 1")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r}: expected an int >= 0 (windows per shuffled block)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}: expected 0 <= rank < world_size={world_size}")
        self.stream, self.model_proto = stream, tokenizer.model_proto
        self.sos_index, self.eos_index = tokenizer[tokenizer.sos_token], tokenizer[tokenizer.eos_token]
        self.pad_index = tokenizer[tokenizer.pad_token]
        self.seq_len, self.step = seq_len, resolve_step(step_size, seq_len)
        self.packed, self.train_sos = packed, train_sos
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.cycle, self.resume, self.rank, self.world_size = cycle, resume, rank, world_size
        self.encode_batch = encode_batch
        self._state: dict | None = None  # after the last yielded window; None: the start of `_start_pass`
        self._start_pass = 0
        self._loaded = False  # the state was loaded, not reached by iterating
        self._tokenizer = None

    def __getstate__(self):  # worker processes build their own tokenizer
        return {**self.__dict__, "_tokenizer": None}

    # ------------------------------------------------------------------------------------------ state

    def set_pass(self, index: int) -> None:
        """Start the next iteration at pass `index`, unless the current state is already inside it."""
        if self._state is None or self._state["pass"] != index:
            self._state, self._start_pass = None, int(index)

    def state_dict(self) -> dict[str, Any]:
        state = self._state or {"pass": self._start_pass, "done": False, "block": 0, "yielded": 0, "start": None,
                                "consumers": None, "consumer": None}
        start = state["start"]
        if start is not None:
            carry = start["carry"]
            if carry is not None:  # packing buffer: plain lists (checkpoints load with weights_only)
                carry = [carry[0].tolist(), carry[1].tolist(), carry[2].tolist(), int(carry[3]), bool(carry[4])]
            start = {"doc": start["doc"], "carry": carry, "skip": int(start["skip"])}
        return {"version": _STATE_VERSION, **state, "start": start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"streamed data state version {state.get('version')!r}: expected {_STATE_VERSION}")
        state = {k: v for k, v in state.items() if k != "version"}
        start = state["start"]
        if start is not None and start["carry"] is not None:
            tokens, local, doc, next_doc, emitted = start["carry"]
            carry = (np.asarray(tokens, np.int32), np.asarray(local, np.int32), np.asarray(doc, np.int64),
                     next_doc, emitted)
            state["start"] = {**start, "carry": carry}
        self._state, self._start_pass = (state if state["consumers"] is not None else None), state["pass"]
        self._loaded = True

    # -------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        consumers, consumer = self.world_size * workers, self.rank * workers + worker_id
        state, loaded, self._loaded = (self._state if self.resume else None), self._loaded, False
        if state is not None and (state["consumers"], state["consumer"]) != (consumers, consumer):
            raise ValueError(
                f"the streamed data state was saved by data consumer {state['consumer']} of {state['consumers']} "
                f"(ranks x loader workers), but this is consumer {consumer} of {consumers}: resume a streamed run "
                "with the same number of processes and data.num_workers")
        if state is not None and state["done"]:
            if loaded:  # saved after this consumer's pass ended, while the others' went on: nothing left
                return iter(())
            state, self._start_pass = None, state["pass"] + 1  # the next epoch: the next pass
        if state is None:
            state = {"pass": self._start_pass if self.resume else 0, "done": False, "block": 0, "yielded": 0,
                     "start": None, "consumers": consumers, "consumer": consumer}
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.model_proto, num_threads=max(1, _available_cpus() // workers))
        return self._iterate(state)

    def _iterate(self, state: dict) -> Iterator[dict[str, torch.Tensor]]:
        consumer = state["consumer"]
        block_size = self.shuffle_buffer if self.shuffle and self.shuffle_buffer > 1 else 1
        while True:
            index, block, start, skip = state["pass"], state["block"], state["start"], state["yielded"]
            windows = self._windows(index, start, state["consumers"], consumer)
            any_window = start is not None
            while chunk := list(itertools.islice(windows, block_size)):
                any_window = True
                order = (np.random.default_rng([self.seed % 2 ** 32, index, consumer, block]).permutation(len(chunk))
                         if block_size > 1 else range(len(chunk)))
                end = chunk[-1][0]
                for j in range(skip, len(chunk)):
                    last = j + 1 == len(chunk)
                    self._state = {**state, "pass": index, "block": block + last, "yielded": 0 if last else j + 1,
                                   "start": end if last else start}
                    yield self._item(chunk[order[j]][1])
                block, start, skip = block + 1, end, 0
            if not self.cycle:  # the pass is over; the next iteration starts the next one
                self._state = {**state, "pass": index, "done": True, "block": block, "yielded": 0, "start": start}
                return
            state = {**state, "pass": index + 1, "block": 0, "yielded": 0, "start": None}
            self._state = state
            if not any_window:
                raise ValueError(f"data consumer {consumer} of {state['consumers']} (ranks x loader workers) got no "
                                 f"documents in a whole pass over {self.stream}: the stream is too small for "
                                 "this many consumers")

    def _windows(self, index: int, cursor: dict | None, consumers: int, consumer: int) -> Iterator[tuple[dict, Any]]:
        """``(cursor after the window, window)`` of pass `index` from `cursor` (None: the pass's start)."""
        order = (np.random.default_rng([self.seed % 2 ** 32, index]).permutation(self.stream.num_shards)
                 if self.shuffle else None)
        plan = shard_plan(self.stream.num_shards, consumers, consumer, order)
        cutter = (_Packer if self.packed else _Padder)(self.seq_len, self.step, self.sos_index, self.eos_index)
        start, skip = None, 0
        if cursor is not None:
            cutter.load(cursor["carry"])
            skip = cursor["skip"]
            if cursor["doc"] == "end":
                yield from self._flush(cutter, skip)
                return
            start = cursor["doc"]
        for group in _batched(self.stream.documents(plan, consumers, consumer, start), self.encode_batch):
            for (position, _), ids in zip(group, self._tokenizer.encode([text for _, text in group])):
                carry = cutter.state()
                for n, window in enumerate(cutter.add(ids), 1):
                    if n > skip:
                        yield {"doc": position, "carry": carry, "skip": n}, window
                skip = 0
        yield from self._flush(cutter, 0)

    @staticmethod
    def _flush(cutter, skip: int) -> Iterator[tuple[dict, Any]]:
        carry = cutter.state()
        for n, window in enumerate(cutter.flush(), 1):
            if n > skip:
                yield {"doc": "end", "carry": carry, "skip": n}, window

    def _item(self, window) -> dict[str, torch.Tensor]:
        if self.packed:
            tokens, local, doc = window
            return packed_item(tokens, local, doc, self.seq_len, self.pad_index, self.train_sos)
        return padded_item(window, self.seq_len, self.pad_index)


class StreamLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` over :class:`StreamWindows` for a training loop that holds batches ahead.

    Args:
        dataset: the windows.
        epoch: if given, each iteration starts pass ``epoch()`` (e.g. Lightning's current epoch), so that
            epochs are passes even when loader workers are started afresh for each epoch.
        held_batches: batches the training loop fetches before it trains on them. ``state_dict`` reports the
            state before those, i.e. after the batches actually trained on, until the loader is exhausted.
            Lightning's fetcher holds 1 for a loader without a length (it fetches one batch ahead to see the
            end coming); without this its checkpoint would skip a batch on resume.
        kwargs: ``StatefulDataLoader`` arguments.

    Each data-parallel process reads other documents, so each has its own position, but Lightning saves the
    loader state of rank 0 only and gives it to every rank on resume. ``state_dict`` therefore gathers the
    positions of all ranks (a collective: Lightning calls it on every rank when it saves a checkpoint), and
    ``load_state_dict`` takes this rank's.
    """

    def __init__(self, dataset: StreamWindows, epoch: Callable[[], int] | None = None, held_batches: int = 0,
                 **kwargs):
        super().__init__(dataset, **kwargs)
        self._epoch, self._held = epoch, held_batches
        self._states: collections.deque | None = None
        self._exhausted = False

    def __iter__(self):
        if self._epoch is not None:
            self.dataset.set_pass(self._epoch())  # before the workers get their copy of the dataset
        iterator = super().__iter__()
        if not self._held:
            return iterator
        self._states, self._exhausted = collections.deque([super().state_dict()], maxlen=self._held + 1), False
        return self._track(iterator)

    def _track(self, iterator):
        for batch in iterator:
            self._states.append(super().state_dict())
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict() if self._states is None or self._exhausted else self._states[0]
        world = self.dataset.world_size
        if world == 1:
            return {"ranks": [state]}
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(f"the streamed data of rank {self.dataset.rank} of {world} needs the other ranks' "
                               "positions to save its state, but torch.distributed is not initialized")
        states = [None] * world
        torch.distributed.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states, world = state_dict.get("ranks"), self.dataset.world_size
        if not isinstance(states, list) or len(states) != world:
            saved = len(states) if isinstance(states, list) else "an unknown number of"
            raise ValueError(f"the streamed data state holds the positions of {saved} processes, but this run has "
                             f"{world}: resume a streamed run with the same number of processes")
        self._states = None
        super().load_state_dict(states[self.dataset.rank])


# -------------------------------------------------------------------------------------------- sampling

def sample_stream(stream: TextStream, max_bytes: int, seed: int = 42, scan_bytes: int | None = None,
                  spread: int = 64) -> list[str]:
    """A seeded sample of a stream's documents totalling at most `max_bytes` UTF-8 bytes (for the tokenizer).

    Reads up to `scan_bytes` (default ``4 * max_bytes``) of documents, taking an equal share from each of up
    to `spread` shards (in a seeded order; more shards when those run out), and keeps the documents whose
    keyed hash is below a threshold lowered until they fit in `max_bytes` (a bottom-k sample). A stream smaller
    than the scan is sampled over its whole length; a larger one over the heads of the spread shards.
    Deterministic for a seed; documents are returned in the order they were read.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes!r}: expected a positive number of bytes")
    scan = 4 * max_bytes if scan_bytes is None else scan_bytes
    order = np.random.default_rng(seed % 2 ** 32).permutation(stream.num_shards)
    per_shard = math.ceil(scan / min(len(order), spread))
    key = f"{seed}:sample"
    kept: list[tuple[float, int, int, str]] = []  # max-heap on priority: (-priority, -index, bytes, text)
    total = scanned = index = 0
    threshold = 1.0
    for shard in order:
        read = 0
        documents = stream.documents([(int(shard), False)])
        for _, text in documents:
            size = len(text.encode("utf-8", "surrogatepass"))
            read, index = read + size, index + 1
            priority = hash_fraction(text, key)
            if priority < threshold and size <= max_bytes:
                heapq.heappush(kept, (-priority, -index, size, text))
                total += size
                while total > max_bytes:  # drop the highest priorities; never admit one as high again
                    negative, _, dropped, _ = heapq.heappop(kept)
                    total, threshold = total - dropped, -negative
            if read >= per_shard:
                break
        documents.close()
        scanned += read
        if scanned >= scan:
            break
    return [text for _, _, _, text in sorted(kept, key=lambda item: -item[1])]

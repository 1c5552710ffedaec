"""XLabDataModule: text sources → tokenizer → cached token ids → windows → resumable data loaders."""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import datasets
import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from xlabml.atomic import atomic_path, write_atomic
from xlabml.checkpoints import check_tokenizer
from xlabml.datasets import SequenceDataset, TokenDataset, resolve_step, warmup_length
from xlabml.segments import SegmentDataset
from xlabml.sources import (DEFAULT_SPLITS, SPLIT_NAMES, format_split_report, load_splits, sample_documents,
                            text_lengths)
from xlabml.streaming import StreamLoader, StreamWindows, TextStream, sample_stream
from xlabml.tokenizer import CHAT_TOKENS, Tokenizer, TokenizerTrainer, escape, split_text

DATA_FORMATS = ("text", "chat", "preference")  # what a data row is (see XLabDataModule's `format`)
# Splits each Lightning stage reads; stages may run without an optional split (e.g. fit without val).
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ResumableSampler(StatefulDistributedSampler):
    """Shuffled (or sequential) sampler whose order is a pure function of ``(seed, epoch)``, sharded by rank.

    Its state (``yielded`` samples of the current ``epoch``) travels in the StatefulDataLoader's state, so a
    resumed run continues with exactly the remaining samples of the epoch, and the next epoch's order is the
    same as in an uninterrupted run. Being a ``DistributedSampler``, Lightning keeps it under DDP instead of
    wrapping it; the trainer calls ``set_epoch`` at each epoch start.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 42,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.next_yielded = None  # a restored position belongs to the restored epoch only
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"yielded": self.yielded, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.epoch = int(state_dict.get("epoch", self.epoch))


class XLabDataModule(L.LightningDataModule):
    """Data for XLab models: documents from `locations`, a SentencePiece tokenizer, cached token ids, windows.

    Args:
        locations: one data source or a list of them, concatenated. A source is a local file path/glob, a dict
            of ``datasets.load_dataset`` arguments (``path``, ``name``, ``split``, ``data_files``, ``revision``,
            ``trust_remote_code``, ``sample_by``, ``streaming``, ...) plus ``column`` (the text column, default
            ``text``) and ``drop_columns`` (default true), or ``{builtin: python-docs}``. With ``streaming: true``
            the documents are read while training consumes them and never stored (``xlabml.streaming``): the
            train split is then an endless stream of passes that a run ends at ``trainer.max_steps`` (on one
            process without ``max_steps``, each epoch is one pass).
        splits: split name (``train``/``val``/``test``/``predict``) → a float ratio or int count of the documents
            of `locations` (shuffled with `seed`; ``0`` = the remainder, at most one), or a source / list of
            sources of its own (e.g. a held-out file). Default ``{train: 0.9, val: 0.05, test: 0.025,
            predict: 0}``. Documents left over are reported. Streamed locations take ratios only: a document's
            split is decided by a hash of its text.
        num_tokens: vocabulary size: trained tokenizers get this many tokens, a loaded one may not have more;
            the CLI links it to the model's ``n_vocab``.
        tokenizer_path: the tokenizer model file: loaded if it exists, else downloaded from `tokenizer_url`,
            else trained on a sample of the train split (`tokenizer_sample_bytes`) and saved here.
        tokenizer_url: where to download the tokenizer model from when `tokenizer_path` does not exist (saved to
            `tokenizer_path`, or under `cache_dir` when that is not set).
        tokenizer_train_args: SentencePiece trainer options (``TokenizerTrainer``), e.g. ``{model_type: char}``.
        seq_len: tokens per training window (the model's ``max_len``).
        step_size: window stride: a float is a fraction of `seq_len`, an int a token count.
        eval_step_size: the window stride of the val, test and predict splits (same forms); default `step_size`.
            A model trained on windows at every token (``step_size: 1``) is scored on non-overlapping windows
            with ``eval_step_size: 1.0``: each target once, so validating during training stays cheap.
        packed: concatenate documents into full windows (with ``positions`` and ``doc_ids``) instead of one
            padded document per window.
        train_sos: in packed mode, train the model to predict the next document's ``<sos>`` after ``<eos>``.
        dynamic_encode: do not store token ids; cache only document lengths and encode when a window is read.
        batch_size, num_workers, pin_memory, persistent_workers: data loader settings.
        num_proc: processes for encoding (``datasets.map``).
        seed: seed of the document split and of the training shuffle (a pure function of seed and epoch).
        cache_dir: where encoded splits are cached (default: ``<HF datasets cache>/xlabml``).
        shuffle_buffer: streamed train split: windows per shuffled block (per loader worker; each block is
            yielded in a seeded random order, its shards in a seeded order per pass); 0 or 1: stream order.
        tokenizer_sample_bytes: the most text the tokenizer is trained on: a seeded random subset of the train
            split's documents (for a stream, a sample of its first ``4 *`` that many bytes, read from up to 64
            shards). Default 1 GB.
        seq_len_warmup: sequence-length warmup: for this many optimizer steps, training batches are cut to the
            first ``warmup_length(step, seq_len, seq_len_start, seq_len_warmup)`` tokens of their windows (short
            windows first, in stages of ``seq_len_start`` tokens, then ``seq_len``); the windows and their order are
            the usual ones, so a resumed run (which restores the step and the sampler) cuts exactly the same
            batches. Cheaper early steps: a step of length L costs about L / seq_len of a full one. 0: off.
        seq_len_start: the first (and the stage) length of the warmup; default ``seq_len // 4``.
        format: what a data row is: ``text`` (a document, for pretraining), ``chat`` (a chat or a prompt/response
            pair, for instruction tuning: targets are the assistant replies only) or ``preference`` (a prompt with a
            chosen and a rejected response, for DPO: batches of pairs). Chat and preference rows are read from
            JSON Lines/JSON/Parquet/CSV/Arrow files (``xlabml.posttrain.records``) and need an existing tokenizer
            (rows of messages: a chat tokenizer, ``./manage.py add-chat-tokens``); preference pairs are padded
            windows (``packed`` does not apply).
        segments: consecutive segments instead of windows, for a model with a segment memory (``memory_len``):
            each split's token stream is cut into ``batch_size`` rows and each batch holds the next segment of
            ``seq_len`` tokens of every row (``xlabml.segments``), in order, for training and evaluation alike
            (``step_size``, ``packed`` and the shuffle do not apply). Resumes exactly.
    """

    def __init__(
        self,
        locations: str | dict[str, Any] | list[str | dict[str, Any]] | None = None,
        splits: dict[str, int | float | str | dict[str, Any] | list[str | dict[str, Any]]] | None = None,
        num_tokens: int = 32768,
        tokenizer_path: str | None = None,
        tokenizer_url: str | None = None,
        tokenizer_train_args: dict[str, Any] | None = None,
        seq_len: int = 512,
        step_size: int | float = 1.0,
        eval_step_size: int | float | None = None,
        packed: bool = False,
        train_sos: bool = False,
        dynamic_encode: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        num_proc: int = 1,
        seed: int = 42,
        cache_dir: str | None = None,
        shuffle_buffer: int = 8192,
        tokenizer_sample_bytes: int = 1_000_000_000,
        seq_len_warmup: int = 0,
        seq_len_start: int | None = None,
        format: str = "text",
        segments: bool = False,
    ):
        super().__init__()
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: expected an int >= 1")
        resolve_step(step_size, seq_len)
        if eval_step_size is not None:
            try:
                resolve_step(eval_step_size, seq_len)
            except ValueError as e:
                raise ValueError(f"eval_{e}") from None  # names the option: eval_step_size=...: expected ...
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 4:
            raise ValueError(f"num_tokens={num_tokens!r}: expected an int > 4 (the 4 special tokens and more)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        if not isinstance(num_proc, int) or num_proc < 1:
            raise ValueError(f"num_proc={num_proc!r}: expected an int >= 1")
        if isinstance(seq_len_warmup, bool) or not isinstance(seq_len_warmup, int) or seq_len_warmup < 0:
            raise ValueError(f"seq_len_warmup={seq_len_warmup!r}: expected an int >= 0 (optimizer steps)")
        if seq_len_start is not None and (isinstance(seq_len_start, bool) or not isinstance(seq_len_start, int)
                                          or not 1 <= seq_len_start <= seq_len):
            raise ValueError(f"seq_len_start={seq_len_start!r}: expected None or an int in 1..seq_len={seq_len}")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r}: expected an int >= 0 (windows per shuffled block)")
        if (isinstance(tokenizer_sample_bytes, bool) or not isinstance(tokenizer_sample_bytes, int)
                or tokenizer_sample_bytes < 1):
            raise ValueError(f"tokenizer_sample_bytes={tokenizer_sample_bytes!r}: expected an int >= 1 (bytes of text)")
        unknown = sorted(set(splits or {}) - set(SPLIT_NAMES))
        if unknown:
            raise ValueError(f"splits {splits!r}: unknown split names {unknown}; expected some of {list(SPLIT_NAMES)}")
        if format not in DATA_FORMATS:
            raise ValueError(f"format={format!r}: expected one of {list(DATA_FORMATS)}")
        if format == "preference" and packed:
            raise ValueError("packed applies to text and chat data, not to format='preference' (each pair is two "
                             "padded windows): set packed: false")
        if segments and format != "text":
            raise ValueError(f"segments: true cuts each split's token stream into rows of consecutive segments, "
                             f"for text; format={format!r} keeps each example whole: set segments: false")
        if segments and seq_len_warmup:
            raise ValueError("seq_len_warmup cuts batches short, which would skip tokens between consecutive "
                             "segments (segments: true): set seq_len_warmup: 0")
        if format == "preference" and seq_len_warmup:
            raise ValueError("seq_len_warmup applies to text and chat data, not to format='preference' (a cut pair "
                             "would lose its responses): set seq_len_warmup: 0")
        if format != "text" and dynamic_encode:
            raise ValueError(f"dynamic_encode applies to text only, not to format={format!r} (chats and preference "
                             "pairs are encoded once and cached)")
        self.save_hyperparameters()
        self._tokenizer: Tokenizer | None = None
        self._texts = None
        self.split_report: dict[str, Any] | None = None
        self.datasets: dict[str, SequenceDataset | StreamWindows] = {}
        self._checkpoint_tokenizer: dict[str, Any] | None = None  # the tokenizer a restored checkpoint needs

    # -------------------------------------------------------------------------------------- properties

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer model file (for a downloaded tokenizer without `tokenizer_path`: its cache path)."""
        path, url = self.hparams.tokenizer_path, self.hparams.tokenizer_url
        if path is None and url:
            name = os.path.basename(urllib.parse.urlparse(url).path) or "tokenizer.model"
            digest = hashlib.sha256(url.encode()).hexdigest()[:12]
            path = os.path.join(self._cache_dir, "tokenizers", f"{digest}-{name}")
        return None if path is None else os.path.expanduser(os.fspath(path))

    @property
    def num_tokens(self) -> int:
        """Vocabulary size for the model (the configured `num_tokens`; checked against an existing tokenizer)."""
        path = self.tokenizer_path
        if self._tokenizer is None and path and os.path.isfile(path):
            self._set_tokenizer(Tokenizer.load(path))
        return self.hparams.num_tokens

    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    @property
    def pad_index(self) -> int:
        return Tokenizer.pad_id if self._tokenizer is None else self._tokenizer[self._tokenizer.pad_token]

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer: loaded from `tokenizer_path`, downloaded, or trained (as in `prepare_data`)."""
        if self._tokenizer is None:
            self._prepare_tokenizer()
        return self._tokenizer

    @property
    def _cache_dir(self) -> str:
        return os.path.expanduser(self.hparams.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "xlabml"))

    # ------------------------------------------------------------------------------------ preparation

    def texts(self) -> dict:
        """Documents of every configured split (``datasets.Dataset`` with a ``text`` column, or a ``TextStream``
        for a streamed split), loaded once."""
        if self._texts is None:
            load = None
            if self.hparams.format != "text":  # checked chats or pairs, one JSON string each in `text`
                from xlabml.posttrain.records import load_examples
                load = functools.partial(load_examples, format=self.hparams.format)
            self._texts, self.split_report = load_splits(self.hparams.locations, self.hparams.splits,
                                                         self.hparams.seed, load=load)
            rank_zero_info(format_split_report(self.split_report))
        return self._texts

    def prepare_data(self) -> None:
        """Build the tokenizer if needed and encode every configured split into the cache (rank 0 only)."""
        tokenizer = self.tokenizer
        for name, texts in self.texts().items():
            if not isinstance(texts, TextStream) and len(texts):  # a stream is encoded as it is read
                self._token_dataset(name, texts, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Build the windows of the splits `stage` needs (fit: train, val; validate: val; test; predict)."""
        names = _STAGE_SPLITS[stage] if stage in _STAGE_SPLITS else tuple(self.texts())
        for name in names:
            if name in self.datasets:
                continue
            if name not in self.texts():
                if name == "val" and stage == "fit":
                    continue  # training without validation
                raise ValueError(f"split {name!r} is needed for {stage!r} but splits configures only "
                                 f"{list(self.texts())}")
            self.datasets[name] = self._sequence_dataset(name)

    def _sequence_dataset(self, name: str) -> SequenceDataset | StreamWindows | SegmentDataset:
        texts = self.texts()[name]
        if isinstance(texts, TextStream):
            if self.hparams.segments:
                raise ValueError(f"segments: true needs the {name!r} split's whole token stream (it is cut into "
                                 "batch_size rows); a streamed split (streaming: true) has no end to cut at")
            return self._stream_windows(name, cycle=False)
        if len(texts) == 0:
            raise ValueError(f"split {name!r} is empty: splits={self.hparams.splits!r} gives it no documents "
                             f"({self.split_report})")
        tokenizer = self.tokenizer
        tokens = self._token_dataset(name, texts, tokenizer)
        if self.hparams.format == "preference":
            from xlabml.posttrain.preference import PreferenceDataset
            return PreferenceDataset(tokens, self.hparams.seq_len, pad_index=tokenizer[tokenizer.pad_token], name=name)
        if self.hparams.format == "chat":
            from xlabml.posttrain.sft import ChatSequenceDataset
            return ChatSequenceDataset(
                tokens, self.hparams.seq_len, self._step_size(name), packed=self.hparams.packed,
                sos_index=tokenizer[tokenizer.sos_token], eos_index=tokenizer[tokenizer.eos_token],
                pad_index=tokenizer[tokenizer.pad_token])
        if self.hparams.segments:
            trainer = self.trainer
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            return SegmentDataset(
                tokens, self.hparams.seq_len, self.hparams.batch_size, sos_index=tokenizer[tokenizer.sos_token],
                eos_index=tokenizer[tokenizer.eos_token], pad_index=tokenizer[tokenizer.pad_token],
                train_sos=self.hparams.train_sos, rank=rank, world_size=world)
        return SequenceDataset(
            tokens, self.hparams.seq_len, self._step_size(name), packed=self.hparams.packed,
            train_sos=self.hparams.train_sos, sos_index=tokenizer[tokenizer.sos_token],
            eos_index=tokenizer[tokenizer.eos_token], pad_index=tokenizer[tokenizer.pad_token])

    def _step_size(self, name: str) -> int | float:
        """The window stride of split `name`: ``step_size`` for train, ``eval_step_size`` (if set) for the others."""
        eval_step = self.hparams.get("eval_step_size")  # absent from checkpoints saved before it existed
        return self.hparams.step_size if name == "train" or eval_step is None else eval_step

    def _stream_windows(self, name: str, cycle: bool) -> StreamWindows:
        """Windows of a streamed split: shuffled and resumable for train, in stream order for the others."""
        trainer, tokenizer, train = self.trainer, self.tokenizer, name == "train"
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return StreamWindows(
            self.texts()[name], tokenizer, self.hparams.seq_len, self._step_size(name), packed=self.hparams.packed,
            train_sos=self.hparams.train_sos, shuffle=train, shuffle_buffer=self.hparams.shuffle_buffer,
            seed=self.hparams.seed, cycle=cycle, resume=train, rank=rank, world_size=world)

    def _token_dataset(self, name: str, texts, tokenizer) -> TokenDataset:
        if self.hparams.format == "chat":
            from xlabml.posttrain.sft import encode_chats
            tokens = encode_chats(texts, tokenizer, num_proc=self.hparams.num_proc, cache_dir=self._cache_dir)
            if not tokens.from_cache:
                rank_zero_info(f"data: encoded {name} split: {len(tokens)} chats, {tokens.num_tokens} tokens")
            return tokens
        if self.hparams.format == "preference":
            from xlabml.posttrain.preference import encode_pairs
            pairs = encode_pairs(texts, tokenizer, num_proc=self.hparams.num_proc, cache_dir=self._cache_dir)
            if not pairs.from_cache:
                rank_zero_info(f"data: encoded {name} split: {len(pairs)} preference pairs")
            return pairs
        tokens = TokenDataset(texts, tokenizer, num_proc=self.hparams.num_proc, dynamic=self.hparams.dynamic_encode,
                              cache_dir=self._cache_dir)
        if not tokens.from_cache:
            rank_zero_info(f"data: encoded {name} split: {len(tokens)} documents, {tokens.num_tokens} tokens")
        return tokens

    def _prepare_tokenizer(self) -> None:
        path, url = self.tokenizer_path, self.hparams.tokenizer_url
        if path and os.path.isfile(path):
            tokenizer = Tokenizer.load(path)
        elif url:
            _download(url, path)
            tokenizer = Tokenizer.load(path)
        else:
            if path is None:
                raise ValueError("tokenizer_path is not set: set it to the tokenizer file to load, or to where the "
                                 "tokenizer trained on the train split is saved (or set tokenizer_url)")
            if self.hparams.format != "text":
                raise FileNotFoundError(f"tokenizer {path} not found: format={self.hparams.format!r} fine-tunes a "
                                        "pretrained model and needs its tokenizer (for chats, the chat tokenizer made "
                                        "by `./manage.py add-chat-tokens`)")
            texts = self.texts()
            train = texts.get("train")
            if train is None or not isinstance(train, TextStream) and len(train) == 0:
                raise ValueError(f"cannot train the tokenizer: no train split in splits={self.hparams.splits!r}")
            budget, seed = self.hparams.tokenizer_sample_bytes, self.hparams.seed
            if isinstance(train, TextStream):
                sample = sample_stream(train, budget, seed)
                size = sum(len(t.encode("utf-8", "surrogatepass")) for t in sample)
                where = f"{len(sample)} documents ({size / 1e6:.1f} MB) sampled from the streamed train split"
            else:
                indices = sample_documents(train, budget, seed)
                sample = train if len(indices) == len(train) else train.select(indices)
                where = (f"{len(indices)} of the train split's {len(train)} documents"
                         + ("" if sample is train else f" (a random sample within {budget / 1e6:.0f} MB)"))
            rank_zero_info(f"data: training a {self.hparams.num_tokens}-token tokenizer on {where}, "
                           f"saving it to {path}")
            trainer = TokenizerTrainer(self.hparams.tokenizer_train_args)
            tokenizer = trainer.train(iter(sample) if isinstance(sample, list) else _iter_texts(sample),
                                      self.hparams.num_tokens, path)
        self._set_tokenizer(tokenizer)

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self._checkpoint_tokenizer is not None:  # before any text is encoded with it
            check_tokenizer(tokenizer, **self._checkpoint_tokenizer)
        n, limit = len(tokenizer), self.hparams.num_tokens
        if n > limit:
            raise ValueError(f"tokenizer {tokenizer.path} has {n} tokens, more than num_tokens={limit}: set "
                             f"num_tokens >= {n} or use a tokenizer made for this vocabulary size")
        if n < limit:
            rank_zero_warn(f"tokenizer {tokenizer.path} has {n} tokens, fewer than num_tokens={limit}: "
                           f"{limit - n} embedding rows stay unused")
        self._tokenizer = tokenizer

    # ------------------------------------------------------------------------------------ checkpoints

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, **kwargs):
        """The data module of a training checkpoint or an export, by ``xlabml.checkpoints.load_datamodule``
        (every format, tokenizer path resolved and checked against the recorded hash); keywords override
        recorded settings."""
        if hparams_file is not None:
            raise ValueError("XLabDataModule.load_from_checkpoint takes no hparams_file: pass settings to override "
                             "as keywords")
        from xlabml.checkpoints import load_datamodule
        return load_datamodule(checkpoint_path, datamodule_class=cls, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Lightning saves this in every training checkpoint: the identity of the tokenizer the data is encoded
        with (``tokenizer_hash``: ``Tokenizer.content_hash``; ``tokenizer_path``: the file it came from)."""
        path = self.tokenizer_path
        if self._tokenizer is None and not (path and os.path.isfile(path)):
            return {}  # no tokenizer yet (nothing encoded either)
        return {"tokenizer_hash": self.tokenizer.content_hash, "tokenizer_path": self.tokenizer.path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls this when it restores a checkpoint (``--ckpt_path`` of fit, validate, test, predict):
        the tokenizer must be the one the checkpoint recorded. Checked now if the tokenizer is loaded or its file
        exists, else as soon as it is trained or downloaded, before any text is encoded."""
        if not state_dict.get("tokenizer_hash"):
            return
        self._checkpoint_tokenizer = {"expected_hash": state_dict["tokenizer_hash"],
                                      "expected_path": state_dict.get("tokenizer_path")}
        path = self.tokenizer_path
        if self._tokenizer is not None:
            check_tokenizer(self._tokenizer, **self._checkpoint_tokenizer)
        elif path and os.path.isfile(path):
            self.tokenizer  # noqa: B018 - loads it, and _set_tokenizer checks it

    # ------------------------------------------------------------------------------------------ loaders

    def _dataset(self, name: str) -> SequenceDataset | StreamWindows:
        if name not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(name, name))
        return self.datasets[name]

    def _loader_args(self) -> dict:
        workers = self.hparams.num_workers
        return dict(batch_size=self.hparams.batch_size, num_workers=workers, pin_memory=self.hparams.pin_memory,
                    persistent_workers=self.hparams.persistent_workers and workers > 0)

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled windows of the train split; resumable mid-epoch (state in Lightning's checkpoint)."""
        if isinstance(self.texts().get("train"), TextStream):
            return self._stream_train_loader()
        dataset = self._dataset("train")
        if isinstance(dataset, SegmentDataset):  # whole batches, in order; each process has its own rows
            sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=False)
            return StatefulDataLoader(dataset, sampler=sampler, **{**self._loader_args(), "batch_size": None})
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed)
        return StatefulDataLoader(dataset, sampler=sampler, **self._loader_args())

    def _stream_train_loader(self) -> StatefulDataLoader:
        """A streamed train split: endless passes that ``max_steps`` ends, or on one process without
        ``max_steps`` one pass per epoch (without a trainer: one pass per iteration, see ``set_pass``)."""
        trainer = self.trainer
        steps, world = (trainer.max_steps, trainer.world_size) if trainer is not None else (-1, 1)
        if steps < 0 and world > 1:
            raise ValueError(
                f"the train split is streamed (streaming: true) and has no length, so a run on {world} processes "
                "must end at trainer.max_steps: set it (trainer.max_epochs can end a streamed run only on one "
                "process, where each epoch is one pass; in parallel the processes' passes differ in length)")
        dataset = self.datasets["train"] = self._stream_windows("train", cycle=steps > 0)
        if trainer is None:
            return StreamLoader(dataset, **self._loader_args())
        epoch = None
        if steps < 0:
            rank_zero_info("data: the streamed train split has no length: each epoch is one pass over it")
            epoch = lambda: trainer.current_epoch  # noqa: E731
        # Lightning fetches one batch ahead from a loader without a length: its checkpoints must not count it
        return StreamLoader(dataset, epoch=epoch, held_batches=1, **self._loader_args())

    def _eval_loader(self, name: str):
        if name not in self.texts():
            return []
        dataset = self._dataset(name)
        if isinstance(dataset, StreamWindows):
            limit = getattr(self.trainer, f"limit_{name}_batches", None)
            if isinstance(limit, float) and limit == 1.0:
                rank_zero_warn(f"the {name} split is streamed: every {name} run reads all of it; set "
                               f"trainer.limit_{name}_batches to a number of batches per process to bound it")
            return DataLoader(dataset, **self._loader_args())
        if isinstance(dataset, SegmentDataset):  # in order; a DistributedSampler, so Lightning does not shard it
            sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=False)
            return DataLoader(dataset, sampler=sampler, **{**self._loader_args(), "batch_size": None})
        return DataLoader(dataset, shuffle=False, **self._loader_args())

    def val_dataloader(self):
        return self._eval_loader("val")

    def train_length(self, step: int) -> int:
        """Tokens per training window at optimizer step ``step`` (``seq_len`` without a warmup)."""
        seq_len = self.hparams.seq_len
        start = self.hparams.seq_len_start or max(1, seq_len // 4)
        return warmup_length(step, seq_len, start, self.hparams.seq_len_warmup)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning calls this on every batch before moving it to the device: during a sequence-length warmup,
        a training batch is cut to ``train_length(trainer.global_step)`` tokens (every tensor of it)."""
        trainer = self.trainer
        if not self.hparams.seq_len_warmup or trainer is None or not trainer.training:
            return batch
        length = self.train_length(trainer.global_step)
        if length >= batch["x"].size(1):
            return batch
        return {name: value[:, :length] for name, value in batch.items()}

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("predict")

    # ----------------------------------------------------------------------------- statistics, checks

    def compute_stats(self, split: str = "train", sample_size: int = 1000) -> dict[str, Any]:
        """Statistics of the vocabulary and of one split (the tokenizer is loaded or built as in prepare_data).

        Args:
            split: a configured split name.
            sample_size: splits with more documents estimate token counts from this many random documents.
        Returns: ``{"vocabulary": {"total", "special", "learned", "single_characters", "byte_tokens"},
            "split": {"name", "documents", "characters", "tokens", "tokens_estimated", "sampled_documents",
            "chars_per_token", "text_length": {"mean", "median", "std", "min", "max"}, "token_length": {...}}}``
            (character counts and text lengths are exact; token figures come from the sample when
            ``tokens_estimated``). For a streamed split, whose totals would need a full pass, ``documents``,
            ``characters`` and ``tokens`` are None (unless it holds at most `sample_size` documents), the other
            figures come from its first `sample_size` documents, and ``note`` says so.
        """
        texts = self._split_texts(split)
        tokenizer = self.tokenizer
        vocabulary = {"total": len(tokenizer), "special": 0, "learned": 0, "single_characters": 0, "byte_tokens": 0}
        for index in range(len(tokenizer)):
            piece = tokenizer.get_token(index)
            kind = ("special" if index < 4 or piece in CHAT_TOKENS else "byte_tokens" if _BYTE_TOKEN.fullmatch(piece)
                    else "single_characters" if len(piece) == 1 else "learned")
            vocabulary[kind] += 1
        if isinstance(texts, TextStream):
            return {"vocabulary": vocabulary, "split": _stream_stats(split, texts, tokenizer, sample_size)}
        chars = text_lengths(texts)
        n = len(texts)
        estimated = n > sample_size
        sample = (np.sort(np.random.default_rng(self.hparams.seed).choice(n, sample_size, replace=False))
                  if estimated else np.arange(n))
        token_lengths = np.fromiter(
            (len(ids) for ids in tokenizer.encode(texts.select(sample)["text"] if estimated else texts["text"])),
            dtype=np.int64)
        sample_chars = int(chars[sample].sum())
        chars_per_token = sample_chars / max(1, int(token_lengths.sum()))
        tokens = int(token_lengths.sum()) if not estimated else round(int(chars.sum()) / chars_per_token)
        return {
            "vocabulary": vocabulary,
            "split": {
                "name": split, "documents": n, "characters": int(chars.sum()), "tokens": tokens,
                "tokens_estimated": estimated, "sampled_documents": len(sample),
                "chars_per_token": round(chars_per_token, 4),
                "text_length": _describe(chars), "token_length": _describe(token_lengths),
            },
        }

    def validate_data(self, split: str | None = None, dump_dir: str | None = None) -> str:
        """Documents the tokenizer trainer cannot use as they are, as CSV text.

        Reasons: ``empty`` (empty or missing text: the data pipeline skips it), ``hard_split`` (longer than the
        trainer's ``max_sentence_length`` bytes with a stretch that has no newline or space to split at, so the
        trainer cuts it inside a word).

        Args:
            split: check the documents of this configured split (``index`` = row in the split), or None to check
                the raw sources: ``locations`` (all sources concatenated) and each split given as its own
                source (``splits.<name>``), with ``index`` = row in that source.
            dump_dir: if set, each listed document is written to ``dump_dir/<source>-<index>.txt`` (the directory
                is created; an existing file is not overwritten).
        Returns: CSV text with the header ``source,index,reason,characters,bytes,preview``.
        """
        from xlabml.sources import load_locations
        max_bytes = int({**TokenizerTrainer.DEFAULT_ARGS, **(self.hparams.tokenizer_train_args or {})}
                        ["max_sentence_length"])
        if split is not None:
            sources = {split: self._split_texts(split)}
        else:
            sources = {}
            if self.hparams.locations is not None:
                sources["locations"] = load_locations(self.hparams.locations)
            for name, value in (self.hparams.splits or DEFAULT_SPLITS).items():
                if not isinstance(value, (int, float)):
                    sources[f"splits.{name}"] = load_locations(value)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["source", "index", "reason", "characters", "bytes", "preview"])
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
        for name, dataset in sources.items():
            for index, text in _find_unusable(dataset, max_bytes):
                reason = "hard_split" if text else "empty"
                text = text or ""
                writer.writerow([name, index, reason, len(text), len(text.encode("utf-8")), text[:60]])
                if dump_dir:
                    write_atomic(os.path.join(dump_dir, f"{name}-{index}.txt"), text)
        return out.getvalue()

    def _split_texts(self, split: str):
        texts = self.texts()
        if split not in texts:
            raise ValueError(f"split {split!r} is not configured: splits has {list(texts)}")
        if not isinstance(texts[split], TextStream) and len(texts[split]) == 0:
            raise ValueError(f"split {split!r} is empty ({self.split_report})")
        return texts[split]


def _stream_stats(split: str, texts: TextStream, tokenizer: Tokenizer, sample_size: int) -> dict[str, Any]:
    """compute_stats' split figures for a stream: from its first `sample_size` documents, never a full pass
    (exact when the stream holds no more)."""
    sample = texts.head(sample_size + 1)
    if not sample:
        raise ValueError(f"split {split!r} is streamed and has no documents ({texts})")
    whole = len(sample) <= sample_size
    sample = sample[:sample_size]
    chars = np.fromiter(map(len, sample), dtype=np.int64, count=len(sample))
    token_lengths = np.fromiter(map(len, tokenizer.encode(sample)), dtype=np.int64, count=len(sample))
    return {
        "name": split, "documents": len(sample) if whole else None, "characters": int(chars.sum()) if whole else None,
        "tokens": int(token_lengths.sum()) if whole else None, "tokens_estimated": not whole,
        "sampled_documents": len(sample),
        "chars_per_token": round(int(chars.sum()) / max(1, int(token_lengths.sum())), 4),
        "text_length": _describe(chars), "token_length": _describe(token_lengths),
        "note": (f"streamed split, read in full ({len(sample)} documents)" if whole else
                 f"streamed split: figures from its first {len(sample)} documents; totals need a full pass"),
    }


def _find_unusable(dataset, max_bytes: int):
    """(index, text) of documents that are empty or that the trainer would cut inside a word."""
    if isinstance(dataset, TextStream):  # a streamed split (never holds empty documents): read in full
        texts = (text for _, text in dataset.documents([(s, False) for s in range(dataset.num_shards)]))
        yield from _unusable_texts(texts, max_bytes)
        return
    if isinstance(dataset, datasets.IterableDataset):  # a streamed source: read in full
        yield from _unusable_texts((t for b in dataset.iter(batch_size=1024) for t in b["text"]), max_bytes)
        return
    import pyarrow.compute as pc
    offset = 0
    for batch in dataset.with_format("arrow").iter(batch_size=4096):
        column = batch["text"]
        sizes = pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero((sizes == 0) | (sizes > max_bytes)):
            text = column[int(i)].as_py()
            if not text or _has_hard_split(text, max_bytes):
                yield offset + int(i), text
        offset += len(column)


def _unusable_texts(texts, max_bytes: int):
    for index, text in enumerate(texts):
        if not text or len(text.encode("utf-8", "surrogatepass")) > max_bytes and _has_hard_split(text, max_bytes):
            yield index, text


def _has_hard_split(text: str, max_bytes: int) -> bool:
    pieces = list(split_text(escape(text), max_bytes))
    return any(not a.endswith("\n") and not b.startswith(" ") for a, b in zip(pieces, pieces[1:]))


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "min": 0, "max": 0}
    return {"mean": round(float(values.mean()), 2), "median": float(np.median(values)),
            "std": round(float(values.std()), 2), "min": int(values.min()), "max": int(values.max())}


def _iter_texts(dataset, batch_size: int = 1000):
    for batch in dataset.iter(batch_size=batch_size):
        yield from batch["text"]


def _download(url: str, path: str) -> None:
    """Download `url` to `path` (created atomically; never overwrites)."""
    try:
        with atomic_path(path) as partial:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
    except FileExistsError:
        raise FileExistsError(f"tokenizer file appeared while downloading, refusing to overwrite it: {path}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"could not download tokenizer_url={url!r} to {path}: {e}; check the network, "
                              "or set tokenizer_path to a local tokenizer file") from e

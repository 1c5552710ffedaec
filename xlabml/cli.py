"""The ``xlab`` command (``./xlab.py``): LightningCLI with XLab's data subcommands, its default config and
one-line errors.

Configuration precedence, lowest first: the constructors' defaults < ``conf/defaults.yaml`` (always loaded)
< each ``-c FILE`` in order < command-line flags. The data module's vocabulary size, sequence length and pad
index are linked to the model, so they are set in one place (the ``data:`` section).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import xlabml
from xlabml.checkpoints import (
    RUNTIME_HPARAMS, CheckpointWarning, model_hparams, read_checkpoint, tokenizer_state, warn,
    with_atomic_checkpoints,
)

PROG = "xlab"
DEBUG_ENV = "XLAB_DEBUG"
RESUME_ENV = "XLAB_RESUME_CKPT"  # the checkpoint "last" resolved to, inherited by DDP's re-executed ranks
DATA_SUBCOMMANDS = ("train_tokenizer", "compute_stats", "validate_data")
DESCRIPTION = (
    "XLab: train GPT-style language models (fit, validate, test, predict) and prepare their data "
    "(train_tokenizer, compute_stats, validate_data). Settings: conf/defaults.yaml, then each -c FILE in order, "
    "then --flags. Add --debug to see tracebacks instead of one-line errors."
)
LINKS = (("data.num_tokens", "model.n_vocab"), ("data.seq_len", "model.max_len"), ("data.pad_index", "model.pad_index"))
# Model arguments a run starting from another model's weights (model.init_from) sets for itself: how it trains, not
# what the weights are. The rest of the architecture comes from those weights.
RUN_HPARAMS = ("dropout", "weight_decay_embeddings", "init_from", "lora", "rope_scaling", "rope_scale")
# Positions that hold for any length: a run from such weights may train on longer windows (context extension)
RELATIVE_POSITIONS = ("rope", "alibi", "none")


def config_dir() -> Path:
    """The ``conf/`` directory: next to ``xlab.py`` in a checkout, else the copy installed as ``xlabml.conf``."""
    checkout = Path(xlabml.__file__).resolve().parent.parent / "conf"
    if (checkout / "defaults.yaml").is_file():
        return checkout
    # joinpath, not str(): the installed conf/ has no __init__.py, and a namespace package's files() is a
    # MultiplexedPath whose str() is not a path
    installed = Path(str(importlib.resources.files("xlabml.conf").joinpath("defaults.yaml"))).parent
    if not (installed / "defaults.yaml").is_file():
        raise FileNotFoundError(f"conf/defaults.yaml not found in {checkout} nor in {installed}: broken install?")
    return installed


def default_config_file() -> Path:
    return config_dir() / "defaults.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Data subcommands: they need the data module only, never a model or a trainer.


def train_tokenizer(datamodule: Any) -> None:
    path = datamodule.tokenizer_path
    if not path:
        raise ValueError("data.tokenizer_path is not set: train_tokenizer needs a path to save the tokenizer to")
    if Path(path).exists():
        raise FileExistsError(f"tokenizer {path} already exists; remove it or set another --data.tokenizer_path")
    tokenizer = datamodule.tokenizer  # trains on the train split and saves to tokenizer_path
    print(f"tokenizer: {len(tokenizer)} tokens saved to {path}")


def compute_stats(datamodule: Any, split: str = "train", sample_size: int = 1000) -> None:
    stats = datamodule.compute_stats(split, sample_size)
    for section, values in stats.items():
        print(f"{section}:")
        for key, value in values.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
            print(f"  {key}: {_fmt(value)}")
    if split == "train":
        datamodule.prepare_data()
        datamodule.setup("fit")
        entropy = unigram_entropy(datamodule)
        if entropy is not None:
            print(f"  unigram_entropy: {entropy:.4f} nats/token")


def validate_data(datamodule: Any, split: Optional[str] = None, dump_dir: Optional[str] = None) -> None:
    report = datamodule.validate_data(split, dump_dir)
    rows = report.strip().splitlines()[1:]
    sys.stdout.write(report)
    where = f"split {split!r}" if split else "the sources"
    print(f"{len(rows)} document(s) of {where} the tokenizer trainer cannot use as they are"
          + (f" (written to {dump_dir}/)" if rows and dump_dir else ""), file=sys.stderr)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


DATA_COMMANDS: dict[str, Callable[..., None]] = {
    "train_tokenizer": train_tokenizer,
    "compute_stats": compute_stats,
    "validate_data": validate_data,
}


class XLabTrainer(Trainer):
    """Lightning's Trainer plus XLab's data subcommands (their docstrings are the subcommands' help)."""

    def train_tokenizer(
        self, model: Optional[LightningModule] = None, datamodule: Optional[LightningDataModule] = None
    ) -> None:
        """Train the tokenizer on the training split and save it at data.tokenizer_path (never overwrites)."""
        train_tokenizer(datamodule)

    def compute_stats(
        self,
        model: Optional[LightningModule] = None,
        datamodule: Optional[LightningDataModule] = None,
        split: str = "train",
        sample_size: int = 1000,
    ) -> None:
        """Print vocabulary and split statistics (documents, characters, tokens; train: unigram entropy).

        Args:
            split: the configured split to describe.
            sample_size: splits with more documents estimate token counts from this many random documents.
        """
        compute_stats(datamodule, split, sample_size)

    def validate_data(
        self,
        model: Optional[LightningModule] = None,
        datamodule: Optional[LightningDataModule] = None,
        split: Optional[str] = None,
        dump_dir: Optional[str] = None,
    ) -> None:
        """List, as CSV, the documents the tokenizer trainer cannot use as they are (empty, or cut inside a word).

        Args:
            split: check this configured split instead of the raw sources.
            dump_dir: also write each listed document to DUMP_DIR/<source>-<index>.txt (never overwrites).
        """
        validate_data(datamodule, split, dump_dir)


# ----------------------------------------------------------------------------------------------------------------
# Callbacks added to every run.


class StepSeed(Callback):
    """Reseeds the global RNGs from (seed, rank, epoch, batch index) before every training batch.

    Dropout then draws the same numbers for a batch whether the run was resumed or not, so ``fit --ckpt_path``
    reproduces an uninterrupted run exactly without storing RNG states (and validation, logging or a sanity check
    between two batches cannot shift the stream).
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.seed is None:  # the run's seed_everything value
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        key = f"{self.seed}:{trainer.global_rank}:{trainer.current_epoch}:{batch_idx}".encode()
        step_seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)  # also seeds every CUDA device


class FitSummary(Callback):
    """At the end of fit, prints the final validation loss next to the unigram entropy of the training split.

    A model that learned anything beyond token frequencies has a validation loss below the unigram entropy.
    """

    def __init__(self) -> None:
        self.val_loss: Optional[float] = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.val_loss = float(trainer.callback_metrics["val_loss"])

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        entropy = unigram_entropy(datamodule) if datamodule is not None else None
        parts = []
        if self.val_loss is not None:
            parts.append(f"val_loss {self.val_loss:.3f} nats/token")
        if entropy is not None:
            parts.append(f"unigram entropy {entropy:.3f} nats/token")
        if parts:
            print("\n" + ", ".join(parts), flush=True)
        for callback in trainer.checkpoint_callbacks:
            last = getattr(callback, "last_model_path", "")
            if last:
                print(f"last checkpoint: {last}", flush=True)
                break


def unigram_entropy(datamodule: Any) -> Optional[float]:
    """Entropy in nats/token of the training split's token frequencies, ``<eos>`` (one per document) included.

    This is the loss of the best model that ignores context, the bar a trained model must get below. None when
    the split's token ids are not stored (``dynamic_encode``) or there is no train split.
    """
    dataset = getattr(datamodule, "datasets", {}).get("train")
    tokens = getattr(dataset, "tokens", None)
    if tokens is None or getattr(tokens, "dynamic", True):
        return None
    import pyarrow.compute as pc

    counts = np.zeros(datamodule.num_tokens, dtype=np.int64)
    for batch in tokens.data.with_format("arrow").iter(batch_size=4096):
        ids = pc.list_flatten(batch["ids"]).to_numpy(zero_copy_only=False)
        counts += np.bincount(ids, minlength=len(counts))[: len(counts)]
    counts[getattr(dataset, "eos_index", 2)] += len(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------------------------------
# The CLI.


class SaveConfig(SaveConfigCallback):
    """Saves the run's configuration next to its logs. A validate/test/predict run without a logger has no run
    directory of its own: it saves nothing, rather than writing config.yaml into the working directory (and
    refusing to run the next time because that file exists)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None and stage != "fit":
            return
        super().setup(trainer, pl_module, stage)


class XLabCLI(LightningCLI):
    """LightningCLI for XLab: fit/validate/test/predict plus train_tokenizer/compute_stats/validate_data.

    With ``--ckpt_path`` the model's architecture comes from the checkpoint (a value the configuration sets
    otherwise is replaced, with a one-line warning), its runtime settings (``RUNTIME_HPARAMS``) from the
    configuration, and the data's tokenizer must be the checkpoint's: checked right after the data module is
    built (a tokenizer still to be trained or downloaded: before it encodes anything), on every rank. ``fit
    --ckpt_path`` resumes, so the checkpoint must hold a run's state (not an export's weights only).

    With ``model.init_from`` (and no ``--ckpt_path``) a new run starts from another model's weights: the
    architecture comes from them (a conflicting value set in a -c file or a flag is an error; ``RUN_HPARAMS``
    stay as configured), and the data's tokenizer must be theirs, checked as for ``--ckpt_path``. With
    ``init_from.only`` (some weights only) the architecture is the configured one, and the tokenizer is checked
    only when the embedding or the head is copied.
    Every trainer saves checkpoints atomically (``XLabCheckpointIO``) unless the configuration names another
    CheckpointIO.
    """

    checkpoint_hparams: dict[str, Any] = {}  # the model hyperparameters of --ckpt_path (or init_from), when given
    checkpoint_tokenizer: Optional[dict[str, Any]] = None  # its tokenizer identity ({} if it records none)
    checkpoint_label = "the checkpoint's model"  # how the link checks name the model of checkpoint_hparams

    def __init__(
        self,
        model_class: Optional[type] = None,
        datamodule_class: Optional[type] = None,
        args: Any = None,
        run: bool = True,
        default_config_files: Optional[list[str]] = None,
    ) -> None:
        if model_class is None:
            from xlabml.models import XLabModel as model_class
        if datamodule_class is None:
            from xlabml.datamodules import XLabDataModule as datamodule_class
        if default_config_files is None:
            default_config_files = [str(default_config_file())]
        parser_kwargs: dict[str, Any] = {"prog": PROG, "description": DESCRIPTION, "exit_on_error": False}
        for subcommand in self.subcommands():
            parser_kwargs[subcommand] = {"default_config_files": default_config_files, "exit_on_error": False}
        super().__init__(
            model_class,
            datamodule_class,
            trainer_class=XLabTrainer,
            trainer_defaults={"callbacks": [StepSeed(), FitSummary()]},
            seed_everything_default=42,
            save_config_callback=SaveConfig,
            parser_kwargs=parser_kwargs,
            auto_configure_optimizers=False,  # the model builds its own optimizer and per-step schedule
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{name: {"model", "datamodule"} for name in DATA_SUBCOMMANDS}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The functions check the data against a checkpoint's model before that model is built.
        parser.add_argument(
            "--prepare_data_per_node", type=bool, default=False,
            help="Prepare data (tokenizer, encoding) on local rank 0 of every node instead of on global rank 0 "
            "only; needed when nodes do not share the tokenizer path and the datasets cache.")
        functions = {"model.n_vocab": self._link_n_vocab, "model.max_len": self._link_max_len}
        for source, target in LINKS:
            parser.link_arguments(source, target, compute_fn=functions.get(target), apply_on="instantiate")

    def _link_n_vocab(self, num_tokens: int) -> int:
        n_vocab = self.checkpoint_hparams.get("n_vocab")
        if n_vocab is not None and n_vocab != num_tokens:
            raise ValueError(f"the data's tokenizer has {num_tokens} tokens but {self.checkpoint_label} has "
                             f"n_vocab={n_vocab}")
        return num_tokens

    def _link_max_len(self, seq_len: int) -> int:
        max_len = self.checkpoint_hparams.get("max_len")
        if max_len is None:
            return seq_len
        if seq_len > max_len and self.checkpoint_label.startswith("the model of model.init_from") and \
                self.checkpoint_hparams.get("position") in RELATIVE_POSITIONS:
            return seq_len  # context extension: a new run from the weights at a longer length
        if seq_len > max_len:
            raise ValueError(f"data.seq_len={seq_len} exceeds {self.checkpoint_label} max_len={max_len}")
        return max_len  # shorter windows are fine; the model keeps the length it was trained with

    # -- checkpoint path: "last" and missing files ----------------------------------------------------------------

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand or subcommand in DATA_SUBCOMMANDS:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path:
            self._parse_init_from(subcommand)
            return
        if ckpt_path == "last":
            ckpt_path = resolve_last_checkpoint(self._logs_dir(self.config[subcommand]))
        elif ckpt_path not in ("best", "hpc") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt_path} not found (--ckpt_path expects a .ckpt file or 'last')")
        self.config[subcommand]["ckpt_path"] = ckpt_path
        if not Path(ckpt_path).is_file():
            return
        # The model's hyperparameters come from the checkpoint (its architecture must match the weights); values
        # linked from the data module are checked against the data after instantiation instead.
        checkpoint = read_checkpoint(ckpt_path)
        if subcommand == "fit" and "optimizer_states" not in checkpoint:
            raise ValueError(f"--ckpt_path {ckpt_path} holds weights only (an export or an import: no optimizer "
                             f"state nor progress), so fit cannot resume it; to start a new run from its weights "
                             f"use --model.init_from {ckpt_path}")
        hparams = model_hparams(checkpoint, ckpt_path)
        self.checkpoint_hparams = dict(hparams)
        self.checkpoint_tokenizer = tokenizer_state(checkpoint)
        # Linked values are checked by the link functions; how to run (not what to run) stays as configured.
        for key in (*RUNTIME_HPARAMS, *(t.split(".", 1)[1] for _, t in LINKS)):
            if not (key == "attention" and hparams.get(key) == "linear"):  # linear attention is a layer, not a kernel
                hparams.pop(key, None)
        self._warn_replaced(subcommand, ckpt_path, hparams)
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _parse_init_from(self, subcommand: str) -> None:
        """The architecture and tokenizer identity of ``model.init_from`` (see the class docstring)."""
        from xlabml.init_from import parse_init_from, read_source, token_indexed

        parsed = parse_init_from((self.config[subcommand].get("model") or {}).get("init_from"))
        if parsed is None:
            return
        path, only = parsed
        source = read_source(path, weights=False)
        if source.notes:
            warn(f"model.init_from {path}: XLab computes this model approximately: {'; '.join(source.notes)}")
        if token_indexed(only):  # no hash: the model warns when it copies the weights
            self.checkpoint_tokenizer = source.tokenizer or None
        if only is not None:
            return  # the configured architecture; the selected weights' shapes are checked when they are copied
        self.checkpoint_hparams = dict(source.hparams)
        self.checkpoint_label = f"the model of model.init_from {path}"
        linked = tuple(t.split(".", 1)[1] for _, t in LINKS)
        hparams = {k: v for k, v in source.hparams.items() if k not in (*RUNTIME_HPARAMS, *linked, *RUN_HPARAMS)}
        configured = self.config[subcommand].get("model") or {}
        defaults = self._parser(subcommand).get_defaults().get("model") or {}
        for key, value in hparams.items():
            mine = configured.get(key, value)
            if mine != value and mine != defaults.get(key, value):
                raise ValueError(f"model.init_from {path} has {key}={value!r} but model.{key}={mine!r} is set: a "
                                 "run starting from its weights keeps their architecture (drop the setting, or "
                                 "copy some weights only with init_from.only)")
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _warn_replaced(self, subcommand: str, ckpt_path: str, hparams: dict[str, Any]) -> None:
        """One line for each model value the user set (in a -c file or a flag: not the defaults) that the
        checkpoint's value replaces."""
        configured = self.config[subcommand].get("model") or {}
        defaults = self._parser(subcommand).get_defaults().get("model") or {}
        for key, value in hparams.items():
            mine = configured.get(key, value)
            if mine != value and mine != defaults.get(key, value):
                warn(f"--ckpt_path {ckpt_path}: the checkpoint's model.{key}={value!r} replaces the configured "
                     f"{mine!r} (a checkpoint's architecture cannot change)")

    @staticmethod
    def _logs_dir(config: Any) -> Path:
        logger = config.get("trainer", {}).get("logger")
        save_dir = None
        if isinstance(logger, dict) or hasattr(logger, "get"):
            init_args = logger.get("init_args") or {}
            save_dir = init_args.get("save_dir") if hasattr(init_args, "get") else None
        return Path(save_dir or config.get("trainer", {}).get("default_root_dir") or "logs")

    # -- instantiation --------------------------------------------------------------------------------------------

    def instantiate_classes(self) -> None:
        if self.subcommand in DATA_SUBCOMMANDS:
            # Only the data module: the data subcommands never build a model or a trainer.
            parser = self._parser(self.subcommand)
            self.config_init = self.config.clone()
            config = self.config_init[self.subcommand]
            parser.groups["data"].instantiate_class(parser.groups["data"], config)
            self.datamodule = config.data
            self.model = None
            self.trainer = None
            return
        super().instantiate_classes()
        self.datamodule.prepare_data_per_node = self._get(self.config, "prepare_data_per_node")
        section = self.config[self.subcommand] if self.subcommand else self.config
        if section.get("ckpt_path") and hasattr(self.model, "init_from_done"):
            self.model.init_from_done = True  # the checkpoint's weights, restored after setup, are the run's
        if self.checkpoint_tokenizer:
            # Lightning restores this state too, but only after preparing (encoding) all the data
            self.datamodule.load_state_dict(self.checkpoint_tokenizer)
        elif self.checkpoint_tokenizer is not None:
            ckpt_path = self.config[self.subcommand]["ckpt_path"]
            warn(f"checkpoint {ckpt_path} records no tokenizer hash (written by an older xlabml): cannot check that "
                 f"the data's tokenizer {self.datamodule.tokenizer_path} is the one it was trained with")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Added here, not in trainer_defaults: a configured plugin list would replace a default one.
        config["plugins"] = with_atomic_checkpoints(config.get("plugins"), config.get("strategy"))
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        if subcommand not in DATA_SUBCOMMANDS:
            return super()._prepare_subcommand_kwargs(subcommand)
        config = self.config_init[subcommand]
        return {k: v for k, v in config.items() if k in self._subcommand_method_arguments[subcommand]}

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in DATA_SUBCOMMANDS:
            DATA_COMMANDS[subcommand](self.datamodule, **self._prepare_subcommand_kwargs(subcommand))
            return
        super()._run_subcommand(subcommand)


def resolve_last_checkpoint(logs_dir: Path) -> str:
    """The newest ``last*.ckpt`` under ``logs_dir`` (what ``--ckpt_path last`` means); every rank agrees."""
    inherited = os.environ.get(RESUME_ENV)
    if inherited and _is_ddp_child():
        return inherited
    path = find_last_checkpoint(logs_dir)
    os.environ[RESUME_ENV] = path
    return path


def find_last_checkpoint(logs_dir: str | Path = "logs") -> str:
    """The newest ``last*.ckpt`` under `logs_dir`: what ``last`` means to ``fit --ckpt_path`` and ``infer.py``."""
    candidates = sorted(Path(logs_dir).glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"checkpoint 'last': no last.ckpt found under {Path(logs_dir).resolve()}/")
    return str(candidates[-1])


def _is_ddp_child() -> bool:
    """Whether this process is a rank that Lightning's DDP launcher started by re-executing the command."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


# ----------------------------------------------------------------------------------------------------------------
# Entry point.


_NOISE = ("Given value", "Subclass types expect", "- a class path", "- a dict ", "- Expected a <class 'NoneType'>")


def _one_line(error: BaseException, limit: int = 400) -> str:
    """The error's message on one line: jsonargparse's nested reports lose their lists of accepted forms."""
    message = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_NOISE)] or lines[:1]
    text = re.sub(r"\s+", " ", " ".join(lines))
    text = re.sub(r"^Call to compute_fn of link .*? failed: ", "", text)  # our own link checks speak for themselves
    if isinstance(error, KeyError):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line_warnings(prog: str) -> None:
    """Print ``CheckpointWarning``s as ``PROG: warning: MESSAGE`` (one line) instead of file, line and source."""
    previous = getattr(warnings.formatwarning, "xlab_previous", warnings.formatwarning)

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, CheckpointWarning):
            return f"{prog}: warning: {' '.join(str(message).split())}\n"
        return previous(message, category, filename, lineno, line)

    format_warning.xlab_previous = previous
    warnings.formatwarning = format_warning


def _quiet_warnings() -> None:
    for pattern in (
        ".*does not have many workers.*",
        ".*is smaller than the logging interval.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*LightningCLI's args parameter is intended to run from within Python.*",
        ".*'set_vital' is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def main(args: Any = None) -> None:
    """Run the ``xlab`` command; ``--debug`` (anywhere) shows tracebacks instead of one-line errors."""
    argv = sys.argv if args is None else args
    debug = os.environ.get(DEBUG_ENV) == "1" and _is_ddp_child()
    if "--debug" in argv:
        debug = True
        os.environ[DEBUG_ENV] = "1"  # DDP re-executes sys.argv: the ranks inherit the flag through the environment
        argv[:] = [a for a in argv if a != "--debug"]
    _quiet_warnings()
    one_line_warnings(PROG)
    try:
        XLabCLI(args=args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - every failure a user can cause ends in one line
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

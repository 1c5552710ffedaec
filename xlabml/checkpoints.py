"""Checkpoints: the one loader, the tokenizer check, exports and atomic saving.

Every entry point (``xlab --ckpt_path``, ``xlab-infer``, ``xlab-manage``, ``XLabModel.load_from_checkpoint``,
``XLabDataModule.load_from_checkpoint``) reads checkpoints with ``read_checkpoint`` and builds models with
``load_checkpoint``, so the same rules hold everywhere:

- Three formats: a Lightning training checkpoint (``.ckpt``), an export of it (``.ckpt`` with ``xlab_export``),
  and a safetensors export (``NAME.safetensors`` beside ``NAME.json``, which holds everything but the weights).
  A missing, corrupt or foreign file gives one clear error naming it.
- Runtime settings (``RUNTIME_HPARAMS``: attention backend, compile, activation checkpointing, debug, the loss's
  chunk size) say how to run, not what the weights mean: they can be overridden at load time. A checkpoint
  trained with ``attention='flash'`` loads where the flash_attn package is missing, with SDPA (the same function) and a
  one-line warning.
- LoRA adapters (``xlabml.lora``): a LoRA run's checkpoints hold only the adapters, plus the path and weights hash
  of the base model they adapt (``LORA_KEY``); the loader rebuilds the base from that path, checks its hash (one
  line names the path and both hashes when they differ) and adds the adapters. ``merge_lora_checkpoint`` writes
  the merged model as a plain export.
- Tokenizer identity: every checkpoint records the content hash of the tokenizer it was trained with (training
  checkpoints through ``XLabDataModule.state_dict``, exports by copying it); wherever a checkpoint meets a
  tokenizer the hash must match (``check_tokenizer``), or one line names both files and both hashes.
  Checkpoints written before hashes were recorded load with a one-line warning.

Files are written atomically (``xlabml.atomic``): exports never overwrite, and ``XLabCheckpointIO`` makes
Lightning's own checkpoints appear complete or not at all.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from xlabml.atomic import atomic_path, write_atomic

# Model arguments that say how to run, not what the weights mean: overridable when a checkpoint is loaded.
RUNTIME_HPARAMS = ("attention", "compile", "activation_checkpointing", "debug", "loss_chunk_size")
# Keys LightningCLI adds to saved hyperparameters; they are not constructor arguments.
_CLI_KEYS = ("_instantiator", "_class_path")
DATA_STATE_KEY = "XLabDataModule"  # where Lightning stores XLabDataModule.state_dict() in a checkpoint
EXPORT_HASH_CHARS = 8
EXPORT_VERSION = 1
# What an export keeps: what the loaders read (weights, model and data settings, tokenizer identity) and where
# the weights come from (step, epoch, version).
EXPORT_KEYS = (
    "pytorch-lightning_version",
    "epoch",
    "global_step",
    "hparams_name",
    "hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hyper_parameters",
    DATA_STATE_KEY,
    "quantization",
    "lora_base",
    "lora_merged",
)
QUANTIZATION_KEY = "quantization"  # an export of quantized weights: the scheme, which load_checkpoint applies
# A LoRA run's checkpoint: {"path": the base model's checkpoint or directory, "hash": xlabml.lora.weights_hash of its
# decoder weights as stored there (xlabml.init_from.read_source)}; its state_dict holds the adapters only. A merged export records where it came from under MERGED_KEY.
LORA_KEY = "lora_base"
MERGED_KEY = "lora_merged"


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but not exactly as asked: a missing tokenizer hash, a replaced setting, a fallback.
    The command-line tools print it as one line."""


class TokenizerMismatchError(ValueError):
    """A tokenizer is not the one the checkpoint's model was trained with."""


def warn(message: str) -> None:
    """One ``CheckpointWarning`` (on rank 0 only, when several processes run)."""
    rank_zero_warn(message, category=CheckpointWarning)


# ---------------------------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """The content of a training checkpoint or an export, as Lightning's checkpoint dict.

    Tensors of a local file are memory-mapped (a multi-gigabyte checkpoint costs no memory until read).

    Args:
        path: a ``.ckpt`` file (training checkpoint or export) or a ``.safetensors`` export (beside its ``.json``);
            also, as Lightning reads them, a URL (``s3://``, ``https://``, ...: ``.ckpt`` only) or a binary file
            object.
        map_location: as ``torch.load``'s (safetensors exports are read on the CPU).
        weights_only: ``torch.load``'s safe unpickler (plain tensors and containers only).
    Returns: a dict with at least ``state_dict`` (``model_hparams`` reads the model's settings from it).
    Raises:
        FileNotFoundError: no such file (or a safetensors export without its ``.json``).
        ValueError: the file cannot be read, or is not a checkpoint (names the file).
    """
    if not _is_local(path):
        checkpoint = _read_remote(path, map_location, weights_only)
    elif Path(path).is_dir():
        raise ValueError(f"checkpoint {path} is a directory, expected a .ckpt or .safetensors file")
    elif not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    elif Path(path).suffix == ".safetensors":
        checkpoint = _read_safetensors(Path(path))
    else:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(f"{path} is not a loadable checkpoint ({type(error).__name__}: "
                             f"{_clip(str(error))})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not an XLab checkpoint: it has no 'state_dict'")
    return checkpoint


def _read_remote(path, map_location: Any, weights_only: bool) -> dict[str, Any]:
    from lightning.fabric.utilities.cloud_io import _load

    try:
        return _load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found") from None
    except Exception as error:  # noqa: BLE001 - any unpickling or transport failure means the same to the user
        raise ValueError(f"{path} is not a loadable checkpoint ({type(error).__name__}: "
                         f"{_clip(str(error))})") from None


def _is_local(path) -> bool:
    """A local file name: not a URL (``s3://``, ``file://``, ...: fsspec's business), not a file object."""
    return isinstance(path, (str, os.PathLike)) and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", os.fspath(path))


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found: a safetensors export needs its JSON of hyperparameters")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        state_dict = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not a loadable safetensors export ({type(error).__name__}: "
                         f"{_clip(str(error))})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar} is not an XLab export's JSON: expected an object")
    for name, target in meta.pop("aliases", {}).items():  # tied weights, stored once
        state_dict[name] = state_dict[target]
    return {**meta, "state_dict": state_dict}


def model_hparams(checkpoint: dict[str, Any], path: str | os.PathLike = "the checkpoint") -> dict[str, Any]:
    """The model's constructor arguments recorded in a checkpoint (without LightningCLI's bookkeeping keys).

    Raises:
        ValueError: it records none (a checkpoint of a model that did not save its hyperparameters).
    """
    if not checkpoint.get("hyper_parameters"):
        raise ValueError(f"{path} has no 'hyper_parameters': the model cannot be rebuilt from it")
    return {k: v for k, v in dict(checkpoint["hyper_parameters"]).items() if k not in _CLI_KEYS}


def data_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The data module's constructor arguments recorded in a checkpoint (empty when it has none)."""
    return {k: v for k, v in dict(checkpoint.get("datamodule_hyper_parameters") or {}).items()
            if k not in _CLI_KEYS}


def tokenizer_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``{"tokenizer_hash", "tokenizer_path"}`` of the tokenizer a checkpoint was trained with; empty for a
    checkpoint written before the hash was recorded."""
    state = checkpoint.get(DATA_STATE_KEY)
    if not (isinstance(state, dict) and state.get("tokenizer_hash")):
        # a subclass of XLabDataModule stores its state under its own class name
        state = next((v for v in checkpoint.values() if isinstance(v, dict) and v.get("tokenizer_hash")), {})
    return dict(state)


def checkpoint_metrics(checkpoint: dict[str, Any]) -> dict[str, float]:
    """The monitored metrics (e.g. ``val_loss``) at the time the checkpoint was saved, as ModelCheckpoint recorded
    them; an export keeps them under ``metrics``."""
    metrics = {k: float(v) for k, v in (checkpoint.get("metrics") or {}).items()}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("current_score") is not None:
            metrics[state["monitor"]] = float(state["current_score"])
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# tokenizer identity


def resolve_tokenizer_path(data: dict[str, Any], checkpoint: str | os.PathLike) -> Optional[str]:
    """The tokenizer file named by a checkpoint's data settings, or None if they name none.

    A relative ``tokenizer_path`` is tried from the current directory, then from the checkpoint's directory; a
    downloaded tokenizer (``tokenizer_url`` without ``tokenizer_path``) is looked for where the data module
    caches it.
    """
    path = data.get("tokenizer_path")
    if path is None and data.get("tokenizer_url"):
        from xlabml.datamodules import XLabDataModule

        try:  # the data module's cache path of the download
            path = XLabDataModule(**data).tokenizer_path
        except Exception:  # noqa: BLE001 - settings this version no longer accepts: no tokenizer to offer
            path = None
    if not path:
        return None
    path = Path(path).expanduser()
    beside = Path(checkpoint).parent / path if _is_local(checkpoint) else path
    if not path.is_absolute() and not path.exists() and beside.exists():
        path = beside
    return str(path)


def check_tokenizer(tokenizer, expected_hash: Optional[str], expected_path: Optional[str] = None,
                    checkpoint: Optional[str | os.PathLike] = None) -> None:
    """Raise ``TokenizerMismatchError`` unless ``tokenizer.content_hash`` is ``expected_hash`` (the hash a
    checkpoint recorded); warn once when the checkpoint recorded none (written before hashes were recorded)."""
    which = f"checkpoint {checkpoint}" if checkpoint else "the checkpoint"
    if not expected_hash:
        warn(f"{which} records no tokenizer hash (written by an older xlabml): cannot check that tokenizer "
             f"{tokenizer.path} is the one it was trained with")
        return
    if tokenizer.content_hash != expected_hash:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer.path} (content hash {tokenizer.content_hash}) is not the model's tokenizer: "
            f"{which} was trained with {expected_path or 'another tokenizer'} (content hash {expected_hash})")


# ---------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns: the model and what is known about it.

    Attributes:
        model: the ``XLabModel`` (in training mode, as built: call ``.eval()`` for inference), on the device
            ``map_location`` asked for.
        path: the file it was loaded from (a ``Path``; a URL or file object as given).
        format: ``"training"`` (a Lightning checkpoint), ``"export"`` (``.ckpt`` export) or ``"safetensors"``.
        hparams: the model's constructor arguments as used (overrides and fallbacks applied).
        data_hparams: the data module's settings (locations, splits, tokenizer_path, seq_len, ...); empty if the
            checkpoint has none.
        tokenizer_path: the tokenizer used (given, or named by the data settings and resolved); None if none.
        tokenizer_hash: the tokenizer content hash the checkpoint recorded; None for an old checkpoint.
        tokenizer: the loaded ``Tokenizer``, checked against ``tokenizer_hash`` (None when not asked for or
            when the checkpoint names none).
        global_step, epoch: training progress when it was saved (None if not recorded).
        metrics: monitored metrics when it was saved, e.g. ``{"val_loss": 2.31}`` (may be empty).
        lightning_version: the Lightning version that wrote the training checkpoint.
        quantization: the weight quantization the checkpoint stores (``{"scheme": "int8"}``, see
            ``xlabml.quantize``), applied to the model; None for float weights.
        lora_base: for a checkpoint of LoRA adapters, ``{"path", "hash"}`` of the base model they were added to
            (the path it was found at); None otherwise.
    """

    model: Any
    path: Any
    format: str
    hparams: dict[str, Any]
    data_hparams: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: Optional[str] = None
    tokenizer_hash: Optional[str] = None
    tokenizer: Any = None
    global_step: Optional[int] = None
    epoch: Optional[int] = None
    metrics: dict[str, float] = field(default_factory=dict)
    lightning_version: Optional[str] = None
    quantization: Optional[dict[str, Any]] = None
    lora_base: Optional[dict[str, str]] = None


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = None,
    *,
    overrides: Optional[dict[str, Any]] = None,
    tokenizer: Any = None,
    strict: bool = True,
    model_class: Optional[type] = None,
    base: Optional[str | os.PathLike] = None,
    merge_lora: bool = False,
) -> LoadedCheckpoint:
    """Load a training checkpoint or an export: the one loader behind every entry point.

    Args:
        path: ``.ckpt`` (training checkpoint or export) or ``.safetensors`` (beside its ``.json``).
        map_location: device for the model (``"cpu"``, ``"cuda:0"``, a ``torch.device``; a dict or function as
            ``torch.load`` takes). None: the device it was saved from if there is one here, else the CPU.
        overrides: constructor arguments replacing the recorded ones, meant for the runtime settings
            (``RUNTIME_HPARAMS``, e.g. ``{"attention": "sdpa", "compile": False}``); also ``optimizer`` and
            ``scheduler``, which are not recorded.
        tokenizer: None: load the tokenizer the checkpoint's data settings name, if any; a path or a
            ``Tokenizer``: use that one; False: no tokenizer. A loaded tokenizer is checked against the
            recorded content hash and the model's vocabulary size.
        strict: the weights must match the model's parameters exactly.
        model_class: the class to build (default ``xlabml.models.XLabModel``).
        base: for a checkpoint of LoRA adapters, where its base model is now (default: the recorded path, or a
            file of that name beside the checkpoint); its weights must still have the recorded hash.
        merge_lora: fold LoRA adapters into the weights (``xlabml.lora.merge_lora``): a plain model, faster to run;
            ``hparams['lora']`` becomes None. No effect on a checkpoint without adapters.
    Returns: a ``LoadedCheckpoint``.
    Raises:
        FileNotFoundError: no such checkpoint, the tokenizer it names is missing, or the base of its adapters.
        ValueError: not a loadable XLab checkpoint, unknown overrides, weights that do not fit, the wrong
            tokenizer (``TokenizerMismatchError``), or a LoRA base whose weights changed; each one line naming
            the file.
    """
    from xlabml.models import XLabModel

    model_class = model_class or XLabModel
    path = Path(path) if _is_local(path) else path
    saved_on: list[str] = []

    def record_location(storage, location):
        saved_on.append(location)
        return storage

    checkpoint = read_checkpoint(path, map_location=record_location)
    hparams = _build_hparams(model_hparams(checkpoint, path), dict(overrides or {}), model_class, path)
    data = data_hparams(checkpoint)
    recorded = tokenizer_state(checkpoint)
    tokenizer_path = resolve_tokenizer_path(data, path)
    loaded_tokenizer = None
    if tokenizer is not False and (tokenizer is not None or tokenizer_path is not None):  # checked before building
        loaded_tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else tokenizer_path)
        check_tokenizer(loaded_tokenizer, recorded.get("tokenizer_hash"), recorded.get("tokenizer_path"), path)
        if len(loaded_tokenizer) > hparams["n_vocab"]:
            raise ValueError(f"tokenizer {loaded_tokenizer.path} has {len(loaded_tokenizer)} tokens but the "
                             f"model's vocabulary has {hparams['n_vocab']}: it is not the model's tokenizer")
        tokenizer_path = loaded_tokenizer.path
    model = model_class(**hparams)
    state_dict, lora_base = checkpoint["state_dict"], checkpoint.get(LORA_KEY)
    if lora_base and checkpoint.get(QUANTIZATION_KEY):
        raise ValueError(f"{path} records both LoRA adapters and quantized weights; only a merged or plain model "
                         "is stored quantized")
    if lora_base:
        state_dict, lora_base = lora_state_dict(model, checkpoint, path, base)
    quantization = _quantize(model, checkpoint.get(QUANTIZATION_KEY), path)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the model its hyperparameters describe "
                         f"({_clip(str(error))})") from None
    if hasattr(model, "init_from_done"):
        model.init_from_done = True  # its weights are the checkpoint's: a warm start must not replace them
    if merge_lora:
        from xlabml.lora import merge_lora as merge

        merge(model)
        if "lora" in model.hparams:
            model.hparams["lora"] = None
    model = model.to(_target_device(map_location, saved_on[0] if saved_on else "cpu"))
    return LoadedCheckpoint(
        model=model, path=path, format=_format(path, checkpoint), hparams=dict(model.hparams),
        data_hparams=data, tokenizer_path=tokenizer_path, tokenizer_hash=recorded.get("tokenizer_hash"),
        tokenizer=loaded_tokenizer, global_step=checkpoint.get("global_step"), epoch=checkpoint.get("epoch"),
        metrics=checkpoint_metrics(checkpoint), lightning_version=checkpoint.get("pytorch-lightning_version"),
        lora_base=lora_base, quantization=quantization)


def _quantize(model, spec: Any, path) -> Optional[dict[str, Any]]:
    """Quantizes a freshly built model as an export of quantized weights records (its values are loaded next)."""
    if spec is None:
        return None
    from xlabml.quantize import quantize

    try:
        quantize(model, **spec)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} records a quantization this xlabml cannot apply ({spec!r}: {error})") from None
    return dict(spec)


def lora_state_dict(model, checkpoint: dict[str, Any], path: Any = "the checkpoint",
                    base: Optional[str | os.PathLike] = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The full state dict of a LoRA checkpoint for `model` (an ``XLabModel`` built from its hyperparameters, with
    its adapters): the base weights, read from the recorded base into `model` and checked against the recorded
    hash, plus the checkpoint's adapters. Returns it with ``{"path", "hash"}`` of the base as found.

    Raises:
        FileNotFoundError: the base is neither at `base`, nor at its recorded path, nor beside the checkpoint.
        ValueError: the base's weights hash differs from the recorded one, or does not fit the model; the model
            has no adapters. One line naming the base and, for a hash, both hashes.
    """
    from xlabml.init_from import copy_weights, read_source
    from xlabml.lora import adapter_keys, weights_hash

    reference = checkpoint[LORA_KEY]
    if not adapter_keys(model):
        raise ValueError(f"{path} holds LoRA adapters but its hyperparameters describe a model without them "
                         "(model.lora is not set)")
    recorded, expected = reference.get("path"), reference.get("hash")
    base_path = _find_base(recorded, path, base)
    try:
        source = read_source(base_path)
        copy_weights(model, source)
    except ValueError as error:
        raise ValueError(f"{path}: its LoRA base {base_path} does not fit the adapters' model ({error})") from None
    actual = weights_hash(source.weights)  # as stored: the same whatever dtype the model has been cast to
    if actual != expected:
        raise ValueError(f"{path}: LoRA base {base_path} has weights hash {actual}, but the adapters were trained on "
                         f"weights with hash {expected}: not the same base model (changed, or another file)")
    adapters = set(adapter_keys(model))
    state = {k: v for k, v in model.state_dict().items() if k not in adapters}
    state.update(checkpoint["state_dict"])
    return state, {"path": str(base_path), "hash": expected}


def _find_base(recorded: Optional[str], checkpoint: Any, base: Optional[str | os.PathLike]) -> str:
    """Where a LoRA checkpoint's base is: `base` if given, else the recorded path, else its name beside the
    checkpoint (the two moved together)."""
    if base is not None:
        if not Path(base).exists():
            raise FileNotFoundError(f"LoRA base {base} not found")
        return os.fspath(base)
    if recorded and Path(recorded).exists():
        return recorded
    beside = Path(checkpoint).parent / Path(recorded).name if _is_local(checkpoint) and recorded else None
    if beside is not None and beside.exists() and beside.resolve() != Path(checkpoint).resolve():  # not itself
        return str(beside)
    raise FileNotFoundError(f"{checkpoint} holds LoRA adapters whose base {recorded} is not found (nor beside it): "
                            "the adapters need the base weights they were trained on (merge-lora --base PATH names "
                            "its new place)")


def load_datamodule(path: str | os.PathLike, datamodule_class: Optional[type] = None, **overrides: Any):
    """The data module a checkpoint was trained with (what ``XLabDataModule.load_from_checkpoint`` returns).

    Its ``tokenizer_path`` is resolved as ``load_checkpoint`` resolves it (relative paths also from the
    checkpoint's directory), and its tokenizer must match the recorded content hash: checked now if the file
    exists, else when the tokenizer is trained or downloaded. Keywords override the recorded settings.
    """
    from xlabml.datamodules import XLabDataModule

    checkpoint = read_checkpoint(path)
    data = data_hparams(checkpoint)
    if not data:
        raise ValueError(f"{path} records no data module settings (it was not written by xlab fit or an export "
                         "of such a checkpoint)")
    resolved = resolve_tokenizer_path(data, path)
    if data.get("tokenizer_path") and resolved:
        data["tokenizer_path"] = resolved
    datamodule = (datamodule_class or XLabDataModule)(**{**data, **overrides})
    recorded = tokenizer_state(checkpoint)
    if recorded:
        datamodule.load_state_dict(recorded)
    else:
        warn(f"checkpoint {path} records no tokenizer hash (written by an older xlabml): its tokenizer "
             f"{datamodule.tokenizer_path} cannot be checked")
    return datamodule


def _build_hparams(recorded: dict[str, Any], overrides: dict[str, Any], model_class: type,
                   path: Path) -> dict[str, Any]:
    """The constructor arguments: recorded ones, then overrides; flash falls back to SDPA where it is missing."""
    parameters = dict(inspect.signature(model_class.__init__).parameters)
    parameters.pop("self", None)
    accepted = set(parameters)
    required = {name for name, p in parameters.items() if p.default is p.empty and p.kind is not p.VAR_KEYWORD}
    unknown, missing = sorted(set(recorded) - accepted), sorted(required - set(recorded))
    if unknown or missing:
        problem = f"hyperparameters {unknown} are not arguments of it" if unknown else f"it lacks {missing}"
        raise ValueError(f"{path} is not a checkpoint of {model_class.__name__}: {problem} (a different model, "
                         "or a newer xlabml?)")
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"unknown overrides {unknown}: expected arguments of {model_class.__name__}, e.g. "
                         f"{list(RUNTIME_HPARAMS)}")
    hparams = {**recorded, **overrides}
    if (recorded.get("attention") == "linear") != (hparams.get("attention") == "linear"):
        raise ValueError(f"{path} was trained with attention={recorded.get('attention')!r}: "
                         f"attention={hparams.get('attention')!r} is another layer, not a kernel of it")
    if hparams.get("attention") == "flash" and "attention" not in overrides and not _flash_attn_available():
        warn(f"{path} was trained with attention='flash' but the flash_attn package is not installed here: "
             "using attention='sdpa' (the same function)")
        hparams["attention"] = "sdpa"
    return hparams


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _load_tokenizer(tokenizer):
    from xlabml.tokenizer import Tokenizer

    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)


def _target_device(map_location: Any, saved: str) -> torch.device:
    """Where the model goes: Lightning's rule for ``load_from_checkpoint`` (tensors are read on the CPU)."""
    if map_location is None:
        device = torch.device(saved)
        backend = getattr(torch, device.type, None)
        available = device.type == "cpu" or bool(getattr(backend, "is_available", lambda: False)())
        return device if available else torch.device("cpu")
    if isinstance(map_location, dict):
        return torch.device(map_location.get(saved, saved))
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        moved = map_location(torch.UntypedStorage(0), saved)
        return torch.device(saved) if moved is None else moved.device
    return torch.device(map_location)


def _format(path, checkpoint: dict[str, Any]) -> str:
    if _is_local(path) and Path(path).suffix == ".safetensors":
        return "safetensors"
    return "export" if "xlab_export" in checkpoint else "training"


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# exports


def slim_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """An export's content: weights, model and data settings, tokenizer identity, metrics; no optimizer state."""
    slim = {key: checkpoint[key] for key in EXPORT_KEYS if key in checkpoint}
    recorded = tokenizer_state(checkpoint)
    if recorded:
        slim[DATA_STATE_KEY] = recorded
    metrics = checkpoint_metrics(checkpoint)
    if metrics:
        slim["metrics"] = metrics
    # Detached contiguous copies: no views into the optimizer's or other tensors' storage get saved along.
    state_dict, seen = {}, {}
    for name, tensor in checkpoint["state_dict"].items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:  # tied weights stay tied
            state_dict[name] = state_dict[seen[key]]
        else:
            seen[key] = name
            state_dict[name] = tensor.detach().contiguous().clone()
    slim["state_dict"] = state_dict
    slim["xlab_export"] = EXPORT_VERSION
    return slim


def _serialize_ckpt(slim: dict[str, Any]) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    return {".ckpt": buffer.getvalue()}


def _serialize_safetensors(slim: dict[str, Any]) -> dict[str, bytes]:
    from safetensors.torch import save

    tensors, aliases, seen = {}, {}, {}
    for name, tensor in slim["state_dict"].items():
        if id(tensor) in seen:  # safetensors refuses shared storage: store once, record the alias
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            tensors[name] = tensor
    meta = {key: value for key, value in slim.items() if key != "state_dict"}
    meta["aliases"] = aliases
    data = save(tensors, metadata={"format": "pt", "xlab_export": str(EXPORT_VERSION)})
    sidecar = json.dumps(meta, indent=2, sort_keys=True, default=str).encode() + b"\n"
    return {".json": sidecar, ".safetensors": data}  # the sidecar first: a main file implies a complete export


EXPORT_FORMATS = {"ckpt": _serialize_ckpt, "safetensors": _serialize_safetensors}


def export_checkpoint(
    ckpt_path: str | os.PathLike, output_dir: str | os.PathLike = "exports", format: str = "ckpt",
    quantize: Optional[str] = None, group_size: Optional[int] = None,
) -> tuple[Path, bool]:
    """Export a training checkpoint; returns (path of the main file, whether it was written now).

    The name is ``<checkpoint stem>-<first 8 hex digits of the main file's sha256>.<ext>`` (with ``-<scheme>``
    before the digits when quantized); if that file already exists it holds the same content and nothing is
    written. Each file is written atomically and never overwrites. The recorded tokenizer hash is kept; the
    tokenizer the checkpoint names, where it exists, must match it. With `quantize` (``'int8'`` or ``'int4'``,
    `group_size` for int4; see ``xlabml.quantize``) the export stores the quantized weights and their scales and
    records the scheme, so that ``load_checkpoint`` rebuilds the quantized model.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {sorted(EXPORT_FORMATS)}")
    checkpoint = read_checkpoint(ckpt_path)
    if quantize is not None:
        checkpoint = _quantized(checkpoint, ckpt_path, quantize, group_size)
    model_hparams(checkpoint, ckpt_path)  # an export must be loadable
    recorded = tokenizer_state(checkpoint)
    tokenizer_path = resolve_tokenizer_path(data_hparams(checkpoint), ckpt_path)
    if tokenizer_path and Path(tokenizer_path).is_file():
        check_tokenizer(_load_tokenizer(tokenizer_path), recorded.get("tokenizer_hash"),
                        recorded.get("tokenizer_path"), ckpt_path)
    elif not recorded:
        warn(f"checkpoint {ckpt_path} records no tokenizer hash (written by an older xlabml): neither does "
             "its export")
    files = EXPORT_FORMATS[format](slim_checkpoint(checkpoint))
    main_ext = "." + format
    digest = hashlib.sha256(files[main_ext]).hexdigest()[:EXPORT_HASH_CHARS]
    scheme = f"-{quantize}" if quantize is not None else ""
    stem = f"{Path(ckpt_path).stem}{scheme}-{digest}"
    targets = {ext: Path(output_dir) / f"{stem}{ext}" for ext in files}
    existing = [ext for ext, target in targets.items() if target.exists()]
    for ext in existing:
        if targets[ext].read_bytes() != files[ext]:
            raise FileExistsError(f"{targets[ext]} exists with different content; refusing to overwrite it")
    if len(existing) == len(targets):
        return targets[main_ext], False
    for ext, data in files.items():
        if ext not in existing:
            write_atomic(targets[ext], data)
    return targets[main_ext], True


def _quantized(checkpoint: dict[str, Any], path, scheme: str, group_size: Optional[int]) -> dict[str, Any]:
    """The checkpoint with its model's weights quantized (``xlabml.quantize``) and the scheme recorded."""
    if checkpoint.get(QUANTIZATION_KEY):
        raise ValueError(f"{path} holds weights quantized already ({checkpoint[QUANTIZATION_KEY]}); export its "
                         "float checkpoint instead")
    if checkpoint.get(LORA_KEY):
        raise ValueError(f"{path} holds LoRA adapters; merge them first (./manage.py merge-lora), then export the "
                         "merged model quantized")
    from xlabml.quantize import quantize

    spec = {"scheme": scheme, **({"group_size": group_size} if group_size is not None else {})}
    model = load_checkpoint(path, "cpu", overrides={"compile": False}, tokenizer=False).model
    quantize(model, **spec)  # an unknown scheme or group size: its own one-line error
    return {**checkpoint, "state_dict": model.state_dict(), QUANTIZATION_KEY: spec}


def merge_lora_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike,
                          base: Optional[str | os.PathLike] = None) -> Path:
    """Write the model of a LoRA checkpoint with its adapters merged into the base weights, as a plain export.

    Args:
        ckpt_path: a checkpoint (or export) of a LoRA run.
        out: the file to write: ``NAME.ckpt``, or ``NAME.safetensors`` (with ``NAME.json`` beside it). Written
            atomically; never overwritten.
        base: where the base model is now, if it moved (see ``load_checkpoint``).
    Returns: ``out``. The export loads like any other (``load_checkpoint``, ``infer.py``, ``--model.init_from``),
    without the base file; it records the adapters' checkpoint and base under ``MERGED_KEY``.
    Raises:
        FileExistsError: `out` (or its JSON) exists. ValueError: an unknown suffix, a checkpoint without adapters,
        or a base that is missing or changed (see ``lora_state_dict``).
    """
    out = Path(out)
    format = out.suffix.lstrip(".")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"merge-lora output {out}: expected a .ckpt or .safetensors file name")
    for target in (out, out.with_suffix(".json")) if format == "safetensors" else (out,):
        if target.exists():
            raise FileExistsError(f"{target} already exists; refusing to overwrite it")
    checkpoint = read_checkpoint(ckpt_path)
    if not checkpoint.get(LORA_KEY):
        raise ValueError(f"{ckpt_path} holds no LoRA adapters (its run had no model.lora): nothing to merge; "
                         "export-checkpoint writes its weights")
    recorded = tokenizer_state(checkpoint)
    tokenizer_path = resolve_tokenizer_path(data_hparams(checkpoint), ckpt_path)
    if tokenizer_path and Path(tokenizer_path).is_file():
        check_tokenizer(_load_tokenizer(tokenizer_path), recorded.get("tokenizer_hash"),
                        recorded.get("tokenizer_path"), ckpt_path)
    loaded = load_checkpoint(ckpt_path, "cpu", overrides={"compile": False}, tokenizer=False, base=base,
                             merge_lora=True)
    merged = {key: value for key, value in checkpoint.items() if key not in ("state_dict", LORA_KEY)}
    merged["state_dict"] = loaded.model.state_dict()
    merged["hyper_parameters"] = {**dict(checkpoint["hyper_parameters"]), "lora": None}
    merged[MERGED_KEY] = {"adapters": str(ckpt_path), "base": loaded.lora_base["path"],
                          "base_hash": loaded.lora_base["hash"]}
    files = EXPORT_FORMATS[format](slim_checkpoint(merged))
    for ext, data in files.items():  # the sidecar first: a main file implies a complete export
        write_atomic(out.with_suffix(ext), data)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Lightning's checkpoints


class XLabCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes atomically and reads through ``read_checkpoint``.

    Lightning's default serializes the whole checkpoint into memory, writes it to the system's temporary
    directory and moves it into place, which is a copy onto the final name when that directory is on another
    file system (a kill or a full disk then truncates ``last.ckpt``). This one streams ``torch.save`` into a
    temporary file beside the target and renames it (``xlabml.atomic``): a save that fails at any point leaves
    the previous file as it was. ``xlab`` installs it in every trainer unless the configuration names another
    ``CheckpointIO``; with a plain ``Trainer``, pass ``plugins=[XLabCheckpointIO()]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        with atomic_path(path, overwrite=True) as tmp:  # Lightning rewrites last.ckpt: replacing is expected
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location,
                               weights_only=True if weights_only is None else weights_only)


def with_atomic_checkpoints(plugins: Any, strategy: Any = None) -> list:
    """``plugins`` (a Trainer argument: None, one plugin or a list) with ``XLabCheckpointIO`` added, unless a
    CheckpointIO is configured already (in the plugins or on a strategy object); an ``AsyncCheckpointIO``
    without its own base I/O gets ``XLabCheckpointIO`` as its base."""
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    configured = [p for p in plugins if isinstance(p, CheckpointIO)]
    if not configured:
        return [*plugins, XLabCheckpointIO()]
    for plugin in configured:
        if isinstance(plugin, _WrappingCheckpointIO) and plugin.checkpoint_io is None:
            plugin.checkpoint_io = XLabCheckpointIO()
    return plugins

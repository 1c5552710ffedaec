"""Warm starts: copy some or all weights of another model into a freshly built one.

``load_initial_weights(model, path, only=None)`` reads an XLab checkpoint (training checkpoint or export, a LoRA
checkpoint merged with its base) or a local Hugging Face Llama/GPT-2 directory (converted as ``./manage.py
import-hf`` would, nothing written) and copies the selected weights into ``model`` (an ``XLabModel``) in place.
``only`` selects by role or by name prefix:

    embedding     the token embedding table (a tied head shares it)
    head          the output head (weight and bias)
    position      learned position embeddings
    final_norm    the norm before the head
    blocks        every block; ``blocks.0``, ``blocks.3.attn``, ... any prefix of the decoder's parameter names

so LSWT's warm start of the embeddings from another model is ``only: [embedding]``. The data's tokenizer must be
the source's when the embedding or the head is copied (``token_indexed``), not otherwise. Every selected tensor must
exist in the source with the same shape, or nothing is copied and one line names the first mismatch. Adapters a
transformation added (``xlabml.lora``) are not weights of the source: they are never selected.

``XLabModel(init_from=...)`` (``model.init_from`` in YAML) takes a path or ``{path: ..., only: [...]}``
(``parse_init_from``); ``read_source`` gives a source's weights together with its architecture and the identity
of its tokenizer, which ``xlab fit`` checks against the configuration and the data.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypedDict

import torch
from torch import nn


class InitFrom(TypedDict, total=False):
    """``model.init_from`` as a mapping: the source (``path``, required) and, for a partial warm start, the weights
    to copy (``only``)."""

    path: str
    only: Optional[list[str]]


ROLES = {"embedding": "embedding.", "head": "head.", "position": "position.", "final_norm": "norm.",
         "blocks": "blocks."}


def parse_init_from(value: Any) -> Optional[tuple[str, Optional[list[str]]]]:
    """``(path, only)`` of a ``model.init_from`` value (a path, or ``{path: ..., only: [...]}``); None for None.

    Raises ValueError (one line) for anything else: another type, unknown keys, no path, an empty ``only``."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path, only = os.fspath(value), None
    elif isinstance(value, Mapping) and "path" in value and not set(value) - {"path", "only"}:
        path, only = value["path"], value.get("only")
    else:
        raise ValueError(f"model.init_from must be a path or {{path: PATH, only: [ROLE, ...]}}, got {value!r}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"model.init_from: path must be a checkpoint file or a Hugging Face directory, got {path!r}")
    if only is not None:
        only = [only] if isinstance(only, str) else only
        if not isinstance(only, (list, tuple)) or not only:
            raise ValueError(f"model.init_from.only must be a non-empty list of roles ({', '.join(ROLES)}) or "
                             f"parameter name prefixes, got {only!r}")
        _prefixes(only)  # each one a role or a prefix
        only = list(only)
    return os.fspath(path), only


@dataclass
class InitSource:
    """What ``read_source`` found at a warm start's path.

    Attributes:
        path: as given.
        kind: ``"xlab"`` (a checkpoint or export) or ``"hf"`` (a Hugging Face directory).
        hparams: the source's model arguments (``XLabModel`` keywords; for a Hugging Face model the ``Decoder``
            arguments its config translates to).
        tokenizer: ``{"tokenizer_hash", "tokenizer_path"}`` of the tokenizer its weights were trained with; empty
            when it records none (a Hugging Face model, an import without an XLab tokenizer, an old checkpoint).
        notes: what a Hugging Face model's conversion approximated (e.g. another norm epsilon).
        weights: the decoder's weights (names without ``model.``), None when not asked for.
    """

    path: str
    kind: str
    hparams: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weights: Optional[dict[str, torch.Tensor]] = None


def read_source(path: str | os.PathLike, weights: bool = True) -> InitSource:
    """The architecture, tokenizer identity and (with ``weights``) the decoder weights stored at ``path``: an XLab
    checkpoint or export (a LoRA checkpoint: its adapters merged into its base), or a Hugging Face directory.

    Raises:
        FileNotFoundError: nothing at ``path`` (or, for a LoRA checkpoint, at its base's path).
        ValueError: not a checkpoint XLab can read (one line naming it).
    """
    from xlabml.checkpoints import LORA_KEY, load_checkpoint, model_hparams, read_checkpoint, tokenizer_state

    if Path(path).is_dir():
        from xlabml.interop.hf import read_hf_model

        arch, state, info = read_hf_model(path, approximate=True)  # the weights' meaning, not their exact numerics
        return InitSource(os.fspath(path), "hf", arch, {}, list(info["approximations"]), state if weights else None)
    if not Path(path).exists():
        raise FileNotFoundError(f"init_from: {path} not found (expected an XLab checkpoint or a Hugging Face "
                                "model directory)")
    checkpoint = read_checkpoint(path)
    hparams = model_hparams(checkpoint, path)
    state = None
    if weights and checkpoint.get(LORA_KEY):  # adapters: the weights are the base with the adapters merged in
        model = load_checkpoint(path, "cpu", overrides={"compile": False}, tokenizer=False, merge_lora=True).model
        state = model.model.state_dict()
    elif weights:
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    return InitSource(os.fspath(path), "xlab", hparams, tokenizer_state(checkpoint), [], state)


def _prefixes(only) -> list[str]:
    if only is None:
        return [""]
    if isinstance(only, str):
        only = [only]
    prefixes = []
    for name in only:
        if not isinstance(name, str) or not name:
            raise ValueError(f"init_from.only: {name!r} is not a role or a parameter name prefix; roles: "
                             f"{', '.join(ROLES)}")
        prefixes.append(ROLES.get(name, name if name.endswith(".") else name + "."))
    return prefixes


def token_indexed(only) -> bool:
    """Whether a warm start selecting ``only`` copies weights indexed by token id (the embedding or the head, all
    weights included): then the data's tokenizer must be the one the source was trained with. Blocks, norms and
    positions mean the same under any tokenizer."""
    return any(p == "" or p.startswith(("embedding.", "head.")) for p in _prefixes(only))


def load_initial_weights(model: nn.Module, path: str | os.PathLike, only=None) -> list[str]:
    """Copy the weights of ``path`` selected by ``only`` (roles or name prefixes; None: all) into ``model`` (an
    ``XLabModel``, or a ``Decoder``). Returns the names copied (decoder names, e.g. ``embedding.weight``).

    Raises ValueError naming the first selected tensor missing from ``path`` or of another shape, and a selection
    that matches nothing; the model is unchanged then."""
    return copy_weights(model, read_source(path), only)


def copy_weights(model: nn.Module, source: InitSource, only=None) -> list[str]:
    """``load_initial_weights`` from a source already read (``read_source(path)``, with its weights)."""
    from xlabml.lora import adapter_keys

    decoder = getattr(model, "model", model)
    adapters = set(adapter_keys(decoder))
    target = {k: v for k, v in decoder.state_dict().items() if k not in adapters}
    prefixes = _prefixes(only)
    selected = [k for k in target if any(k.startswith(p) or k == p.rstrip(".") for p in prefixes)]
    if not selected:
        raise ValueError(f"init_from.only={only!r} selects no weight of the model; roles: {', '.join(ROLES)}, or a "
                         f"prefix of: {', '.join(sorted({k.split('.')[0] for k in target}))}")
    path, weights = source.path, source.weights
    for key in selected:
        if key not in weights:
            raise ValueError(f"init_from: {path} has no {key!r} (the model needs it; select less with only=...)")
        if tuple(weights[key].shape) != tuple(target[key].shape):
            raise ValueError(f"init_from: {key} has shape {tuple(weights[key].shape)} in {path} but "
                             f"{tuple(target[key].shape)} in the model")
    with torch.no_grad():
        for key in selected:
            target[key].copy_(weights[key].to(target[key].dtype))
    return selected

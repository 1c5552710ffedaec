"""Warm starts: copy some or all weights of another model into a freshly built one.

``load_initial_weights(model, path, only=None)`` reads an XLab checkpoint (training checkpoint or export) or a
local Hugging Face Llama/GPT-2 directory (converted as ``./manage.py import-hf`` would, nothing written) and copies
the selected weights into ``model`` (an ``XLabModel``) in place. ``only`` selects by role or by name prefix:

    embedding     the token embedding table (a tied head shares it)
    head          the output head (weight and bias)
    position      learned position embeddings
    final_norm    the norm before the head
    blocks        every block; ``blocks.0``, ``blocks.3.attn``, ... any prefix of the decoder's parameter names

so LSWT's warm start of the embeddings from another model is ``only: [embedding]``. Every selected tensor must
exist in the source with the same shape, or nothing is copied and one line names the first mismatch; except that
the model's vocabulary may be larger than the source's by exactly the chat tokens (``xlabml.chat.add_chat_tokens``
appends them to a tokenizer trained before they were reserved): the embedding and head rows of the ids they share
are copied, and each new row starts at the mean of the source's rows (an average token, whose logit starts
ordinary rather than arbitrary). Any other difference in vocabulary size is a mismatched tokenizer: an error.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

ROLES = {"embedding": "embedding.", "head": "head.", "position": "position.", "final_norm": "norm.",
         "blocks": "blocks."}
VOCABULARY_ROWS = ("embedding.weight", "head.weight", "head.bias")  # dim 0 indexed by token id


def _source_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The decoder weights (names without the ``model.`` prefix) stored at ``path``."""
    path = Path(path)
    if path.is_dir():
        from xlabml.interop.hf import read_hf_model

        _, weights, _ = read_hf_model(path, approximate=True)  # weights only: the architecture is the model's own
        return weights
    if not path.exists():
        raise FileNotFoundError(f"init_from: {path} not found (expected an XLab checkpoint or a Hugging Face "
                                "model directory)")
    from xlabml.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}


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


def load_initial_weights(model: nn.Module, path: str | os.PathLike, only=None) -> list[str]:
    """Copy the weights of ``path`` selected by ``only`` (roles or name prefixes; None: all) into ``model`` (an
    ``XLabModel``, or a ``Decoder``). Returns the names copied (decoder names, e.g. ``embedding.weight``).

    Raises ValueError naming the first selected tensor missing from ``path`` or of another shape, and a selection
    that matches nothing; the model is unchanged then."""
    decoder = getattr(model, "model", model)
    target = decoder.state_dict()
    prefixes = _prefixes(only)
    selected = [k for k in target if any(k.startswith(p) or k == p.rstrip(".") for p in prefixes)]
    if not selected:
        raise ValueError(f"init_from.only={only!r} selects no weight of the model; roles: {', '.join(ROLES)}, or a "
                         f"prefix of: {', '.join(sorted({k.split('.')[0] for k in target}))}")
    source = _source_state_dict(path)
    for key in selected:
        if key not in source:
            raise ValueError(f"init_from: {path} has no {key!r} (the model needs it; select less with only=...)")
        if tuple(source[key].shape) != tuple(target[key].shape) and not _grows_vocabulary(key, source[key],
                                                                                             target[key]):
            raise ValueError(f"init_from: {key} has shape {tuple(source[key].shape)} in {path} but "
                             f"{tuple(target[key].shape)} in the model")
    with torch.no_grad():
        for key in selected:
            weights = source[key].to(target[key].dtype)
            rows = weights.shape[0] if weights.dim() else 0
            if weights.dim() and rows < target[key].shape[0]:  # a larger vocabulary: new rows at the mean
                target[key][rows:].copy_(weights.float().mean(dim=0).to(weights.dtype))
                target[key][:rows].copy_(weights)
            else:
                target[key].copy_(weights)
    return selected


def _grows_vocabulary(key: str, source: torch.Tensor, target: torch.Tensor) -> bool:
    from xlabml.tokenizer import CHAT_TOKENS

    return (key in VOCABULARY_ROWS and source.dim() == target.dim() >= 1 and source.shape[1:] == target.shape[1:]
            and source.shape[0] + len(CHAT_TOKENS) == target.shape[0])

"""The role of each parameter of a model, read from the module that holds it and the parameter's name.

Optimizer choices that depend on what a parameter *is* (weight decay on matrices only, Muon for hidden
matrices and AdamW for the rest, LoRA targets) are made by role, never by shape: FSDP flattens every
parameter into a 1-D shard before Lightning builds the optimizer, so ``p.dim() >= 2`` is false for all of them
there. Roles are the same whether the model is wrapped (FSDP, activation checkpointing, ``torch.compile``)
or not.

Roles (``ROLES``):

=============  =====================================================================================
``matrix``     weight of a hidden linear layer: attention ``qkv``/``proj``, feed-forward ``fc``/``proj``
``embedding``  token embedding table (a head tied to it is the same tensor: it counts once, here)
``position``   learned position table (``position='learned'``)
``head``       weight of an untied output head
``norm``       gain of a LayerNorm/RMSNorm (final, per block, QK-norm)
``bias``       any parameter named ``bias`` (linear layers, LayerNorms)
``other``      a parameter of a module type not listed here (e.g. a user's own layer)
=============  =====================================================================================
"""
from __future__ import annotations

import torch.nn as nn

from xlabml.layers import Decoder, Position

ROLES = ('matrix', 'embedding', 'position', 'head', 'norm', 'bias', 'other')
# path components that wrappers insert between a module and its parent: FSDP1, activation checkpointing
# (torch's checkpoint_wrapper, which Lightning's FSDP strategy applies) and torch.compile of a whole module
WRAPPER_NAMES = frozenset({'_fsdp_wrapped_module', '_checkpoint_wrapped_module', '_orig_mod'})
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


def unwrapped_name(name: str) -> str:
    """``name`` without the path components wrappers insert, e.g.
    ``model.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.qkv.weight`` ->
    ``model.blocks.0.attn.qkv.weight``: the name the parameter has in the plain model."""
    return '.'.join(part for part in name.split('.') if part not in WRAPPER_NAMES)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """The role (one of ``ROLES``) of every distinct parameter of ``model``.

    Args:
        model: any module containing XLab parts (a ``Decoder``, an ``XLabModel``, either wrapped by FSDP,
            activation checkpointing or ``torch.compile``), or any other module (its layers are classified by
            type alone).
    Returns:
        ``{name: role}`` with the names of ``model.named_parameters()`` as ``unwrapped_name`` gives them, in
        that order; a shared (tied) parameter appears once, under its first name (``embedding.weight``).
    """
    special = {}  # id(parameter) -> role decided by the parameter's place in a Decoder
    for module in model.modules():
        if isinstance(module, Position):
            for p in module.parameters():
                special.setdefault(id(p), 'position')
    for module in model.modules():
        if isinstance(module, Decoder):
            special.setdefault(id(module.embedding.weight), 'embedding')  # first: a tied head stays 'embedding'
            special.setdefault(id(module.head.weight), 'head')
    owner = {}  # id(parameter) -> (module, attribute name) of its first occurrence
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, name))
    roles = {}
    for name, p in model.named_parameters():
        module, attribute = owner[id(p)]
        roles[unwrapped_name(name)] = special.get(id(p)) or _role_by_type(module, attribute)
    return roles


def fused_rows(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weights of ``model`` that hold several matrices stacked by rows, one ``nn.Linear`` computing them
    together (attention's query, key and value projections in ``qkv``; SwiGLU's gate and up projections in
    ``fc``): ``{name: row counts}``, names as in ``parameter_roles``. A module declares its own in a
    ``fused_rows`` attribute (``{linear's attribute name: row counts}``); Muon can then orthogonalise each matrix
    apart (``xlabml.optim.MuonAdamW(split_fused=True)``), as if they were separate layers."""
    out = {}
    for prefix, module in model.named_modules():
        for attribute, rows in getattr(module, 'fused_rows', {}).items():
            linear = getattr(module, attribute, None)
            weight = getattr(linear, 'weight', None)
            if weight is None or len(rows) < 2:
                continue
            if weight.dim() == 2 and sum(rows) != weight.shape[0]:  # (FSDP: a 1-D shard, checked unsharded)
                raise ValueError(f"{prefix}.{attribute}: fused_rows {rows} do not add up to the weight's "
                                 f"{weight.shape[0]} rows")
            out[unwrapped_name(f"{prefix}.{attribute}.weight" if prefix else f"{attribute}.weight")] = tuple(rows)
    return out


def _role_by_type(module: nn.Module, name: str) -> str:
    if name == 'bias':
        return 'bias'
    if isinstance(module, nn.Linear):
        return 'matrix'
    if isinstance(module, NORM_TYPES):
        return 'norm'
    if isinstance(module, nn.Embedding):
        return 'embedding'
    return 'other'

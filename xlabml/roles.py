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

"""LoRA: low-rank adapters on the linear layers of a built model, as a transformation (Hu et al. 2021).

``apply_lora(model, rank, alpha, dropout, targets)`` wraps every targeted ``nn.Linear`` inside `model` in a
``LoRALinear`` and freezes every other parameter of `model`::

    y = base(x) + (alpha / rank) * B A dropout(x)        A: (rank, in), B: (out, rank)

``A`` starts as ``nn.Linear`` initialises a weight (Kaiming-uniform), ``B`` at zero, so the wrapped model computes
exactly what the base computes until ``B`` moves. Only ``A`` and ``B`` train. ``merge_lora(model)`` folds each
adapter into its base weight (``W + (alpha / rank) B A``) and puts a plain ``nn.Linear`` back.

Targets name linear layers by the end of their path in the decoder (``blocks.N.`` left out)::

    attn.qkv    attention's fused query/key/value projection
    attn.proj   attention's output projection
    ffn.fc      feed-forward input (SwiGLU: gate and up, one fused matrix)
    ffn.proj    feed-forward output
    head        the output head (not with tie_embeddings: a merged head would no longer be the embedding); the
                loss then computes the batch's logits at once (its chunked form needs a plain linear head)

A shorter end selects more (``proj``: both projections; ``qkv``: ``attn.qkv``), a longer one less
(``blocks.0.attn.qkv``: the first layer only). A target that selects no linear layer is an error listing those
that exist.

Why a wrapper module, not a parametrization of the weight: dropout acts on the adapter's *input*, which a
function of the weight cannot express; the adapter path costs ``rank * (in + out)`` per token instead of forming
``W + BA`` (``in * out``) at every forward; and the base stays a plain ``nn.Linear`` that other transformations
recognise. CPU packing (``xlabml.packed``) and weight quantization swap only modules whose type is exactly
``nn.Linear``: applied after ``apply_lora`` they swap the wrapper's inner base (packed or quantized), while the
adapters' small matrices stay on ``F.linear`` and the activation of a wrapped ``ffn.fc`` is not fused into the
base's matmul (it must follow the adapter's sum). Undo them in reverse order before ``merge_lora``.

State dict: the base keeps the names of the plain linear (``blocks.0.attn.qkv.weight``: the wrapper's state-dict
hooks hide the inner module's name, as torch's activation-checkpoint wrapper does), and the adapters add
``blocks.0.attn.qkv.lora_a`` and ``.lora_b``; so a plain checkpoint's weights load into a LoRA model as they are.
A LoRA run's checkpoints hold only the adapters and a reference to the base (``xlabml.checkpoints``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, TypedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_NAMES = ("lora_a", "lora_b")
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "ffn.fc", "ffn.proj")


class LoRASettings(TypedDict, total=False):
    """``model.lora`` as configuration gives it (YAML mapping or ``--model.lora.rank 8`` ...); keys left out take
    ``LoRAConfig``'s defaults."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]


@dataclass(frozen=True)
class LoRAConfig:
    """Settings of the adapters.

    Attributes:
        rank: inner dimension r of each adapter (``A``: r x in, ``B``: out x r).
        alpha: the update is scaled by ``alpha / rank`` (so changing the rank keeps the step size comparable).
        dropout: dropout probability on each adapter's input (training only).
        targets: the linear layers to adapt (see the module's docstring).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
                0.0 <= self.dropout < 1.0):
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = [self.targets] if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (list, tuple)) or not targets or not all(
                isinstance(t, str) and t.strip(".") for t in targets):
            raise ValueError(f"lora.targets must be a non-empty list of linear layer names such as "
                             f"{list(DEFAULT_TARGETS)}, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(t.strip(".") for t in targets))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | "LoRAConfig") -> "LoRAConfig":
        """The config of a ``model.lora`` mapping (missing keys: the defaults); unknown keys are an error."""
        if isinstance(settings, cls):
            return settings
        if not isinstance(settings, Mapping):
            raise ValueError(f"model.lora must be a mapping such as {{rank: 8, alpha: 16, dropout: 0.05, targets: "
                             f"{list(DEFAULT_TARGETS)}}}, got {settings!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"model.lora: unknown keys {unknown}; expected {sorted(known)}")
        return cls(**settings)

    def settings(self) -> dict[str, Any]:
        """A plain mapping (what a checkpoint records in its hyperparameters)."""
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update: ``base(x) + scaling * F.linear(F.linear(dropout(x), A), B)``.

    Args:
        base: the ``nn.Linear`` to adapt (kept as the child ``base``; its parameters are not touched).
        rank, alpha, dropout: see ``LoRAConfig``.
    Shapes: x (..., in) -> (..., out). ``weight``, ``bias``, ``in_features`` and ``out_features`` are the base's, so
    code that reads a linear layer's weight (its device or dtype, e.g. ``Decoder.init_cache``) keeps working.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.base = base
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # the base's entries keep the plain linear's names (see the module's docstring)
        self.register_state_dict_post_hook(_hide_base_name)
        self.register_load_state_dict_pre_hook(_restore_base_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x):  # ... in -> ... out
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # ... r -> ... out
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` (out, in), computed in float32 and cast to the base weight's dtype."""
        delta = (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scaling
        return delta.to(self.base.weight.dtype)

    def merged(self) -> nn.Linear:
        """The base linear with the update folded into its weight (a new module; this one is unchanged)."""
        if type(self.base) is not nn.Linear:
            raise TypeError(f"cannot merge a LoRA adapter into a {type(self.base).__name__}: undo the "
                            "transformations applied after apply_lora (packing, quantization) first")
        base = self.base
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(base.weight.detach() + self.delta_weight())
            if base.bias is not None:
                linear.bias.copy_(base.bias.detach())
        linear.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            linear.bias.requires_grad_(base.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _hide_base_name(module, state_dict, prefix, local_metadata):
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _restore_base_name(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest not in ADAPTER_NAMES and not rest.startswith("base."):
            state_dict[prefix + "base." + rest] = state_dict.pop(key)


# ---------------------------------------------------------------------------------------------------------------
# the transformation


def linear_names(model: nn.Module) -> list[str]:
    """The target names of the linear layers in `model`: their paths without the ``blocks.N.`` part (and without an
    ``XLabModel``'s ``model.``), each once, in order: ``['attn.qkv', 'attn.proj', 'ffn.fc', 'ffn.proj', 'head']``."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            short = _short_name(path)
            if short not in names:
                names.append(short)
    return names


def _short_name(path: str) -> str:
    parts = path.split(".")
    if "blocks" in parts:
        i = parts.index("blocks")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[i + 2:])
    return path.removeprefix("model.")


def _selected(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> list[str]:
    """Wrap the targeted linear layers of `model` in ``LoRALinear`` adapters and freeze every other parameter.

    Args:
        model: a ``Decoder``, an ``XLabModel``, or any module with linear layers.
        rank, alpha, dropout, targets: see ``LoRAConfig`` (``targets``: names as in the module's docstring).
    Returns: the paths of the wrapped layers, e.g. ``['blocks.0.attn.qkv', ...]``.
    Raises:
        ValueError: a bad setting, a target selecting no linear layer (the message lists those that exist), a
            model that has adapters already, or the head of a model whose head is tied to its embedding.
    """
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has LoRA adapters already; merge_lora it first to add new ones")
    linears = {path: m for path, m in model.named_modules() if type(m) is nn.Linear}
    chosen = []
    for target in config.targets:
        matched = [path for path in linears if _selected(path, target)]
        if not matched:
            other = [path for path, m in model.named_modules() if path and _selected(path, target)]
            what = f"names {type(model.get_submodule(other[0])).__name__} modules, not linear layers" if other \
                else "selects no linear layer"
            raise ValueError(f"lora target {target!r} {what}; the linear layers are: "
                             f"{', '.join(linear_names(model))}")
        chosen += [path for path in matched if path not in chosen]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for path in chosen:
        if id(linears[path].weight) in embeddings:
            raise ValueError(f"lora target {path} shares its weight with the token embedding (tie_embeddings): "
                             "a merged adapter would change the embedding too; leave it out of lora.targets")
    model.requires_grad_(False)
    for path in sorted(chosen, key=list(linears).index):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, name, LoRALinear(linears[path], config.rank, config.alpha, config.dropout))
    return sorted(chosen, key=list(linears).index)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """``{path: LoRALinear}`` of every adapter in `model`."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of `model`'s adapters (``blocks.0.attn.qkv.lora_a``, ...)."""
    return [f"{path}.{name}" if path else name for path in lora_layers(model) for name in ADAPTER_NAMES]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that belong to adapters (what a LoRA checkpoint stores)."""
    keys = set(adapter_keys(model))
    return {k: v for k, v in model.state_dict().items() if k in keys}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the adapters: the base model's weights, under the plain model's names."""
    keys = set(adapter_keys(model))
    return {k: v for k, v in model.state_dict().items() if k not in keys}


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters of `model` that require gradients (each tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter of `model` into its base weight and put plain ``nn.Linear`` modules back, in place.
    Returns `model` (unchanged if it has no adapters). The merged weights keep the base's ``requires_grad``."""
    for path, layer in lora_layers(model).items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, layer.merged())
    return model


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits of the SHA-256 over the names, dtypes, shapes and bytes of `state_dict`'s tensors, in name
    order: the identity of a model's weights, whatever file format or device they came from."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]

"""CPU inference with weights in oneDNN's blocked layout: a transformation of a built model.

On a CPU, ``F.linear`` with a few rows (batch-1 decoding, beams, small batches) goes to a BLAS GEMV/GEMM that
streams the weight matrix far below the memory bandwidth. oneDNN's matmul on a weight reordered once into its
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the packing ``torch.compile`` applies to frozen CPU
linears) reads the same matrix 2-2.7x faster at 1 row and 3-5x faster at 4-8 rows on these machines, and
about 2x faster again for a bfloat16 matrix (``bench/generate.py`` prints the matrix-vector figures).

The model definition knows nothing of this. ``pack(model)`` swaps every plain ``nn.Linear`` inside `model`
whose weight can be packed (on a CPU, float32 or bfloat16, at least ``MIN_PACKED_NUMEL`` weights, oneDNN
present) for a ``PackedLinear`` holding the same parameters under the same names, so the state dict, in-place
updates and ``load_state_dict`` all reach the original tensors. A module that applies an activation directly
to a linear's output says so in ``fusable_activations`` (``{'fc': 'act'}``: ``act(fc(x))``); when ``act`` is
an ``nn.GELU`` or ``nn.ReLU`` and ``fc`` is packed, the activation runs inside the matmul (a oneDNN post-op)
and ``act`` is swapped for ``nn.Identity`` meanwhile. ``pack`` returns a ``Packing`` whose ``undo()`` puts
every original module back; ``prepacked(model)`` does both around a block::

    with torch.inference_mode(), packed.prepacked(model):
        logits = model(x)

``PackedLinear`` multiplies by the packed copy only where that is valid: no autograd (training through a
packed model computes ``F.linear`` on the real weight), a CPU input of the weight's dtype. The copy is made on
first use, kept across ``pack`` calls (keyed weakly by the weight tensor, so it never enters a state dict, a
deep copy or a pickle) and remade when the weight changes (its storage or version counter moves: an optimizer
step, ``load_state_dict``); ``release(model)`` frees the copies, which take as much memory as the matrices.

Composing with other transformations (LoRA adapters, quantization, ``torch.compile``): ``pack`` touches only
modules whose type is exactly ``nn.Linear``, so a quantized linear or any ``nn.Linear`` subclass is left alone,
and a wrapper such as a LoRA adapter keeps working with its inner plain linears packed. Apply such swaps
before packing and undo in the reverse order (``undo`` refuses to put a module back where another
transformation has replaced its packed stand-in). Do not pack a model for ``torch.compile``: inductor with
``freezing`` packs frozen weights itself (``xlabml.inference`` compiles the unpacked model).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_DTYPES = (torch.float32, torch.bfloat16)
# below this many weights a oneDNN call's fixed cost (~14 us here) outweighs its faster streaming: F.linear
MIN_PACKED_NUMEL = 1 << 16
_supported: bool | None = None
# weight tensor -> (key of the weight's state when packed, packed copy)
_copies = WeakIdKeyDictionary()


def supported() -> bool:
    """Whether this PyTorch build can pack linear weights for oneDNN (probed once, on a tiny matrix)."""
    global _supported
    if _supported is None:
        try:
            with torch.inference_mode():
                # fixed values: a probe must not draw from the global RNG (seeded sampling stays reproducible)
                w, x = torch.arange(32.0).view(8, 4) / 32, torch.arange(12.0).view(3, 4) / 12
                packed = torch.ops.mkldnn._reorder_linear_weight(w)
                y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                _supported = bool(torch.backends.mkldnn.is_available()) and torch.allclose(y, x @ w.T, atol=1e-5)
        except (AttributeError, RuntimeError, NotImplementedError):
            _supported = False
    return _supported


def packable(weight: torch.Tensor) -> bool:
    """Whether a linear layer with this weight is worth packing (see the module's docstring)."""
    return (weight.device.type == "cpu" and weight.dtype in _DTYPES and weight.numel() >= MIN_PACKED_NUMEL
            and supported())


def packed_weight(weight: torch.Tensor, dtype: torch.dtype):
    """The packed copy of `weight` for inputs of `dtype`, made or remade as needed; None where packing does not
    apply (another dtype, not on a CPU, no oneDNN)."""
    entry = _packed_entry(weight, dtype)
    return None if entry is None else entry[1]


def _packed_entry(weight: torch.Tensor, dtype: torch.dtype):
    """(key of the weight's state, its packed copy), or None; see ``packed_weight``."""
    if dtype != weight.dtype or weight.dtype not in _DTYPES or weight.device.type != "cpu":
        return None
    key = _key(weight)
    entry = _copies.get(weight)
    if entry is None or entry[0] != key:
        if not supported():
            return None
        with torch.no_grad():
            entry = key, torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        _copies[weight] = entry
    return entry


def _key(weight: torch.Tensor) -> tuple:
    # what changes when the weight does: its storage, or its version counter (in-place writes); a tensor made
    # under inference mode has no version counter, and can only be written in place under it again
    version = 0 if weight.is_inference() else weight._version
    return weight.data_ptr(), version, weight.dtype, tuple(weight.shape)


def _fusable(activation: nn.Module) -> tuple[str, str] | None:
    """(oneDNN post-op, its algorithm) computing `activation`, or None."""
    if type(activation) is nn.GELU and activation.approximate in ("none", "tanh"):
        return "gelu", activation.approximate
    if type(activation) is nn.ReLU:
        return "relu", ""
    return None


class PackedLinear(nn.Module):
    """Stand-in for an ``nn.Linear`` while packed: the same ``weight`` and ``bias`` parameters, ``y = act(x W^T +
    b)`` where ``act`` is the fused activation (none by default). Multiplies by the weight's packed copy where
    valid (see the module's docstring), else by the weight itself."""

    def __init__(self, linear: nn.Linear, activation: nn.Module | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        post_op = _fusable(activation) if activation is not None else None
        if activation is not None and post_op is None:
            raise ValueError(f"activation {activation!r} cannot be fused into a packed linear; expected "
                             "nn.GELU or nn.ReLU")
        self.post_op, self.algorithm = post_op or ("none", "")
        self.activation = activation  # the eager activation, for the unpacked path
        self._packed = None  # (key, packed copy): the shared entry of ``_copies``, held to skip its lookup

    def forward(self, x):
        if not torch.is_grad_enabled() and x.device.type == "cpu":
            weight, entry = self.weight, self._packed
            if entry is None or weight.dtype != x.dtype or entry[0] != _key(weight):
                entry = self._packed = _packed_entry(weight, x.dtype)
            if entry is not None:
                return torch.ops.mkldnn._linear_pointwise(x, entry[1], self.bias, self.post_op, [],
                                                          self.algorithm)
        y = F.linear(x, self.weight, self.bias)
        return y if self.activation is None else self.activation(y)

    def __getstate__(self):
        # the packed copy is an opaque oneDNN tensor that cannot be pickled or deep-copied; a copy repacks lazily
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"post_op={self.post_op}")


class Packing:
    """The swaps made by ``pack``: ``undo()`` restores the original modules (once; later calls do nothing)."""

    def __init__(self, swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]):
        self.swaps = swaps  # (parent, attribute, original module, its stand-in), in the order made

    def __len__(self) -> int:
        return sum(isinstance(new, PackedLinear) for _, _, _, new in self.swaps)

    def undo(self) -> None:
        for parent, name, _, new in self.swaps:
            if getattr(parent, name) is not new:
                raise RuntimeError(f"{type(parent).__name__}.{name} was replaced after packing; undo the "
                                   "transformations applied after pack() first (in reverse order)")
        for parent, name, old, _ in reversed(self.swaps):
            setattr(parent, name, old)
        self.swaps = []


def pack(model: nn.Module) -> Packing:
    """Swaps the packable plain ``nn.Linear`` modules inside `model` for ``PackedLinear`` stand-ins, fusing the
    activations their parents declare (see the module's docstring). Modules of any other type, and linears
    that are not worth packing, are left alone; a model with nothing to pack (on a GPU, a build without oneDNN,
    a model already packed) comes back unchanged. Returns the ``Packing`` to undo."""
    if type(model) is nn.Linear:
        raise TypeError("pack() swaps the linear layers inside a model; for a lone nn.Linear use "
                        "PackedLinear(linear)")
    swaps = []
    for parent in list(model.modules()):
        fusable = getattr(parent, "fusable_activations", {})
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or not packable(child.weight):
                continue
            act_name = fusable.get(name)
            activation = getattr(parent, act_name, None) if act_name else None
            if activation is not None and _fusable(activation) is None:
                activation = None  # e.g. SiLU, or an activation another transformation has wrapped
            stand_in = PackedLinear(child, activation)
            setattr(parent, name, stand_in)
            swaps.append((parent, name, child, stand_in))
            if activation is not None:
                identity = nn.Identity()
                setattr(parent, act_name, identity)
                swaps.append((parent, act_name, activation, identity))
    return Packing(swaps)


@contextmanager
def prepacked(model: nn.Module):
    """``pack(model)`` for the duration of the block, undone afterwards. Nests (an inner block finds nothing
    left to pack); any model may be passed."""
    packing = pack(model)
    try:
        yield model
    finally:
        packing.undo()


def release(model: nn.Module) -> None:
    """Frees the packed copies of the weights of `model`'s linear layers (they are remade on the next use)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, PackedLinear)):
            _copies.pop(m.weight, None)
        if isinstance(m, PackedLinear):
            m._packed = None

"""CPU inference with weights in oneDNN's blocked layout.

On a CPU, ``F.linear`` with a few rows (batch-1 decoding, beams, small batches) goes to a BLAS GEMV/GEMM that
streams the weight matrix far below the memory bandwidth. oneDNN's matmul on a weight reordered once into its
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the packing ``torch.compile`` applies to frozen CPU
linears) reads the same matrix 2-2.7x faster at 1 row and 3-5x faster at 4-8 rows on these machines
(``bench/generate.py`` prints the matrix-vector figures of both next to each other).

``Linear`` is an ``nn.Linear`` (same parameters, same state dict) that uses such a packed copy of its weight
inside ``prepacked(model)``, and only where it is valid: no autograd, CPU tensors of the weight's dtype
(float32 or bfloat16). The copy is made on first use and remade when the weight changes (its storage or
version counter moves: an optimizer step, ``load_state_dict``); ``release(model)`` frees the copies, which
take as much memory as the matrices themselves. Elsewhere (training, GPU, a build without oneDNN) it is
exactly ``nn.Linear``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.bfloat16)
# below this many weights a oneDNN call's fixed cost (~14 us here) outweighs its faster streaming: F.linear
MIN_PACKED_NUMEL = 1 << 16
# activations oneDNN applies to the matmul's output in the same pass: name -> (post-op, its algorithm, eager)
ACTIVATIONS = {"gelu": ("gelu", "none", F.gelu), "relu": ("relu", "", F.relu)}
_supported: bool | None = None


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


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies by a oneDNN-packed copy of its weight inside ``prepacked`` (see the
    module's docstring); ``y = act(x W^T + b)`` either way, where ``activation`` (a name in ``ACTIVATIONS``,
    default none) is fused into the packed matmul."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_packed = False  # set by prepacked()
        self._packed = None  # (key, packed weight)

    def forward(self, x, activation: str | None = None):
        if self.use_packed and not torch.is_grad_enabled() and x.device.type == "cpu":
            packed = self.packed_weight(x.dtype)
            if packed is not None:
                if activation is None:
                    return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
                op, algorithm, _ = ACTIVATIONS[activation]
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, op, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return y if activation is None else ACTIVATIONS[activation][2](y)

    def packed_weight(self, dtype: torch.dtype):
        """The packed copy of the weight for inputs of `dtype`, made or remade as needed; None where packing
        does not apply (another dtype, not on a CPU, a matrix smaller than ``MIN_PACKED_NUMEL``, no oneDNN)."""
        weight = self.weight
        if (dtype != weight.dtype or weight.dtype not in _DTYPES or weight.device.type != "cpu"
                or weight.numel() < MIN_PACKED_NUMEL):
            return None
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if self._packed is None or self._packed[0] != key:
            if not supported():
                return None
            with torch.no_grad():
                self._packed = key, torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        return self._packed[1]

    def release(self) -> None:
        self._packed = None

    def __getstate__(self):
        # the packed copy is an opaque oneDNN tensor that cannot be pickled or deep-copied; a copy repacks lazily
        state = self.__dict__.copy()
        state["_packed"] = None
        return state


@contextmanager
def prepacked(model: nn.Module):
    """For the duration, every ``Linear`` of `model` uses its packed weight where valid (see the module's
    docstring). Nests; other modules are untouched, so any model may be passed."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    before = [m.use_packed for m in layers]
    enable = supported()
    for m in layers:
        m.use_packed = enable
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.use_packed = state


def release(model: nn.Module) -> None:
    """Frees the packed copies of `model`'s ``Linear`` weights (they are remade on the next use)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.release()

"""Weight-only quantization of a built model, as a transformation: int8 per output channel, int4 group-wise.

``quantize(model, 'int8')`` swaps every plain ``nn.Linear`` inside `model` for an ``Int8Linear`` and every plain
``nn.Embedding`` for an ``Int8Embedding``. Each row of a weight matrix (a linear's output channel, an embedding's
token vector) becomes int8 values ``q`` and one scale ``s``: symmetric, ``s = max|w_row| / 127``, ``q =
round(w / s)``, so ``|w - q s| <= s / 2`` for every weight. ``quantize(model, 'int4', group_size=128)`` stores the
linears' weights in 4 bits, one scale and one offset per group of `group_size` consecutive weights of a row
(``w = (q - 8) s + z``, ``q`` in 0..15, ``|w - w'| <= s / 2``), where the int4 kernel takes the matrix (the row
length a multiple of `group_size`, the rows a multiple of 16, the weight not shared with an embedding); other
linears and the embeddings are int8. Biases, norms and every other module stay as they were; the model definition knows nothing of this.

Kernels (``bench/quantize_kernels.py`` prints the figures these choices rest on): on a CPU, an int8 layer
multiplies with ``torch.ops.aten._weight_int8pack_mm``, which streams one byte per weight and converts to
bfloat16 in registers; PyTorch vectorises it only for bfloat16 activations (float32 ones run scalar code, about
10x slower), so the activations enter it in bfloat16 whatever the model's dtype (products are summed in float32,
the output is rounded to bfloat16: the rounding of a bfloat16 model, whose quality cost ``bench/quality.py``
measures). int4 layers use ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a copy of the weights in its
layout, made on first use. Elsewhere (a GPU, float64, autograd) a layer computes ``(x q^T) s + b`` with plain
ops: the same function, not a fast one.

The quantized weights are parameters without gradients: int8 (or packed uint8) tensors, and float scales that
follow the model's dtype like its other float tensors. So a quantized model's state dict holds ``weight`` and
``scale`` (and ``zero`` for int4) per layer, ``.to(dtype)``/``.to(device)`` work, and an export records the scheme
(``xlabml.checkpoints``: ``load_checkpoint`` quantizes the model it builds, then loads the stored values). Tied
weights (a head sharing the embedding's matrix) stay tied: one int8 matrix and one set of scales serve both.

Composes with the other transformations: ``xlabml.packed`` packs only exact ``nn.Linear`` modules, so quantized
layers are left alone (quantize first); ``torch.compile`` traces the same kernels, with the operand conversions
folded into constants under ``freezing`` (``xlabml.inference`` compiles its decode step that way).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel takes
_KERNEL_DTYPE = torch.bfloat16  # activations of the CPU kernels (see the module's docstring)
_K_MULTIPLE = 16  # the CPU int8 kernel reads rows in blocks of 16: other lengths are padded with zero weights


def _version(t: torch.Tensor) -> int:
    return 0 if t.is_inference() else t._version


def _key(*tensors: torch.Tensor) -> tuple:
    """What changes when any of these tensors does (storage, in-place writes, dtype)."""
    return tuple((t.data_ptr(), _version(t), t.dtype) for t in tensors)


# ---------------------------------------------------------------------------------------------------------------
# int8, per output channel


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of a matrix (n, k): ``(q, s)`` with ``q`` int8 (n, k) in -127..127 and
    ``s`` (n,) in the weight's dtype, max|row| / 127 rounded up to that dtype (1 for a row of zeros), so that
    ``|w - q s| <= s / 2`` for every weight (to the rounding of a division in float32)."""
    w = weight.detach()
    exact = torch.promote_types(w.dtype, torch.float32)  # the arithmetic: float32, or float64 for float64 weights
    amax = w.abs().amax(dim=-1).to(exact)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    stored = scale.to(w.dtype)
    up = torch.nextafter(stored, torch.full_like(stored, torch.inf))
    stored = torch.where(stored.to(exact) < scale, up, stored)  # rounded up: no weight beyond 127 steps
    q = torch.round(w.to(exact) / stored.to(exact)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, stored


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Int8Linear(nn.Module):
    """Stand-in for an ``nn.Linear`` with int8 weights: ``y = (x q^T) s + b``, ``weight`` (out, in) int8, ``scale``
    (out,) float, ``bias`` (out,) float or None. See the module's docstring for the kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.scale = _frozen(torch.ones(out_features, dtype=dtype or torch.float32, device=device))
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype or torch.float32, device=device)) if bias else None
        self._operands = None  # (key of the weight, its copy padded for the CPU kernel): made on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> "Int8Linear":
        """`linear` quantized (or given its quantized weight and scales: a tied matrix is quantized once)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=weight.device)
        q, s = quantized if quantized is not None else quantize_int8(weight)
        layer.weight = q if isinstance(q, nn.Parameter) else _frozen(q)
        layer.scale = s if isinstance(s, nn.Parameter) else _frozen(s)
        if linear.bias is not None:
            layer.bias = _frozen(linear.bias.detach())
        return layer

    def dequantized(self) -> torch.Tensor:
        """The float weights (out, in) this layer computes with: ``q * s``."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x):
        if x.is_cpu and x.dtype != torch.float64 and not (x.requires_grad and torch.is_grad_enabled()):
            return self._cpu(x)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _cpu(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.dtype != _KERNEL_DTYPE:
            x = x.to(_KERNEL_DTYPE)
        weight, scale, bias = self.weight, self.scale, self.bias
        if shape[-1] % _K_MULTIPLE:
            weight = self._padded_weight()
            x = F.pad(x, (0, weight.shape[1] - shape[-1]))
        if scale.dtype == _KERNEL_DTYPE:  # a bfloat16 model: the kernel scales, then the bias
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale)
            y = y.view(*shape[:-1], self.out_features)
            return y if bias is None else y + bias
        # else the kernel's products unscaled, then scale and bias in the model's dtype in one op: no bfloat16
        # copy of the scales to keep in step with them
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, _ones(self.out_features, x.device))
        y = y.view(*shape[:-1], self.out_features)
        return y * scale if bias is None else torch.addcmul(bias, y, scale)

    def _padded_weight(self) -> torch.Tensor:
        """The weight with zero columns up to a multiple of 16 (the kernel reads rows in blocks of 16): made once,
        remade when the weight changes; computed inline when traced by torch.compile (a constant once frozen)."""
        if torch.compiler.is_compiling():
            return _padded(self.weight)
        key = _key(self.weight)
        if self._operands is None or self._operands[0] != key:
            self._operands = key, _padded(self.weight)
        return self._operands[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_operands"] = None  # a cache: a copy remakes its own
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


_ones_cache: dict = {}


def _ones(n: int, device) -> torch.Tensor:
    """A bfloat16 vector of n ones: the int8 kernel's scales when the layer scales its output itself."""
    key = n, device  # traced by torch.compile too: a stored tensor, which inductor's int8 lowering needs
    if key not in _ones_cache:
        _ones_cache[key] = torch.ones(n, dtype=_KERNEL_DTYPE, device=device)
    return _ones_cache[key]


def _padded(weight: torch.Tensor) -> torch.Tensor:
    pad = -weight.shape[1] % _K_MULTIPLE
    return F.pad(weight, (0, pad)) if pad else weight


class Int8Embedding(nn.Module):
    """Stand-in for an ``nn.Embedding`` with int8 rows: ``embedding(ids) = q[ids] * s[ids]``, ``weight`` (n, d)
    int8, ``scale`` (n,) float; the output has the scale's dtype (the model's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _frozen(torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.scale = _frozen(torch.ones(num_embeddings, dtype=dtype or torch.float32, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, quantized: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> "Int8Embedding":
        weight = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device=weight.device)
        q, s = quantized if quantized is not None else quantize_int8(weight)
        layer.weight = q if isinstance(q, nn.Parameter) else _frozen(q)
        layer.scale = s if isinstance(s, nn.Parameter) else _frozen(s)
        return layer

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, ids):  # b t -> b t d
        return F.embedding(ids, self.weight).to(self.scale.dtype) * F.embedding(ids, self.scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------------------------------------------------------
# int4, group-wise


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantization of a matrix (n, k) in groups of `group_size` consecutive weights of a row:
    ``(q, s, z)`` with ``q`` uint8 (n, k) in 0..15 and ``s``, ``z`` float32 (n, k / group_size), such that
    ``w ≈ (q - 8) s + z`` within ``s / 2`` (``s`` = (max - min) / 15 of the group, ``z`` = min + 8 s)."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return q, scale, lo + 8 * scale


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 (n, k), k even -> (n, k / 2) bytes: column 2i in the low nibble, 2i + 1 in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: (n, k / 2) bytes -> uint8 (n, k) in 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether the int4 kernel takes a matrix of this shape in groups of this size."""
    return group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0


class Int4Linear(nn.Module):
    """Stand-in for an ``nn.Linear`` with 4-bit weights in groups: ``weight`` (out, in / 2) uint8 (two values per
    byte, see ``pack_nibbles``), ``scale`` and ``zero`` (out, in / group_size) float, ``bias``; the layer computes
    with ``(q - 8) s + z`` (see ``quantize_int4``)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if not int4_fits(in_features, out_features, group_size):
            raise ValueError(f"int4 group_size={group_size} must be one of {INT4_GROUP_SIZES} and divide "
                             f"in_features={in_features}, and out_features={out_features} a multiple of 16")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        dtype = dtype or torch.float32
        self.weight = _frozen(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.scale = _frozen(torch.ones(out_features, groups, dtype=dtype, device=device))
        self.zero = _frozen(torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._operands = None  # (key, the kernel's packed weight, its scales and zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None,
                    device=weight.device)
        q, s, z = quantize_int4(weight, group_size)
        layer.weight = _frozen(pack_nibbles(q))
        layer.scale, layer.zero = _frozen(s.to(weight.dtype)), _frozen(z.to(weight.dtype))
        if linear.bias is not None:
            layer.bias = _frozen(linear.bias.detach())
        return layer

    def dequantized(self) -> torch.Tensor:
        """The float weights (out, in) this layer computes with."""
        q = unpack_nibbles(self.weight).to(self.scale.dtype).view(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scale[..., None] + self.zero[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x):
        if x.is_cpu and x.dtype != torch.float64 and not (x.requires_grad and torch.is_grad_enabled()):
            weight, scales_and_zeros = self._kernel_operands()
            shape = x.shape
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(_KERNEL_DTYPE).contiguous(),
                                                           weight, self.group_size, scales_and_zeros)
            y = y.view(*shape[:-1], self.out_features)
            return y.to(self.scale.dtype) if self.bias is None else torch.add(y, self.bias)
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _kernel_operands(self):
        if torch.compiler.is_compiling():
            return self._make_operands()
        key = _key(self.weight, self.scale, self.zero)
        if self._operands is None or self._operands[0] != key:
            self._operands = (key, *self._make_operands())
        return self._operands[1], self._operands[2]

    def _make_operands(self):
        q = unpack_nibbles(self.weight).to(torch.int32)
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # the kernel's own layout
        scales_and_zeros = torch.stack((self.scale.t(), self.zero.t()), dim=-1).to(_KERNEL_DTYPE).contiguous()
        return weight, scales_and_zeros  # ..., (in / group_size, out, 2)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_operands"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


# ---------------------------------------------------------------------------------------------------------------
# the transformation


def quantize(model: nn.Module, scheme: str = "int8", *, group_size: int | None = None) -> nn.Module:
    """Quantizes the weights of `model` in place (see the module's docstring) and returns it.

    Args:
        model: any module; the plain ``nn.Linear`` and ``nn.Embedding`` modules inside it are swapped (modules of
            other types, a quantized layer among them, are left alone: quantizing twice changes nothing).
        scheme: ``'int8'`` or ``'int4'``.
        group_size: int4 only: weights per group, one of ``INT4_GROUP_SIZES`` (default 128).
    Returns:
        `model`, quantized.
    Raises:
        ValueError: an unknown scheme or group size.
        TypeError: `model` is itself an ``nn.Linear`` or ``nn.Embedding`` (swap those with ``Int8Linear.from_linear``
            and the like).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if scheme == "int8" and group_size is not None:
        raise ValueError(f"group_size={group_size} applies to int4 only; int8 has one scale per row")
    if scheme == "int4":
        group_size = 128 if group_size is None else group_size
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r}; expected one of {INT4_GROUP_SIZES}")
    if type(model) in (nn.Linear, nn.Embedding):
        raise TypeError(f"quantize() swaps the layers inside a model; for a lone {type(model).__name__} use "
                        "Int8Linear.from_linear / Int8Embedding.from_embedding")
    swaps = [(parent, name, child) for parent in list(model.modules()) for name, child in parent.named_children()
             if type(child) in (nn.Linear, nn.Embedding)]
    counts: dict[int, int] = {}  # id(weight) -> modules sharing it
    for _, _, child in swaps:
        counts[id(child.weight)] = counts.get(id(child.weight), 0) + 1
    shared: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(float weight) -> its int8 weight and scale
    with torch.no_grad():
        for parent, name, child in swaps:
            if isinstance(child, nn.Embedding) and (child.max_norm is not None or child.sparse):
                continue  # renormalising lookups rewrite the weights they read: not a fixed matrix
            tied = counts[id(child.weight)] > 1
            if (scheme == "int4" and isinstance(child, nn.Linear) and not tied
                    and int4_fits(child.in_features, child.out_features, group_size)):
                setattr(parent, name, Int4Linear.from_linear(child, group_size))
                continue
            quantized = shared.get(id(child.weight))
            if quantized is None:
                q, s = quantize_int8(child.weight)
                quantized = shared[id(child.weight)] = _frozen(q), _frozen(s)
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child, quantized))
            else:
                setattr(parent, name, Int8Embedding.from_embedding(child, quantized))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied ones once): what a checkpoint of it stores."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

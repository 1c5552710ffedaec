"""Decoder-only transformer parts, top to bottom: positions, norms, feed-forward, block, decoder; attention
and its KV cache are in ``xlabml.attention`` (re-exported here).

Every variant is a small class picked by name from a registry (``POSITIONS``, ``NORMS``, ``ATTENTIONS``,
``FEED_FORWARDS``); an unknown name raises ``ValueError`` listing the valid ones. The model knows nothing of
Lightning (see ``xlabml.models``).

Attention rule (shared by every backend): the query in slot ``i`` may see the key in slot ``j`` iff ``j <= i``,
the two document ids are equal (when given), and ``i - j < sliding_window`` (when set). A slot is a column of
the input during training and a cache index (``input_pos``) during cached inference. ALiBi uses ``i - j``;
sinusoidal, learned and rotary encodings use ``positions``, so a packed document (positions restarting at 0,
its own doc id) gets exactly the logits it would get alone.

Shapes: ``b`` batch, ``t`` new tokens, ``s`` key slots, ``h`` query heads, ``g`` key/value heads, ``d`` head
size, ``c`` model width (d_model), ``v`` vocabulary.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xlabml.attention import (  # noqa: F401  (re-exported: every model part in one namespace)
    KERNELS, Attention, AttentionContext, FlashKernel, KVCache, LayerKVCache, NaiveKernel, SDPAKernel,
    apply_rotary,
)
from xlabml.losses import softcap_logits
from xlabml.linear_attention import LinearAttention, LinearStateCache

# attention: a kernel of softmax attention (``Attention``), or linear attention (another layer)
ATTENTIONS = {**KERNELS, 'linear': LinearAttention}


def pick(registry: dict, kind: str, name: str):
    """Look ``name`` up in ``registry``; unknown names raise a ValueError listing the valid ones."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; expected one of: {', '.join(sorted(registry))}") from None


def _dropout(p: float, enabled: bool) -> nn.Module:
    # an Identity costs nothing at decode time, an inactive Dropout still costs a Python call per layer
    return nn.Dropout(p) if enabled and p > 0 else nn.Identity()


# ---------------------------------------------------------------------------------------------- positions

class Position(nn.Module):
    """Base class of position schemes. A scheme contributes through any of three hooks, all called once per
    forward (not per layer): ``embed`` (added to the token embeddings), ``rotary`` (applied to queries and
    keys) and ``bias`` (added to attention scores)."""

    def embed(self, positions):  # b t -> b t c, or None
        return None

    def rotary(self, positions):  # b t -> (cos, sin), each b 1 t r/2, or None
        return None

    def bias(self, q_slots, k_slots):  # (t,), (s,) -> h t s, or None
        return None


class NoPosition(Position):
    """No position information at all (causal attention alone still orders the tokens)."""

    def __init__(self, **_):
        super().__init__()


def inverse_frequencies(dim: int, base: float, device=None) -> torch.Tensor:
    """``base ** (-2i / dim)`` for ``i < dim / 2``: the angular frequencies of sinusoidal and rotary encodings,
    always float32. Computed at each use rather than kept in a buffer: ``.to(bf16)``, ``bf16-true`` and FSDP's
    buffer casting would round a buffer to bf16, which moves the angles at position 511 by up to 0.2 rad (RoPE,
    heads of 64) and 0.7 rad (sinusoidal, d_model 512): a model would train on other positions than it infers
    with."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)  # dim/2


class SinusoidalPosition(Position):
    """Fixed sin/cos encoding (Vaswani et al.), computed from ``positions`` on the fly, so any position
    (packed restarts, cache slots past ``max_len``) works and there is no table to keep in sync. The result is
    float32 whatever the module's dtype (the Decoder casts it to the activations' dtype)."""

    def __init__(self, d_model: int, **_):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"position='sinusoidal' needs an even d_model, got {d_model}")
        self.d_model = d_model

    def embed(self, positions):
        inv_freq = inverse_frequencies(self.d_model, 10000.0, positions.device)  # c/2
        angles = positions[..., None].float() * inv_freq  # b t c/2
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # b t c (sin, cos interleaved)


class LearnedPosition(Position):
    """A learned embedding per position, ``0 <= position < max_len``."""

    def __init__(self, d_model: int, max_len: int, **_):
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)

    def embed(self, positions):
        return self.embedding(positions)  # b t c


def rope_frequencies(rotated: int, base: float, scaling: str | None = None, scale: float = 1.0,
                     original_len: float = 0.0, device=None):
    """Rotary angular frequencies ``base ** (-2i / rotated)`` (float32, r/2), stretched for a context ``scale``
    times the ``original_len`` a model was trained at, and the factor its cos/sin are multiplied by:

    - ``'linear'``: position interpolation (Chen et al. 2023): every frequency divided by ``scale``, so positions
      up to ``scale * original_len`` turn by the angles the model knows.
    - ``'ntk'``: NTK-aware scaling: the base multiplied by ``scale ** (r / (r - 2))``: the highest frequency stays,
      the lowest is divided by ``scale``, those between by less.
    - ``'yarn'`` (Peng et al. 2023): frequencies whose wavelength fits into ``original_len`` more than 32 times
      stay, those fitting less than once are interpolated, a linear ramp between; cos/sin times
      ``0.1 ln(scale) + 1`` (the attention logits sharpened for the longer context).
    """
    if scaling == 'ntk' and scale != 1.0 and rotated > 2:
        base = base * scale ** (rotated / (rotated - 2))
    inv_freq = inverse_frequencies(rotated, base, device)  # r/2
    if scaling is None or scale == 1.0 or scaling == 'ntk':
        return inv_freq, 1.0
    if scaling == 'linear':
        return inv_freq / scale, 1.0
    fits = original_len * inv_freq / (2 * math.pi)  # wavelengths in the trained length
    keep = ((fits - 1.0) / (32.0 - 1.0)).clamp(0.0, 1.0)  # 0: interpolate, 1: keep
    return inv_freq / scale * (1 - keep) + inv_freq * keep, 0.1 * math.log(scale) + 1.0


ROPE_SCALINGS = ('linear', 'ntk', 'yarn')


class RotaryPosition(Position):
    """RoPE (Su et al.), rotate-half layout, on the first ``rope_fraction`` of each head's dimensions
    (partial rotary as in GPT-NeoX); ``rope_base`` sets the wavelengths. ``rope_scaling`` (``'linear'``, ``'ntk'``,
    ``'yarn'``) with ``rope_scale`` s stretches them for a context s times the one trained at (``max_len / s``):
    see ``rope_frequencies``."""

    def __init__(self, head_dim: int, rope_base: float = 10000.0, rope_fraction: float = 1.0,
                 rope_scaling: str | None = None, rope_scale: float = 1.0, max_len: int = 0, **_):
        super().__init__()
        if not 0.0 < rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction must be in (0, 1], got {rope_fraction}")
        if rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1, got {rope_base}")
        if rope_scaling is not None and rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling {rope_scaling!r}; expected one of: {', '.join(ROPE_SCALINGS)}")
        if not (isinstance(rope_scale, (int, float)) and rope_scale >= 1.0):
            raise ValueError(f"rope_scale must be a number >= 1 (the context's growth), got {rope_scale!r}")
        rotated = int(head_dim * rope_fraction) // 2 * 2
        if rotated == 0:
            raise ValueError(f"rope_fraction={rope_fraction} rotates no dimension of heads of size {head_dim}")
        self.rotated, self.rope_base = rotated, rope_base
        self.rope_scaling, self.rope_scale, self.original_len = rope_scaling, float(rope_scale), max_len / rope_scale
        _, self.mscale = rope_frequencies(rotated, rope_base, rope_scaling, self.rope_scale, self.original_len)

    def rotary(self, positions):  # float32 (cos, sin): apply_rotary rotates in float32, casts back to q/k's dtype
        inv_freq, _ = rope_frequencies(self.rotated, self.rope_base, self.rope_scaling, self.rope_scale,
                                       self.original_len, positions.device)  # r/2
        angles = positions[:, None, :, None].float() * inv_freq  # b 1 t r/2
        if self.mscale != 1.0:
            return angles.cos() * self.mscale, angles.sin() * self.mscale
        return angles.cos(), angles.sin()


class ALiBiPosition(Position):
    """ALiBi (Press et al.): a per-head linear penalty ``-slope * (i - j)`` on the slot distance. The slopes
    are computed in float32 at use (``slopes(device)``), never stored where a cast could round them."""

    def __init__(self, n_heads: int, **_):
        super().__init__()
        self.n_heads = n_heads

    @staticmethod
    def make_slopes(n_heads, device=None):
        """The ``n_heads`` slopes (float32): geometric 2^(-8/n), 2^(-16/n), ...; a non-power-of-two count
        interleaves those of the next power of two, as in the paper's reference."""
        closest = 2 ** math.floor(math.log2(n_heads))
        main = torch.arange(1, closest + 1, dtype=torch.float32, device=device) * (-8.0 / closest)
        odd = 2 * torch.arange(n_heads - closest, dtype=torch.float32, device=device) + 1  # 1, 3, 5, ...
        extra = odd * (-4.0 / closest)  # every other slope of 2 * closest heads
        return torch.cat((main, extra)).exp2()  # h

    def slopes(self, device=None):  # h, float32
        return self.make_slopes(self.n_heads, device)

    def bias(self, q_slots, k_slots):
        distance = (q_slots[:, None] - k_slots[None, :]).float()  # t s
        return -self.slopes(distance.device)[:, None, None] * distance  # h t s


POSITIONS = {
    'sinusoidal': SinusoidalPosition,
    'learned': LearnedPosition,
    'rope': RotaryPosition,
    'alibi': ALiBiPosition,
    'none': NoPosition,
}


# -------------------------------------------------------------------------------------------------- norms

class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, bias: bool = True):
        super().__init__(dim, eps=1e-5, bias=bias)


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, bias: bool = True):  # RMSNorm has no bias; the keyword keeps one signature
        super().__init__(dim, eps=1e-5)


NORMS = {'layernorm': LayerNorm, 'rmsnorm': RMSNorm}


# ------------------------------------------------------------------------------------------- feed-forward

class ReLUSquared(nn.Module):
    """relu(x)^2: the squared ReLU of Primer (So et al. 2021) and of the modded-nanogpt speedrun's MLP."""

    def forward(self, x):
        return F.relu(x).square()


ACTIVATIONS = {'gelu': nn.GELU, 'relu': nn.ReLU, 'relu2': ReLUSquared}


class MLP(nn.Module):
    """Linear -> activation -> (dropout) -> linear, hidden size ``d_ff``; ``activation`` names a module in
    ``ACTIVATIONS``."""
    activation = 'gelu'
    # act is applied directly to fc's output, so a transformation may compute both in one (xlabml.packed)
    fusable_activations = {'fc': 'act'}

    def __init__(self, d_model, d_ff, *, dropout=0.0, bias=True):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = ACTIVATIONS[self.activation]()
        self.dropout = _dropout(dropout, True)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):  # b t c
        return self.proj(self.dropout(self.act(self.fc(x))))  # b t c (hidden b t f)


class GELUMLP(MLP):
    activation = 'gelu'


class ReLUMLP(MLP):
    activation = 'relu'


class ReLU2MLP(MLP):
    """The two-matrix MLP with a squared ReLU: nanoGPT's parameter count at ``d_ff = 4 d_model``, two matmuls
    instead of SwiGLU's three."""
    activation = 'relu2'


def swiglu_hidden(d_ff: int) -> int:
    """SwiGLU hidden size: 2/3 of ``d_ff`` (three matrices instead of two keep the parameter count about
    equal), rounded up to a multiple of 8 for friendlier matmul shapes."""
    return 8 * math.ceil(2 * d_ff / 3 / 8)


class SwiGLU(nn.Module):
    """SiLU(x W) * (x V) -> (dropout) -> linear (Shazeer 2020); W and V are one fused matrix."""

    def __init__(self, d_model, d_ff, *, dropout=0.0, bias=True):
        super().__init__()
        self.hidden = swiglu_hidden(d_ff)
        self.fc = nn.Linear(d_model, 2 * self.hidden, bias=bias)
        self.fused_rows = {'fc': (self.hidden, self.hidden)}  # gate, up (xlabml.roles.fused_rows)
        self.dropout = _dropout(dropout, True)
        self.proj = nn.Linear(self.hidden, d_model, bias=bias)

    def forward(self, x):  # b t c
        gate, up = self.fc(x).chunk(2, dim=-1)  # b t f', b t f'
        return self.proj(self.dropout(F.silu(gate) * up))  # b t c


class MoE(nn.Module):
    """Mixture of experts (Shazeer et al. 2017; Switch; Mixtral's top-2 routing): a linear router scores
    ``n_experts`` SwiGLU experts for each token, the token goes to its ``top_k`` best, and their outputs are summed
    with the router's softmax probabilities of those experts, renormalised to sum to 1. Each expert's hidden size
    is that of a dense SwiGLU of ``d_ff / top_k``, so a token costs about what the dense feed-forward costs while
    the layer holds ``n_experts / top_k`` times its parameters.

    Every token is routed (no capacity limit, no dropped tokens), so a token's output depends on that token alone:
    cached generation routes exactly as training did. After each forward, ``load`` holds each expert's share of
    the ``n * top_k`` assignments (e) and, in training, ``aux_loss`` the load-balancing loss (Switch, Fedus et
    al.): ``n_experts * sum_e f_e * P_e``, with ``f_e`` that share and ``P_e`` the mean router probability of
    expert e over the tokens; it is 1 at perfect balance and ``XLabModule`` adds ``moe_aux_loss`` times its mean
    over the layers to the objective.

    Scaling: the experts run one after another on the tokens routed to each (a sort, one host read of the
    counts, then one call per expert), which is what a CPU wants; the work is ``top_k`` dense feed-forwards.
    On GPUs at scale, a grouped GEMM over all experts at once (MegaBlocks) and experts sharded across devices
    (expert parallelism, an all-to-all per layer) replace the loop; every device here holds every expert.
    """
    options = ('n_experts', 'moe_top_k')

    def __init__(self, d_model, d_ff, *, dropout=0.0, bias=True, n_experts=8, moe_top_k=2):
        super().__init__()
        if not isinstance(n_experts, int) or n_experts < 2:
            raise ValueError(f"n_experts must be an int >= 2 for ffn='moe', got {n_experts!r}")
        if not isinstance(moe_top_k, int) or not 1 <= moe_top_k <= n_experts:
            raise ValueError(f"moe_top_k must be an int in 1..n_experts={n_experts}, got {moe_top_k!r}")
        self.n_experts, self.top_k = n_experts, moe_top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, max(1, d_ff // moe_top_k), dropout=dropout, bias=bias)
                                     for _ in range(n_experts))
        self.aux_loss, self.load = None, None

    def output_projections(self):
        return [expert.proj for expert in self.experts]

    def route(self, x):  # n c -> (probabilities n e float32, weights n k, chosen experts n k)
        probs = self.router(x).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), chosen

    def forward(self, x):  # b t c
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # n c
        probs, weights, chosen = self.route(x)
        flat = chosen.flatten()  # n*k assignments, token-major
        order = flat.argsort(stable=True)  # grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts)  # e
        rows = order // self.top_k  # the token of each assignment
        outputs = [expert(part) for expert, part in zip(self.experts, x[rows].split(counts.tolist())) if len(part)]
        y = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)  # n*k c
        out = torch.zeros_like(x).index_add_(0, rows, y)
        self.load = (counts.float() / flat.numel()).detach()  # e
        self.aux_loss = self.n_experts * (self.load * probs.mean(dim=0)).sum() if self.training else None
        return out.view(shape)  # b t c


def visibility(ctx: AttentionContext, device) -> torch.Tensor | None:
    """The attention rule of ``ctx`` as a boolean ``b|1 t s`` tensor (True: query slot t may see key slot s), or
    None when every key is visible; for layers other than attention that mix tokens (head-QK, SGU)."""
    mask, causal = ctx.mask(torch.float32)
    if causal:
        t = len(ctx.q_slots)
        return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]
    if mask is None:
        return None
    return mask[:, 0] if mask.dtype == torch.bool else torch.isfinite(mask[:, 0])  # ALiBi: -inf where hidden


def key_slots(ctx: AttentionContext, device) -> torch.Tensor:
    """The absolute slot of each key (s,) that ``ctx``'s layers read (cache indices with a cache)."""
    if ctx.k_slots is not None:
        return ctx.k_slots
    return torch.arange(ctx.lo, ctx.hi, device=device)


class SlotCache(nn.Module):
    """Per-slot state of a token-mixing layer other than attention (b s ...), written at cache slots like a
    ``LayerKVCache``; ``DecoderCache`` resets and reorders it with the KV cache."""

    def __init__(self, batch_size, max_len, **shapes):  # name -> (trailing shape, dtype, device)
        super().__init__()
        for name, (shape, dtype, device) in shapes.items():
            self.register_buffer(name, torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device),
                                 persistent=False)
        self.names = tuple(shapes)

    def update(self, slots, lo, hi, **values):  # each b t ... -> b s ... (slots lo..hi-1, views)
        out = []
        for name in self.names:
            buffer = getattr(self, name)
            buffer.index_copy_(1, slots, values[name].to(buffer.dtype))
            out.append(buffer[:, lo:hi])
        return out


class SGU(nn.Module):
    """gMLP's channel-split spatial gating unit (Liu et al. 2021) as a feed-forward: ``u, v = split(gelu(x W))``,
    ``v = norm(v)``, then ``u * (sum_s m(t, s) v_s + b)`` -> (dropout) -> linear, where token t mixes the values of
    the keys it may see (the attention rule: causal, same document, window) with one learned weight per distance,
    ``m(t, s) = w[t - s]`` for ``t - s < max_len`` (gMLP learns one weight per position pair; shift-invariant
    weights let a packed document and a rolling cache see the same mixing). ``w`` starts at 0 and ``b`` at 1, so
    the unit starts as a plain gated feed-forward, as in the paper. Hidden size: 2/3 of ``d_ff`` per half, as
    SwiGLU, which keeps the parameters of the GELU feed-forward. Cached generation keeps each slot's ``v``.
    """
    options = ('max_len', 'norm')
    uses_context = True

    def __init__(self, d_model, d_ff, *, dropout=0.0, bias=True, max_len=512, norm=None):
        super().__init__()
        self.hidden = swiglu_hidden(d_ff)
        self.fc = nn.Linear(d_model, 2 * self.hidden, bias=bias)
        self.fused_rows = {'fc': (self.hidden, self.hidden)}  # u, v
        self.norm = (norm or LayerNorm)(self.hidden, bias=bias)
        self.spatial = nn.Parameter(torch.zeros(max_len))  # weight per distance 0..max_len-1
        self.gate_bias = nn.Parameter(torch.ones(self.hidden))
        self.dropout = _dropout(dropout, True)
        self.proj = nn.Linear(self.hidden, d_model, bias=bias)

    def init_state(self, batch_size, max_len, device, dtype):
        return SlotCache(batch_size, max_len, v=((self.hidden,), dtype, device))

    def forward(self, x, ctx, state=None):  # b t c
        u, v = F.gelu(self.fc(x)).chunk(2, dim=-1)  # b t f, b t f
        v = self.norm(v)
        if state is not None:
            (v,) = state.update(ctx.input_pos, ctx.lo, ctx.hi, v=v)  # b s f
        distance = ctx.q_slots[:, None] - key_slots(ctx, x.device)[None, :]  # t s
        mix = self.spatial[distance.clamp(0, len(self.spatial) - 1)]  # t s
        visible = distance < len(self.spatial)
        rule = visibility(ctx, x.device)
        if rule is not None:
            visible = visible & rule  # b|1 t s
        mix = mix.masked_fill(~visible, 0.0).to(v.dtype)  # b|1 t s
        gate = mix @ v + self.gate_bias.to(v.dtype)  # b t f
        return self.proj(self.dropout(u * gate))  # b t c


FEED_FORWARDS = {'gelu': GELUMLP, 'relu': ReLUMLP, 'relu2': ReLU2MLP, 'swiglu': SwiGLU, 'moe': MoE, 'sgu': SGU}


# -------------------------------------------------------------------------------------------------- block

class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, attention, ffn, norm, d_model, *, dropout_residual=0.0, bias=True):
        super().__init__()
        self.norm1 = norm(d_model, bias=bias)
        self.attn = attention
        self.norm2 = norm(d_model, bias=bias)
        self.ffn = ffn
        self.dropout = _dropout(dropout_residual, True)

    def forward(self, x, ctx, kv_cache=None):  # b t c -> b t c
        x = x + self.dropout(self.attn(self.norm1(x), ctx, kv_cache))
        return x + self.dropout(self.feed_forward(self.norm2(x), ctx, kv_cache))

    def feed_forward(self, x, ctx, kv_cache=None):
        """``ffn(x)``; a feed-forward that mixes tokens (``uses_context``, e.g. SGU) also gets the attention
        context and its own state in the layer's cache."""
        if getattr(self.ffn, 'uses_context', False):
            return self.ffn(x, ctx, getattr(kv_cache, 'ffn_state', None))
        return self.ffn(x)


class PostNormBlock(Block):
    """Post-norm block (original Transformer): ``norm1(x + attn(x))``, then ``norm2(x + ffn(x))``."""

    def forward(self, x, ctx, kv_cache=None):
        x = self.norm1(x + self.dropout(self.attn(x, ctx, kv_cache)))
        return self.norm2(x + self.dropout(self.feed_forward(x, ctx, kv_cache)))


class ParallelBlock(Block):
    """GPT-J parallel residual, one shared norm: ``x + attn(norm(x)) + ffn(norm(x))``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.norm2

    def forward(self, x, ctx, kv_cache=None):
        h = self.norm1(x)
        return x + self.dropout(self.attn(h, ctx, kv_cache)) + self.dropout(self.feed_forward(h, ctx, kv_cache))


class PostNormParallelBlock(ParallelBlock):
    """Parallel residual with the norm after the sum: ``norm(x + attn(x) + ffn(x))``."""

    def forward(self, x, ctx, kv_cache=None):
        return self.norm1(x + self.dropout(self.attn(x, ctx, kv_cache))
                          + self.dropout(self.feed_forward(x, ctx, kv_cache)))


BLOCKS = {  # (prenorm, parallel_residual)
    (True, False): Block, (False, False): PostNormBlock,
    (True, True): ParallelBlock, (False, True): PostNormParallelBlock,
}


# ------------------------------------------------------------------------------------------------- head

class HeadQK(nn.Module):
    """The head-QK trick (RWKV's "headQK", Transformer-JAX): a single-head bilinear score between the final hidden
    states adds, to the logit of every token id that occurred in the visible context, the scores of its
    occurrences: ``logits[t, v] += (1/d) sum_{s visible to t, x_s = v} q_t . k_s`` (s = t included), with q and
    k linear maps of width ``d``. It lets the model copy a token it has seen at the cost of a t x s product.
    Cached generation keeps each slot's key and token id."""

    def __init__(self, d_model, n_vocab, size):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"head_qk must be None or a positive int (the q/k width), got {size!r}")
        self.n_vocab, self.size = n_vocab, size
        self.q = nn.Linear(d_model, size, bias=False)
        self.k = nn.Linear(d_model, size, bias=False)

    def init_state(self, batch_size, max_len, device, dtype):
        return SlotCache(batch_size, max_len, k=((self.size,), dtype, device), ids=((), torch.long, device))

    def forward(self, queries, keys, ids, ctx, state=None):
        """Logits to add (b tq v) for the last ``tq`` query rows ``queries`` (b tq c), from ``keys`` (b t c) and the
        token ids ``ids`` (b t) of this forward's tokens (and, with ``state``, every cached slot)."""
        q, k = self.q(queries), self.k(keys)  # b tq d, b t d
        if state is not None:
            k, ids = state.update(ctx.input_pos, ctx.lo, ctx.hi, k=k, ids=ids)  # b s d, b s
        scores = (q @ k.transpose(1, 2)).float() / self.size  # b tq s
        visible = visibility(ctx, q.device)
        if visible is not None:
            scores = scores.masked_fill(~visible[:, -q.size(1):], 0.0)
        b, tq, s = scores.shape
        out = scores.new_zeros(b, tq, self.n_vocab)
        return out.scatter_add_(2, ids[:, None, :].expand(b, tq, s), scores)  # b tq v, float32


class DecoderCache(KVCache):
    """A ``KVCache`` that also holds the per-slot state of the decoder's other token-mixing layers (``SlotCache``
    modules: head-QK keys and ids, SGU values), reset and reordered with the keys and values."""

    def slot_caches(self):
        return [m for m in self.modules() if isinstance(m, SlotCache)]

    def reset(self):
        super().reset()
        for cache in self.slot_caches():
            for name in cache.names:
                getattr(cache, name).zero_()

    @torch.no_grad()
    def reorder(self, index):
        n, resized = self.filled, len(index) != self.batch_size
        super().reorder(index)
        index = torch.as_tensor(index, dtype=torch.long, device=self.doc_ids.device)
        for cache in self.slot_caches():
            for name in cache.names:
                buffer = getattr(cache, name)
                if resized:
                    setattr(cache, name, buffer.index_select(0, index))
                else:
                    buffer[:, :n] = buffer[:, :n].index_select(0, index)

    @torch.no_grad()
    def take(self, source, index):
        super().take(source, index)
        index = torch.as_tensor(index, dtype=torch.long, device=self.doc_ids.device)
        n = source.filled
        for cache, other in zip(self.slot_caches(), source.slot_caches()):
            for name in cache.names:
                getattr(cache, name)[:, :n] = getattr(other, name)[:, :n].index_select(0, index)


# ------------------------------------------------------------------------------------------------ decoder

MEMORY_GRADS = ('none', 'recompute')  # memory_grad: how the segment memory gets gradients (xlabml.memory)


def resolve_layer_windows(layer_windows, sliding_window, n_layers) -> list[int | None]:
    """Each layer's sliding window from ``layer_windows``: a list whose length divides ``n_layers`` (repeated
    over the layers), of ``'local'`` (the model's ``sliding_window``), ``'global'`` or None (no window), or a
    number of tokens. None: every layer gets ``sliding_window`` through the model's attention context."""
    if layer_windows is None:
        return [None] * n_layers
    pattern = list(layer_windows) if isinstance(layer_windows, (list, tuple)) else None
    if not pattern or n_layers % len(pattern):
        raise ValueError(f"layer_windows={layer_windows!r}: expected a list whose length divides n_layers={n_layers}")
    windows = []
    for entry in pattern:
        if entry == 'local':
            if sliding_window is None:
                raise ValueError("layer_windows names 'local' layers but sliding_window (their window) is not set")
            entry = sliding_window
        elif entry == 'global':
            entry = None
        if entry is not None and (isinstance(entry, bool) or not isinstance(entry, int) or entry < 1):
            raise ValueError(f"layer_windows entry {entry!r}: expected 'local', 'global', null or a window >= 1")
        windows.append(entry)
    return windows * (n_layers // len(pattern))


class Decoder(nn.Module):
    """GPT-style decoder: token embedding (+ absolute positions) -> blocks -> optional final norm -> head.

    Defaults are the release model: pre-norm with a final norm, GELU, sinusoidal positions, dropout on the
    attention probabilities and the feed-forward hidden activations only.

    Initialisation (``reset_parameters``): every linear and embedding weight ~ N(0, 0.02); the two residual
    output projections of each block (attention ``proj``, feed-forward ``proj``) ~ N(0, 0.02 / sqrt(2 *
    n_layers)) so the residual stream's variance does not grow with depth (GPT-2); biases zero; norms at
    identity. Token embeddings are multiplied by ``embedding_scale``, default sqrt(d_model) (as in the seed and
    Vaswani et al.), which puts them on the scale of the unit-amplitude sinusoidal encoding. With a tied head and
    no added position vectors (RoPE, ALiBi, none), 1.0 trains better: on Tiny Shakespeare the factor cost the
    tied model about 0.1 bit/char (``conf/extra/modern.yaml`` sets 1.0).

    Capacity and stability options (``conf/extra/shakespeare.yaml`` and bench/results/ablation.md say which
    helped): ``ffn='moe'`` (``MoE``: ``n_experts`` experts, ``moe_top_k`` per token) and ``ffn='sgu'`` (``SGU``);
    ``d_embedding``: an embedding table and head of that width, with projections in (``embedding_in``) and out
    (``embedding_out``) of the blocks' ``d_model``; ``head_qk``: the head-QK copy scores of that width
    (``HeadQK``); ``logit_softcap``: logits soft-capped to (-cap, cap) by ``cap * tanh(logits / cap)``.
    Memory and long context: ``registers`` learned key/value slots in every layer that every query may attend to
    (LSWT); ``kv_share`` consecutive layers attending to the keys and values of the first of them;
    ``layer_windows`` a sliding window per layer (``resolve_layer_windows``); ``memory_len`` keys and values of
    the previous tokens of each row kept across segments (Transformer-XL, ``xlabml.memory``; ``memory_grad``:
    ``'none'`` or ``'recompute'``); ``attention='linear'`` (``xlabml.linear_attention``); ``rope_scaling`` and
    ``rope_scale`` to stretch RoPE over a longer context (``rope_frequencies``).
    ``value_embeddings``: that many extra token tables (width ``n_kv_heads * head_dim``) whose vector for each
    token is added to its attention values, table j in layers j and ``n_layers - 1 - j`` (the modded-nanogpt
    speedrun's value embeddings, shared U-net style); parameters for free compute, trained as embeddings.
    ``unet_skips``: the output of each layer i of the first half is added, times a learned weight (initially 1),
    to the input of layer ``n_layers - 1 - i`` (the speedrun's U-net skips).
    """

    def __init__(self, n_vocab: int, max_len: int, d_model: int = 512, n_layers: int = 6, n_heads: int = 8,
                 d_ff: int = 2048, dropout: float = 0.1, *, n_kv_heads: int | None = None,
                 position: str = 'sinusoidal', rope_base: float = 10000.0, rope_fraction: float = 1.0,
                 norm: str = 'layernorm', prenorm: bool = True, final_norm: bool = True, ffn: str = 'gelu',
                 attention: str = 'sdpa', sliding_window: int | None = None, qk_norm: bool = False,
                 dropout_attn: bool = True, dropout_ffn: bool = True, dropout_residual: bool = False,
                 dropout_embedding: bool = False, tie_embeddings: bool = False, parallel_residual: bool = False,
                 bias: bool = True, activation_checkpointing: bool = False, embedding_scale: float | None = None,
                 logit_softcap: float | None = None, d_embedding: int | None = None, n_experts: int = 8,
                 moe_top_k: int = 2, head_qk: int | None = None, registers: int = 0, kv_share: int = 1,
                 layer_windows: list[str | int | None] | None = None, memory_len: int = 0,
                 memory_grad: str = 'none', rope_scaling: str | None = None, rope_scale: float = 1.0,
                 value_embeddings: int = 0, unet_skips: bool = False):
        super().__init__()
        for name, value in (('n_vocab', n_vocab), ('max_len', max_len), ('d_model', d_model),
                            ('n_layers', n_layers), ('n_heads', n_heads), ('d_ff', d_ff)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must be a positive divisor of n_heads={n_heads}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if embedding_scale is not None and not (isinstance(embedding_scale, (int, float))
                                                and math.isfinite(embedding_scale) and embedding_scale > 0):
            raise ValueError(f"embedding_scale must be None (sqrt(d_model)) or a number > 0, got {embedding_scale!r}")
        if logit_softcap is not None and not (isinstance(logit_softcap, (int, float)) and logit_softcap > 0):
            raise ValueError(f"logit_softcap must be None or a number > 0, got {logit_softcap!r}")
        if d_embedding is not None and (not isinstance(d_embedding, int) or d_embedding < 1):
            raise ValueError(f"d_embedding must be None (d_model) or a positive int, got {d_embedding!r}")
        for name, value in (('registers', registers), ('memory_len', memory_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(kv_share, bool) or not isinstance(kv_share, int) or kv_share < 1:
            raise ValueError(f"kv_share must be an integer >= 1 (layers per shared key/value), got {kv_share!r}")
        if rope_scaling is not None and position != 'rope':
            raise ValueError(f"rope_scaling={rope_scaling!r} stretches rotary positions; position is {position!r}")
        if (isinstance(value_embeddings, bool) or not isinstance(value_embeddings, int)
                or not 0 <= value_embeddings <= (n_layers + 1) // 2):
            raise ValueError(f"value_embeddings must be an integer in 0..{(n_layers + 1) // 2} (tables, each shared "
                             f"by layer i and layer {n_layers - 1} - i), got {value_embeddings!r}")
        if value_embeddings:
            for name, value, unsupported in (('attention', attention, attention == 'linear'),
                                             ('kv_share', kv_share, kv_share != 1),
                                             ('memory_len', memory_len, memory_len != 0)):
                if unsupported:
                    raise ValueError(f"value_embeddings={value_embeddings} adds to each layer's own values: "
                                     f"{name}={value!r} is not supported with it")
        if memory_grad not in MEMORY_GRADS:
            raise ValueError(f"memory_grad={memory_grad!r}; expected one of: {', '.join(MEMORY_GRADS)}")
        self.n_vocab, self.max_len, self.d_model, self.n_layers = n_vocab, max_len, d_model, n_layers
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.layer_windows = resolve_layer_windows(layer_windows, sliding_window, n_layers)
        self.sliding_window = None if layer_windows is not None else sliding_window
        self.activation_checkpointing = activation_checkpointing
        self.kv_share, self.memory_len, self.memory_grad = kv_share, memory_len, memory_grad
        # the key/value store of each layer: its own (index into a cache's layers), or None (shares the first
        # layer's of its group of kv_share)
        self.kv_stores = [i // kv_share if i % kv_share == 0 else None for i in range(n_layers)]
        for i in range(n_layers):
            if self.layer_windows[i] != self.layer_windows[i - i % kv_share]:
                raise ValueError(f"layer_windows gives layer {i} another window than layer {i - i % kv_share}, "
                                 f"whose keys and values it shares (kv_share={kv_share})")

        d_embedding = d_model if d_embedding is None else d_embedding
        self.embedding = nn.Embedding(n_vocab, d_embedding)
        # the vocabulary's size in the table and head decoupled from d_model (LSWT): projections in and out
        self.embedding_in = nn.Linear(d_embedding, d_model, bias=False) if d_embedding != d_model else None
        self.embedding_out = nn.Linear(d_model, d_embedding, bias=False) if d_embedding != d_model else None
        self.position = pick(POSITIONS, 'position', position)(
            d_model=d_model, max_len=max_len, n_heads=n_heads, head_dim=self.head_dim,
            rope_base=rope_base, rope_fraction=rope_fraction, rope_scaling=rope_scaling, rope_scale=rope_scale)
        self.uses_bias = isinstance(self.position, ALiBiPosition)
        if memory_len and not self.relative_positions:
            raise ValueError(f"memory_len={memory_len} needs relative positions (rope, alibi or none): with "
                             f"position={position!r} the memory's keys have no position that means anything")
        self.embedding_dropout = _dropout(dropout, dropout_embedding)
        norm_cls = pick(NORMS, 'norm', norm)
        ffn_cls = pick(FEED_FORWARDS, 'ffn', ffn)
        ffn_options = dict(n_experts=n_experts, moe_top_k=moe_top_k, max_len=max_len, norm=norm_cls)
        ffn_options = {name: ffn_options[name] for name in getattr(ffn_cls, 'options', ())}
        kernel = pick(ATTENTIONS, 'attention', attention)
        self.linear = kernel is LinearAttention
        if self.linear:
            self._check_linear(position, sliding_window, registers, kv_share, layer_windows, memory_len)
        attention_cls = LinearAttention if self.linear else partial(Attention, kernel=kernel)
        block_cls = BLOCKS[bool(prenorm), bool(parallel_residual)]
        self.blocks = nn.ModuleList(
            block_cls(
                attention_cls(d_model, n_heads, n_kv_heads, dropout=dropout * dropout_attn,
                              qk_norm=qk_norm, norm=norm_cls, bias=bias, window=self.layer_windows[i],
                              registers=registers, kv_group=i // kv_share if kv_share > 1 else None,
                              shares_kv=self.kv_stores[i] is None),
                ffn_cls(d_model, d_ff, dropout=dropout * dropout_ffn, bias=bias, **ffn_options),
                norm_cls, d_model, dropout_residual=dropout * dropout_residual, bias=bias,
            ) for i in range(n_layers))
        # value embeddings (the modded-nanogpt speedrun): table j adds a vector per token to the values of layers
        # j and n_layers - 1 - j (shared as in a U-net)
        self.value_embeds = nn.ModuleList(nn.Embedding(n_vocab, n_kv_heads * self.head_dim)
                                          for _ in range(value_embeddings))
        self.value_layers = {}  # layer -> table
        for j in range(value_embeddings):
            self.value_layers[j] = self.value_layers[n_layers - 1 - j] = j
        for i, block in enumerate(self.blocks):
            block.attn.layer = i
        # U-net skips (the speedrun's): the output of layer i (first half) is added, times a learned weight, to
        # the input of layer n_layers - 1 - i (second half)
        self.skip_weights = nn.Parameter(torch.ones(n_layers // 2)) if unet_skips else None
        self.norm = norm_cls(d_model, bias=bias) if final_norm else nn.Identity()
        self.head = nn.Linear(d_embedding, n_vocab, bias=bias)
        self.head_qk = HeadQK(d_model, n_vocab, head_qk) if head_qk is not None else None
        stateful = [name for name, on in ((f"ffn={ffn!r}", hasattr(self.blocks[0].ffn, 'init_state')),
                                          ("head_qk", head_qk is not None)) if on]
        for name, value, default in (('attention', attention if self.linear else None, None),
                                     ('kv_share', kv_share, 1), ('layer_windows', layer_windows, None),
                                     ('memory_len', memory_len, 0)):
            if stateful and value != default:  # their per-slot cache state follows one cache layer per block
                raise ValueError(f"{stateful[0]} keeps per-token state beside the KV cache: {name}={value!r} is not "
                                 "supported with it")
        self.logit_softcap = None if logit_softcap is None else float(logit_softcap)
        self.embedding_scale = math.sqrt(d_model) if embedding_scale is None else float(embedding_scale)
        self.reset_parameters()
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    @staticmethod
    def _check_linear(position, sliding_window, registers, kv_share, layer_windows, memory_len):
        if position in ('alibi', 'learned'):
            raise ValueError(f"attention='linear' takes position 'rope', 'sinusoidal' or 'none', not {position!r} (a "
                             "linear layer has no score to bias, and its generation runs past max_len)")
        for name, value, default in (('sliding_window', sliding_window, None), ('registers', registers, 0),
                                     ('kv_share', kv_share, 1), ('layer_windows', layer_windows, None),
                                     ('memory_len', memory_len, 0)):
            if value != default:
                raise ValueError(f"attention='linear' keeps its whole context in a fixed-size state: {name}={value!r} "
                                 "is for softmax attention")

    def reset_parameters(self):
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.blocks:
            outputs = getattr(block.ffn, 'output_projections', lambda: [block.ffn.proj])()  # MoE: every expert's
            for proj in (block.attn.proj, *outputs):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.n_layers))
            if getattr(block.attn, 'registers', None) is not None:
                nn.init.normal_(block.attn.registers, mean=0.0, std=std)
        if self.skip_weights is not None:
            nn.init.ones_(self.skip_weights)

    @property
    def relative_positions(self) -> bool:
        """Whether positions reach the logits only through the distances between tokens (RoPE, ALiBi, none: no
        vector is added per position), so shifting every position of a sequence changes nothing and a KV
        cache may roll past ``max_len`` (see ``KVCache``)."""
        return type(self.position).embed is Position.embed

    @property
    def reach(self) -> int | None:
        """The most recent tokens that can reach the logits through the layers' sliding windows
        (``sum(window - 1) + 1``), or None when a layer sees every earlier token."""
        windows = self.layer_windows if any(w is not None for w in self.layer_windows) else \
            [self.sliding_window] * self.n_layers
        if any(w is None for w in windows):
            return None
        return sum(w - 1 for w in windows) + 1

    @property
    def context_len(self) -> int:
        """The context generation keeps per token: ``max_len``, plus the segment memory's ``memory_len``."""
        return self.max_len + self.memory_len

    def init_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None, *,
                   static: bool = False, kv_dtype: str | None = None, sink_tokens: int = 0,
                   window: int | None = None, kv_budget: int | None = None):
        """A fresh, zeroed KV cache for ``batch_size`` rows and ``max_len`` slots (default: the model's
        ``max_len``), on the model's device and dtype unless given. See ``KVCache`` for ``static``; the cache
        rolls past ``max_len`` when the model's positions are relative. Layers with their own sliding window
        (``layer_windows``) keep only that window; layers sharing keys and values share one cache.

        Compression (``xlabml.kvcache``): ``kv_dtype='int8'`` stores keys and values as int8 with per-token,
        per-head scales; ``sink_tokens`` + ``window`` keep the first and the most recent tokens only
        (StreamingLLM), and ``kv_budget`` keeps at most that many, evicting by cumulative attention score
        (H2O; ``window`` recent tokens are always kept): a bounded cache that never needs a new prefill."""
        weight = self.head.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        stores = [i for i in range(self.n_layers) if self.kv_stores[i] is not None]
        mixers = [(layer, block.ffn) for layer, block in enumerate(self.blocks) if hasattr(block.ffn, 'init_state')]
        if self.linear:
            if kv_dtype is not None or sink_tokens or window is not None or kv_budget is not None:
                raise ValueError("attention='linear' keeps a fixed-size state per layer, not a KV cache to compress "
                                 "(kv_dtype, sink_tokens, window, kv_budget)")
            return LinearStateCache(self.n_layers, batch_size, self.n_kv_heads, self.head_dim, device, dtype)
        if sink_tokens or window is not None or kv_budget is not None:
            from xlabml.kvcache import BoundedKVCache
            if any(self.layer_windows):
                raise ValueError("sink_tokens/window/kv_budget bound the cache of every layer; this model's "
                                 "layer_windows already bound some: use one or the other")
            if mixers or self.head_qk is not None:
                raise ValueError("sink_tokens/window/kv_budget evict cache slots; the SGU feed-forward and head-QK "
                                 "keep per-slot state that eviction does not follow")
            return BoundedKVCache(len(stores), batch_size, self.n_kv_heads, self.head_dim, sink_tokens=sink_tokens,
                                  window=window, kv_budget=kv_budget, device=device, dtype=dtype, kv_dtype=kv_dtype)
        max_len = max_len or self.max_len
        cache_cls = DecoderCache if mixers or self.head_qk is not None else KVCache
        cache = cache_cls(len(stores), batch_size, self.n_kv_heads, max_len, self.head_dim,
                          device=device, dtype=dtype, static=static, rolling=self.relative_positions,
                          reach=self.reach, kv_dtype=kv_dtype, windows=[self.layer_windows[i] for i in stores])
        for layer, ffn in mixers:  # read by Block.feed_forward (kv_share is 1 with these: one store per layer)
            cache.layers[layer].ffn_state = ffn.init_state(batch_size, max_len, device, dtype)
        if self.head_qk is not None:
            cache.head_qk = self.head_qk.init_state(batch_size, max_len, device, dtype)
        return cache

    def forward(self, x, positions=None, doc_ids=None, cache: KVCache | None = None, input_pos=None, *,
                last_only: bool = False, memory=None, return_hidden: bool = False):
        """Next-token logits (or, with ``return_hidden``, the final hidden states the head would read).

        Args:
            x: token ids, LongTensor (b, t).
            positions: position ids (b, t); default ``0..t-1``, or ``input_pos`` with a cache.
            doc_ids: document id of each token (b, t); tokens attend only to equal ids. Default: one document.
            cache: a ``KVCache`` from ``init_cache`` (inference only).
            input_pos: LongTensor (t,), strictly increasing cache indices of these tokens (same for all rows;
                index i lives in slot ``i % cache.max_len``, see ``KVCache``); required with a cache.
            last_only: compute logits for the last position only (b, 1, v): cheaper prefill/decode.
            memory: a ``xlabml.memory.SegmentMemory`` (training and evaluation on consecutive segments, the
                model's ``memory_len``): the keys and values of the row's previous tokens, updated in place;
                ``positions`` are then ignored (the memory's and the segment's tokens are numbered in order).
            return_hidden: return the final (normed) hidden states (b, t, c) instead of logits, for a loss that
                applies the head itself, a chunk of rows at a time (``xlabml.losses.linear_cross_entropy``).
        Returns:
            logits (b, t, v), or (b, 1, v) with ``last_only``; float of the model's dtype.
        """
        if memory is not None:
            h = memory.forward(self, x, doc_ids)  # b t c, the memory updated
        elif cache is None:
            ctx, positions = self._context(x, positions, doc_ids)
            h = self.hidden(x, positions, ctx)
        else:
            context = getattr(cache, 'context', None)  # a cache of another kind numbers its slots itself
            ctx, positions = (context(self, x, positions, doc_ids, input_pos) if context is not None else
                              self._cached_context(x, positions, doc_ids, cache, input_pos))
            h = self.hidden(x, positions, ctx, cache.layers)
        if self.head_qk is not None:  # its keys need every position's final hidden state
            keys = self.norm(h)
            h = keys[:, -1:] if last_only else keys
        else:
            if last_only:
                h = h[:, -1:]  # b 1 c
            h = self.norm(h)
        if self.embedding_out is not None:
            h = self.embedding_out(h)  # b t e
        if return_hidden:
            return h  # b t c | b t e
        logits = self.head(h)  # b t v
        if self.head_qk is not None:  # not with a memory (checked in __init__): ctx is this forward's
            state = getattr(cache, 'head_qk', None) if cache is not None else None
            copy = self.head_qk(keys[:, -h.size(1):], keys, x, ctx, state)  # b t v, float32
            logits = (logits.float() + copy).to(logits.dtype)
        if self.logit_softcap is not None:
            logits = softcap_logits(logits, self.logit_softcap).to(logits.dtype)
        return logits

    def hidden(self, x, positions, ctx, stores=None):
        """The blocks' output (b, t, c) for tokens ``x`` at ``positions`` (b, t) in attention context ``ctx``;
        ``stores``: each layer's key/value store (a cache's or the memory's layers, see ``kv_stores``)."""
        h = self.embedding(x) * self.embedding_scale  # b t c (b t e with d_embedding)
        if self.embedding_in is not None:
            h = self.embedding_in(h)  # b t c
        pos = self.position.embed(positions)  # float32 whatever the model's dtype
        if pos is not None:
            h = h + pos.to(h.dtype)
        h = self.embedding_dropout(h)
        ctx.rope = self.position.rotary(positions)
        if self.value_layers:  # once per forward: a recomputed (checkpointed) block reads the same entry
            tables = [table(x) for table in self.value_embeds]  # b t g*d each
            ctx.value_embeds = [tables[self.value_layers[i]] if i in self.value_layers else None
                                for i in range(self.n_layers)]
        recompute = self.activation_checkpointing and self.training
        half = len(self.skip_weights) if self.skip_weights is not None else 0
        skips = []
        for layer, (block, i) in enumerate(zip(self.blocks, self.kv_stores)):
            if layer >= self.n_layers - half:  # second half: the mirrored first-half layer's output
                h = h + self.skip_weights[self.n_layers - 1 - layer].to(h.dtype) * skips.pop()
            store = None if stores is None or i is None else stores[i]
            h = checkpoint(block, h, ctx, store, use_reentrant=False) if recompute else block(h, ctx, store)
            if layer < half:
                skips.append(h)
        return h

    def _context(self, x, positions, doc_ids):
        b, t = x.shape
        slots = torch.arange(t, device=x.device)  # t
        if positions is None:
            positions = slots.expand(b, t)
        window = self.sliding_window if self.sliding_window is not None and self.sliding_window < t else None
        plain = doc_ids is None and window is None and not self.uses_bias
        ctx = AttentionContext(kind='causal' if plain else 'explicit', q_slots=slots, k_slots=slots,
                               q_docs=doc_ids, k_docs=doc_ids, window=window, position=self.position,
                               doc_ids=doc_ids)
        return ctx, positions

    def _cached_context(self, x, positions, doc_ids, cache, input_pos):
        b, t = x.shape
        if input_pos is None:
            raise ValueError("a forward with a cache needs input_pos, the cache indices of the new tokens")
        if b != cache.batch_size:
            raise ValueError(f"batch of {b} rows but the cache holds {cache.batch_size}; use cache.reorder()")
        if positions is None:
            positions = input_pos.expand(b, t)
        size, window = cache.max_len, self.sliding_window
        if doc_ids is not None:
            cache.has_docs = True
        if cache.static:  # fixed shapes and no host reads: every slot, masked by the index it holds
            slots = input_pos % size
            last = input_pos[-1]
            k_slots = last - (last - torch.arange(size, device=x.device)) % size  # s, negative if unwritten
            lo, hi, kind = 0, size, 'explicit'
        else:
            ends = input_pos[::max(t - 1, 1)].tolist()  # one host read per forward, not per layer
            first, last = ends[0], ends[-1]
            if last < size:
                slots, k_slots = input_pos, None  # keys: slots lo..hi-1, which hold their own indices
                hi = last + 1
                lo = max(0, first - window + 1) if window is not None else 0
                if window is not None and window >= hi:
                    window = None
                if cache.has_docs or self.uses_bias:
                    kind = 'explicit'
                elif t == 1:
                    kind = 'all'  # one token sees every key in lo..hi-1: the prefix, or exactly its window
                elif first == 0 and hi == t and window is None:
                    kind = 'causal'
                else:
                    kind = 'explicit'
            else:  # past max_len: slot j holds the latest index <= last that is j modulo size
                if not cache.rolling:
                    raise ValueError(f"cache index {last} is past the cache's max_len={size}, and a model with "
                                     "absolute positions cannot roll its cache")
                if t > 1:
                    raise ValueError(f"{t} tokens at cache indices up to {last} (max_len={size}) would overwrite "
                                     "keys their own queries see; past max_len feed one token at a time")
                slots = input_pos % size
                k_slots = last - (last - torch.arange(size, device=x.device)) % size  # s
                lo, hi = 0, size
                if window is not None and window >= size:
                    window = None
                kind = 'explicit' if cache.has_docs or self.uses_bias or window is not None else 'all'
            cache.filled = max(cache.filled, hi)
        if doc_ids is not None:
            cache.doc_ids[:, slots] = doc_ids
        elif cache.has_docs:
            cache.doc_ids[:, slots] = 0
        q_docs = k_docs = None
        if cache.has_docs:
            q_docs = doc_ids if doc_ids is not None else torch.zeros_like(x)
            k_docs = cache.doc_ids[:, lo:hi]
        ctx = AttentionContext(kind=kind, q_slots=input_pos, k_slots=k_slots,
                               q_docs=q_docs, k_docs=k_docs, window=window, position=self.position,
                               input_pos=slots, lo=lo, hi=hi)
        return ctx, positions

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

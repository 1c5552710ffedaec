"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): ``model.attention: linear``.

Softmax's ``exp(q . k)`` becomes ``phi(q) . phi(k)`` with the feature map ``phi(x) = elu(x) + 1`` (positive), so a
causal layer's output for token i is

    y_i = phi(q_i) S_i / phi(q_i) . z_i,     S_i = sum_{j<=i} phi(k_j) v_j^T (d x d),   z_i = sum_{j<=i} phi(k_j)

followed by a norm per head (the model's norm over the head's d values, as in TransNormer: the denominator
alone leaves the output's scale drifting with the context, which makes training unstable). Training computes it
in chunks (quadratic inside a chunk of ``chunk_size`` tokens, the running ``S, z`` across chunks); decoding keeps
only ``S, z`` per layer and key/value head (``LinearStateCache``): O(1) per token and a state that never grows,
so generation goes on past ``max_len`` with no window. With ``position='rope'`` the rotation is applied to the
features of the numerator (``R_i phi(q_i) . R_j phi(k_j)`` depends on ``i - j`` only; RoFormer's linear form), the
denominator stays unrotated. Packed documents and padded rows are kept apart by document ids.

Shapes: ``b`` batch, ``g`` key/value heads, ``r`` query heads per key/value head, ``t`` tokens, ``d`` head size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlabml.attention import AttentionContext, apply_rotary

EPS = 1e-6  # keeps the denominator of a row that sees nothing (a pad) away from 0


def feature_map(x):
    """``elu(x) + 1``, computed in at least float32."""
    return F.elu(x.to(torch.promote_types(x.dtype, torch.float32))) + 1.0


def linear_attention(q, k, v, rope=None, state=None, docs=None, chunk_size=64):
    """Causal linear attention, chunked.

    Args:
        q: features phi(q), float32 (b g r t d); k: features phi(k) (b g t d); v: values (b g t e).
        rope: (cos, sin), each b 1 t d/2, to rotate the numerator's features, or None.
        state: (S (b g d e), z (b g d)) carried in (S made of rotated features with ``rope``), or None (zeros).
        docs: document ids (b t): token i sees token j only if they are equal; then one chunk spans the whole
            input (the running state would carry documents into each other).
    Returns:
        y (b g r t e) float32, and the state after the last token (the same tuple).
    """
    b, g, r, t, d = q.shape
    e = v.size(-1)
    s, z = state if state is not None else (q.new_zeros(b, g, d, e), q.new_zeros(b, g, d))
    rq, rk = q, k
    if rope is not None:  # rotary acts on (b h t d): fold the r query heads of a group into the batch of heads
        rq = apply_rotary(q.flatten(1, 2), *rope).view_as(q)
        rk = apply_rotary(k, *rope)
    v = v.to(q.dtype)
    size = t if docs is not None else chunk_size
    ys = []
    for c in range(0, t, size):
        sl = slice(c, c + size)
        n = min(size, t - c)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = causal if docs is None else causal & (docs[:, None, None, sl, None] == docs[:, None, None, None, sl])
        qc, rqc, kc, rkc, vc = q[..., sl, :], rq[..., sl, :], k[:, :, sl], rk[:, :, sl], v[:, :, sl]
        scores = (rqc @ rkc[:, :, None].transpose(-2, -1)).masked_fill(~mask, 0.0)  # b g r n n
        weights = (qc @ kc[:, :, None].transpose(-2, -1)).masked_fill(~mask, 0.0)
        num = scores @ vc[:, :, None] + rqc @ s[:, :, None]  # b g r n e
        den = weights.sum(-1, keepdim=True) + qc @ z[:, :, None, :, None]  # b g r n 1
        ys.append(num / (den + EPS))
        s = s + rkc.transpose(-2, -1) @ vc  # b g d e
        z = z + kc.sum(2)
    return torch.cat(ys, dim=3), (s, z)


class LinearAttention(nn.Module):
    """Causal linear attention with ``n_kv_heads`` key/value heads (module doc); the Decoder picks it for
    ``attention='linear'``. Its store in inference is a ``LinearState`` (a state, not a KV cache)."""

    def __init__(self, d_model, n_heads, n_kv_heads, *, dropout=0.0, qk_norm=False, norm=nn.LayerNorm, bias=True,
                 chunk_size=64, **_):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        d = self.head_dim
        self.fused_rows = {'qkv': (n_heads * d, n_kv_heads * d, n_kv_heads * d)}  # xlabml.roles.fused_rows
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm = norm(self.head_dim, bias=bias) if qk_norm else None
        self.k_norm = norm(self.head_dim, bias=bias) if qk_norm else None
        self.out_norm = norm(self.head_dim, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the output (no weights here)
        self.shares_kv, self.registers = False, None

    def forward(self, x, ctx: AttentionContext, kv_cache=None):  # x: b t c
        b, t, _ = x.shape
        h, g, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((h * d, g * d, g * d), dim=-1)
        q = q.view(b, t, g, h // g, d).permute(0, 2, 3, 1, 4)  # b g r t d
        k = k.view(b, t, g, d).transpose(1, 2)  # b g t d
        v = v.view(b, t, g, d).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = feature_map(q), feature_map(k)
        docs = ctx.q_docs
        if kv_cache is not None and docs is not None:  # padded rows: pads (doc -1) never enter the state
            keep = (docs >= 0)[:, None, :, None]
            k, v = k * keep, v * keep
            docs = None
        state = None if kv_cache is None else kv_cache.state
        y, state = linear_attention(q, k, v, rope=ctx.rope, state=state, docs=docs, chunk_size=self.chunk_size)
        if kv_cache is not None:
            kv_cache.state = state
        y = self.out_norm(y.to(x.dtype))  # b g r t d
        return self.dropout(self.proj(y.permute(0, 3, 1, 2, 4).reshape(b, t, h * d)))  # b t c


class LinearState(nn.Module):
    """One layer's recurrent state: ``s`` (b g d d, made of rotated features when the model uses RoPE) and ``z``
    (b g d), in at least float32."""

    def __init__(self, batch_size, n_kv_heads, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, head_dim, head_dim)
        dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        self.register_buffer('s', torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer('z', torch.zeros(shape[:-1], device=device, dtype=dtype), persistent=False)

    @property
    def state(self):
        return self.s, self.z

    @state.setter
    def state(self, value):
        s, z = value
        self.s.copy_(s)
        self.z.copy_(z)


class LinearStateCache(nn.Module):
    """The inference state of a linear-attention Decoder: a ``LinearState`` per layer, the same size for any
    context length (``unbounded``: generation never needs a new prefill). Forwards take cache indices
    (``input_pos``) like a KV cache's, only to keep the interface: the state has no slots."""
    rolling = unbounded = True
    static = False
    reach = None
    max_len = math.inf  # any number of tokens

    def __init__(self, n_layers, batch_size, n_kv_heads, head_dim, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(LinearState(batch_size, n_kv_heads, head_dim, device, dtype)
                                    for _ in range(n_layers))
        self.has_docs = False

    @property
    def batch_size(self):
        return self.layers[0].s.size(0)

    def context(self, decoder, x, positions, doc_ids, input_pos):
        b, t = x.shape
        if input_pos is None:
            raise ValueError("a forward with a cache needs input_pos, the cache indices of the new tokens")
        if b != self.batch_size:
            raise ValueError(f"batch of {b} rows but the cache holds {self.batch_size}; use cache.reorder()")
        if positions is None:
            positions = input_pos.expand(b, t)
        ctx = AttentionContext(kind='explicit', q_slots=input_pos, k_slots=None, q_docs=doc_ids,
                               position=decoder.position, input_pos=input_pos)
        return ctx, positions

    def reset_state(self):
        self.reset()

    def reset(self):
        for buffer in self.buffers():
            buffer.zero_()

    @torch.no_grad()
    def reorder(self, index):
        index = torch.as_tensor(index, dtype=torch.long, device=self.layers[0].s.device)
        for layer in self.layers:
            layer.s, layer.z = layer.s.index_select(0, index), layer.z.index_select(0, index)

    @torch.no_grad()
    def take(self, source, index):
        index = torch.as_tensor(index, dtype=torch.long, device=self.layers[0].s.device)
        if len(index) != self.batch_size:
            raise ValueError(f"cannot fill a state of {self.batch_size} rows from {len(index)} rows")
        for layer, other in zip(self.layers, source.layers):
            layer.s.copy_(other.s.index_select(0, index))
            layer.z.copy_(other.z.index_select(0, index))

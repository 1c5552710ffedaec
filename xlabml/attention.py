"""Causal self-attention and its KV cache: the per-forward ``AttentionContext`` (which keys each query may see),
the kernels that compute it (``ATTENTIONS``: SDPA, the flash_attn package, naive), the ``Attention`` layer and
the preallocated ``KVCache`` of cached inference. The attention rule they share is in ``xlabml.layers``.

Shapes: ``b`` batch, ``t`` new tokens, ``s`` key slots, ``h`` query heads, ``g`` key/value heads, ``d`` head
size, ``c`` model width.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F



def apply_rotary(x, cos, sin):
    """Rotate the first ``2 * cos.size(-1)`` dims of ``x`` (b h t d) by the angles in cos/sin (b 1 t r/2)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half].float(), x[..., half:2 * half].float(), x[..., 2 * half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1) if rest.size(-1) else rotated


class AttentionContext:
    """What every layer's attention needs for one forward, built once by the Decoder (not per layer).

    ``mask(dtype)`` builds the explicit mask lazily and once: a boolean ``b|1 1 t s`` (True = may attend) or,
    with ALiBi, an additive ``b|1 h t s`` float mask; it returns ``(None, True)`` on the plain-causal fast
    path and ``(None, False)`` when every key is visible (one new token over the filled cache prefix).

    Slots are absolute indices: the columns of the input in training, the cache indices in cached inference
    (``q_slots`` = ``input_pos``; ``k_slots`` = the index each read cache slot holds, negative where it holds
    nothing yet). ``input_pos`` here are the physical cache slots written (the indices modulo the cache size)."""

    def __init__(self, *, kind, q_slots, k_slots, q_docs=None, k_docs=None, window=None, position=None,
                 rope=None, input_pos=None, lo=0, hi=None, doc_ids=None):
        self.kind = kind  # 'causal' | 'all' | 'explicit'
        self.q_slots, self.k_slots = q_slots, k_slots  # t, s
        self.q_docs, self.k_docs = q_docs, k_docs  # b t, b s (or None)
        self.window, self.position, self.rope = window, position, rope
        self.input_pos, self.lo, self.hi = input_pos, lo, hi  # cache slots written, key range read
        self.doc_ids = doc_ids  # b t, for the flash varlen path
        self._masks = {}
        self._varlen = None

    @property
    def cached(self):
        return self.input_pos is not None

    def mask(self, dtype):
        if self.kind == 'causal':
            return None, True
        if self.kind == 'all':
            return None, False
        if dtype not in self._masks:
            self._masks[dtype] = self._build(dtype)
        return self._masks[dtype], False

    def _build(self, dtype):
        if self.k_slots is None:  # cached: slots lo..hi-1, built only when a mask is needed
            self.k_slots = torch.arange(self.lo, self.hi, device=self.q_slots.device)
        q, k = self.q_slots[:, None], self.k_slots[None, :]
        allowed = k <= q  # t s
        if self.cached:
            allowed = allowed & (k >= 0)  # slots not written since the cache was (re)filled
        if self.window is not None:
            allowed = allowed & (q - k < self.window)
        allowed = allowed[None]  # 1 t s
        if self.q_docs is not None:
            allowed = allowed & (self.q_docs[:, :, None] == self.k_docs[:, None, :])  # b t s
        bias = self.position.bias(self.q_slots, self.k_slots) if self.position is not None else None
        if bias is None:
            return allowed[:, None]  # b|1 1 t s
        return bias.masked_fill(~allowed[:, None], float('-inf')).to(dtype)  # b|1 h t s

    def varlen(self):
        """(cu_seqlens int32 (n+1,), longest document) of the flattened batch, for flash_attn_varlen_func:
        a new segment starts at each row start and at each doc id change."""
        if self._varlen is None:
            b, t = self.doc_ids.shape
            flat = self.doc_ids.flatten()  # b*t
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            starts[::t] = True
            idx = starts.nonzero().flatten()
            cu = torch.cat((idx, idx.new_tensor([b * t]))).to(torch.int32)
            self._varlen = cu, int((cu[1:] - cu[:-1]).max())
        return self._varlen


class SDPAKernel:
    """``F.scaled_dot_product_attention``: flash/memory-efficient kernels on GPU, fused kernel on CPU.
    GQA via ``enable_gqa`` (no copies of the key/value heads)."""

    def __call__(self, q, k, v, ctx, dropout_p):  # q: b h t d; k, v: b g s d
        mask, is_causal = ctx.mask(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                           enable_gqa=k.size(1) != q.size(1))
        return y, None  # b h t d


class NaiveKernel:
    """Explicit softmax(q k^T / sqrt(d)) v; slow, but returns the attention weights (b h t s)."""

    def __call__(self, q, k, v, ctx, dropout_p):
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # b h s d
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # b h t s
        mask, is_causal = ctx.mask(torch.float32)
        if is_causal:
            mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float('-inf')) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(dim=-1)
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
        return dropped.to(v.dtype) @ v, weights  # b h t d


class FlashKernel:
    """The ``flash_attn`` package (GPU, fp16/bf16): causal, sliding window and ALiBi natively, and packed
    documents through ``flash_attn_varlen_func`` without any dense mask. Inputs it cannot take (fp32, CPU, the
    KV cache) go through SDPA, which computes the same function."""

    def __init__(self):
        try:
            import flash_attn
        except ImportError:
            raise ValueError("attention='flash' needs the flash_attn package (pip install 'xlabml[flash]', "
                             "CUDA only); use attention='sdpa' instead") from None
        self.flash_attn = flash_attn
        self.fallback = SDPAKernel()

    def __call__(self, q, k, v, ctx, dropout_p):
        if ctx.cached or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            return self.fallback(q, k, v, ctx, dropout_p)
        window = (ctx.window - 1, 0) if ctx.window is not None else (-1, -1)
        slopes = ctx.position.slopes(q.device) if hasattr(ctx.position, 'slopes') else None  # ALiBi, float32
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # b t h d
        b, t, h, d = q.shape
        if ctx.doc_ids is None:
            y = self.flash_attn.flash_attn_func(q, k, v, dropout_p, causal=True, window_size=window,
                                                alibi_slopes=slopes)
        else:
            cu_seqlens, max_len = ctx.varlen()
            y = self.flash_attn.flash_attn_varlen_func(
                q.reshape(b * t, h, d), k.reshape(b * t, -1, d), v.reshape(b * t, -1, d), cu_seqlens, cu_seqlens,
                max_len, max_len, dropout_p, causal=True, window_size=window, alibi_slopes=slopes,
            ).view(b, t, h, d)
        return y.transpose(1, 2), None  # b h t d


ATTENTIONS = {'sdpa': SDPAKernel, 'flash': FlashKernel, 'naive': NaiveKernel}


class Attention(nn.Module):
    """Multi-head causal self-attention with ``n_kv_heads`` key/value heads (GQA; 1 = MQA), optional
    QK-norm and rotary encoding, and an optional per-layer KV cache for inference.

    With ``keep_weights = True`` and the naive backend, the last attention weights stay in ``self.weights``."""

    def __init__(self, d_model, n_heads, n_kv_heads, *, kernel=SDPAKernel, dropout=0.0, qk_norm=False,
                 norm=nn.LayerNorm, bias=True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm = norm(self.head_dim, bias=bias) if qk_norm else None
        self.k_norm = norm(self.head_dim, bias=bias) if qk_norm else None
        self.kernel = kernel()  # one of ATTENTIONS
        self.dropout = dropout
        self.keep_weights, self.weights = False, None

    def forward(self, x, ctx: AttentionContext, kv_cache=None):  # x: b t c
        b, t, _ = x.shape
        h, g, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((h * d, g * d, g * d), dim=-1)  # b t h*d, b t g*d, b t g*d
        q = q.view(b, t, h, d).transpose(1, 2)  # b h t d
        k = k.view(b, t, g, d).transpose(1, 2)  # b g t d
        v = v.view(b, t, g, d).transpose(1, 2)  # b g t d
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rotary(q, *ctx.rope), apply_rotary(k, *ctx.rope)
        if kv_cache is not None:
            k, v = kv_cache.update(ctx.input_pos, k, v, ctx.lo, ctx.hi)  # b g s d
        y, weights = self.kernel(q, k, v, ctx, self.dropout if self.training else 0.0)  # b h t d
        if self.keep_weights:
            self.weights = weights
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))  # b t c


class LayerKVCache(nn.Module):
    """One layer's preallocated keys and values (b g s d), written in place at the given slots."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer('k', torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer('v', torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots, k, v, lo, hi):  # k, v: b g t d -> b g s d (slots lo..hi-1, views)
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[:, :, lo:hi], self.v[:, :, lo:hi]


class KVCache(nn.Module):
    """The KV cache of a whole decoder: one ``LayerKVCache`` per block plus each slot's document id (so a
    left-padded batch works: pads get doc id -1, real tokens 0, and real tokens never see pads).

    Forwards write tokens at absolute cache indices (``input_pos``); index ``i`` lives in slot
    ``i % max_len``. Indices below ``max_len`` fill the cache; past it, a ``rolling`` cache (set for a model
    whose positions are relative: RoPE, ALiBi, none) keeps the most recent ``max_len`` indices, so decoding one
    token at a time, every layer attends to (at most) the last ``max_len`` tokens, without a re-prefill: the
    model run with a sliding window of ``max_len`` over the whole sequence. That equals a forward over the last
    ``max_len`` tokens alone only when nothing older can reach the logits: ``reach``, the most recent tokens
    that can (``n_layers * (sliding_window - 1) + 1`` for a model with a sliding window, None = all), is at most
    ``max_len``. A cache of a model with absolute positions refuses indices past ``max_len``.

    ``static=False`` (default) attends only over the written slots (with a sliding window, only the window):
    cheapest on CPU, but it reads ``input_pos`` on the host each forward. ``static=True`` always attends over
    all slots with a mask: fixed shapes and no host syncs, for ``torch.compile``/CUDA graphs (it cannot check
    indices on the host: feed it what a dynamic cache accepts)."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None,
                 static=False, rolling=False, reach=None):
        super().__init__()
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, n_kv_heads, max_len, head_dim, device, dtype) for _ in range(n_layers))
        self.register_buffer('doc_ids', torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
                             persistent=False)  # b s
        self.static, self.rolling, self.reach = static, rolling, reach
        self.reset_state()

    @property
    def batch_size(self):
        return self.doc_ids.size(0)

    @property
    def max_len(self):
        return self.doc_ids.size(1)

    def reset_state(self):
        # whether any forward gave doc ids (until then the doc mask is skipped; a static cache always masks, so
        # that padded and unpadded batches run the same graph), and the slots written so far (host-side)
        self.has_docs = self.static
        self.filled = self.max_len if self.static else 0

    def reset(self):
        """Empty the cache (zeros everywhere), keeping its buffers."""
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        self.doc_ids.zero_()
        self.reset_state()

    @torch.no_grad()
    def reorder(self, index):
        """Keep rows ``index`` (LongTensor (b',)) of every buffer, in that order; rows may repeat or vanish,
        so the batch size may change (beam search). The same batch size keeps the buffers (and their
        addresses), copying only the written slots."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.doc_ids.device)
        if len(index) != self.batch_size:
            for layer in self.layers:
                layer.k = layer.k.index_select(0, index)
                layer.v = layer.v.index_select(0, index)
            self.doc_ids = self.doc_ids.index_select(0, index)
            return
        n = self.filled
        for layer in self.layers:
            layer.k[:, :, :n] = layer.k[:, :, :n].index_select(0, index)
            layer.v[:, :, :n] = layer.v[:, :, :n].index_select(0, index)
        self.doc_ids[:, :n] = self.doc_ids[:, :n].index_select(0, index)

    @torch.no_grad()
    def take(self, source: 'KVCache', index):
        """Fill this cache's rows from ``source``'s: row i becomes source row ``index[i]`` (beam search copies
        each prompt's prefill into its beams). The caches must match in every dimension but the batch."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.doc_ids.device)
        if len(index) != self.batch_size or source.max_len != self.max_len or len(source.layers) != len(self.layers):
            raise ValueError(f"cannot fill a cache of {self.batch_size} rows x {self.max_len} slots from "
                             f"{len(index)} rows of a cache of {source.max_len} slots")
        n = source.filled
        for layer, other in zip(self.layers, source.layers):
            layer.k[:, :, :n] = other.k[:, :, :n].index_select(0, index)
            layer.v[:, :, :n] = other.v[:, :, :n].index_select(0, index)
        self.doc_ids[:, :n] = source.doc_ids[:, :n].index_select(0, index)
        self.has_docs, self.filled = self.has_docs or source.has_docs, max(self.filled, n)

"""Causal self-attention and its KV cache: the per-forward ``AttentionContext`` (which keys each query may see),
the kernels that compute it (``KERNELS``: SDPA, the flash_attn package, naive), the ``Attention`` layer and
the preallocated ``KVCache`` of cached inference. The attention rule they share is in ``xlabml.layers``.

Shapes: ``b`` batch, ``t`` new tokens, ``s`` key slots, ``h`` query heads, ``g`` key/value heads, ``d`` head
size, ``c`` model width.
"""

import copy
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
                 rope=None, input_pos=None, lo=0, hi=None, doc_ids=None, rope_k=None):
        self.kind = kind  # 'causal' | 'all' | 'explicit'
        self.q_slots, self.k_slots = q_slots, k_slots  # t, s
        self.q_docs, self.k_docs = q_docs, k_docs  # b t, b s (or None)
        self.window, self.position, self.rope = window, position, rope
        self.rope_k = rope_k  # keys' rotation where the keys are not the new tokens (segment memory), else None
        self.input_pos, self.lo, self.hi = input_pos, lo, hi  # cache slots written, key range read
        self.doc_ids = doc_ids  # b t, for the flash varlen path
        self.registers = 0  # learned key/value slots before the keys, visible to every query
        self.plain = True  # the keys are exactly the new tokens (what the flash kernel can take)
        self.needs_weights = False  # the attention weights must come back (an eviction policy reads them)
        self.shared = {}  # kv group -> (k, v, context) of its first layer, for the layers sharing them
        self.value_embeds = None  # per layer: b t g*d added to that layer's values, or None (Decoder.hidden)
        self._masks = {}
        self._derived = {}
        self._varlen = None

    def derive(self, key, **changes):
        """A context for some layers that differs in ``changes`` (a window, registers), made once per forward
        and kept under ``key``; it shares ``shared`` and builds its own masks."""
        if key not in self._derived:
            other = copy.copy(self)
            other.__dict__.update(changes, _masks={}, _derived={}, _varlen=None)
            self._derived[key] = other
        return self._derived[key]

    def for_window(self, window):
        """This context for a layer with its own sliding ``window`` (None: the model's)."""
        if window is None or window == self.window:
            return self
        return self.derive(('window', window), window=window, kind='explicit', plain=False)

    def with_registers(self, n):
        """This context with ``n`` register slots before the keys, visible to every query (no position)."""
        return self.derive(('registers', n), registers=n, kind='explicit', plain=False)

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
        mask = self._slot_mask(dtype)
        if not self.registers:
            return mask
        # register columns first: always visible (True), no position bias (0)
        front = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
        return torch.cat((front(*mask.shape[:-1], self.registers), mask), dim=-1)

    def _slot_mask(self, dtype):
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
        if ctx.cached or not ctx.plain or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
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


KERNELS = {'sdpa': SDPAKernel, 'flash': FlashKernel, 'naive': NaiveKernel}


class Attention(nn.Module):
    """Multi-head causal self-attention with ``n_kv_heads`` key/value heads (GQA; 1 = MQA), optional
    QK-norm and rotary encoding, and an optional per-layer key/value store: a KV cache in inference, the
    segment memory in Transformer-XL training.

    Per-layer variants: ``window`` (this layer's sliding window; None: the model's), ``registers`` (learned
    key/value slots every query may attend to, without position, as in LSWT), and cross-layer KV sharing: a
    layer with ``shares_kv`` projects queries only and attends to the keys and values of the first layer of
    its ``kv_group`` (which leaves them in ``ctx.shared``).

    With ``keep_weights = True`` and the naive backend, the last attention weights stay in ``self.weights``."""

    def __init__(self, d_model, n_heads, n_kv_heads, *, kernel=SDPAKernel, dropout=0.0, qk_norm=False,
                 norm=nn.LayerNorm, bias=True, window=None, registers=0, kv_group=None, shares_kv=False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.window, self.kv_group, self.shares_kv = window, kv_group, shares_kv
        n_kv = 0 if shares_kv else 2 * n_kv_heads
        self.qkv = nn.Linear(d_model, (n_heads + n_kv) * self.head_dim, bias=bias)
        d = self.head_dim  # the query, key and value projections' rows of qkv (xlabml.roles.fused_rows)
        self.fused_rows = {'qkv': (n_heads * d,) if shares_kv else (n_heads * d, n_kv_heads * d, n_kv_heads * d)}
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm = norm(self.head_dim, bias=bias) if qk_norm else None
        self.k_norm = norm(self.head_dim, bias=bias) if qk_norm and not shares_kv else None
        # registers: keys and values (2 g n d), initialised with the other weights (Decoder.reset_parameters)
        self.registers = nn.Parameter(torch.empty(2, n_kv_heads, registers, self.head_dim)) if registers else None
        self.kernel = kernel()  # one of KERNELS
        self.dropout = dropout
        self.keep_weights, self.weights = False, None
        self.layer = None  # this layer's index in the Decoder (its entry of ctx.value_embeds)

    def forward(self, x, ctx: AttentionContext, kv_cache=None):  # x: b t c
        b, t, _ = x.shape
        h, g, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.shares_kv:
            q = self.qkv(x).view(b, t, h, d).transpose(1, 2)  # b h t d
        else:
            q, k, v = self.qkv(x).split((h * d, g * d, g * d), dim=-1)  # b t h*d, b t g*d, b t g*d
            q = q.view(b, t, h, d).transpose(1, 2)  # b h t d
            k = k.view(b, t, g, d).transpose(1, 2)  # b g t d
            v = v.view(b, t, g, d).transpose(1, 2)  # b g t d
            embed = ctx.value_embeds[self.layer] if ctx.value_embeds is not None else None
            if embed is not None:  # value embeddings: the token's own vector added to its values
                v = v + embed.view(b, t, g, d).transpose(1, 2).to(v.dtype)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if ctx.rope is not None:
            q = apply_rotary(q, *ctx.rope)
        if self.shares_kv:
            k, v, kctx = ctx.shared[self.kv_group]
        else:
            kctx = ctx.for_window(self.window)
            if kv_cache is None:
                if ctx.rope is not None:
                    k = apply_rotary(k, *ctx.rope)
            else:  # the store rotates the keys it returns (before or after keeping them)
                k, v, kctx = kv_cache.keys(k, v, kctx)  # b g s d
            if self.kv_group is not None:
                ctx.shared[self.kv_group] = k, v, kctx
        if self.registers is not None:
            rk, rv = self.registers.to(k.dtype)  # g n d
            k = torch.cat((rk.expand(b, -1, -1, -1), k), dim=2)  # b g n+s d
            v = torch.cat((rv.expand(b, -1, -1, -1), v), dim=2)
            kctx = kctx.with_registers(self.registers.size(2))
        kernel = NAIVE if kctx.needs_weights else self.kernel
        y, weights = kernel(q, k, v, kctx, self.dropout if self.training else 0.0)  # b h t d
        if kctx.needs_weights and not self.shares_kv:
            kv_cache.observe(weights[..., kctx.registers:])
        if self.keep_weights:
            self.weights = weights
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))  # b t c


NAIVE = NaiveKernel()


class LayerKVCache(nn.Module):
    """One layer's preallocated keys and values (b g s d), written in place at the given slots."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer('k', torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer('v', torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def keys(self, k, v, ctx):
        """Rotates the new keys (b g t d), writes them and the values at the context's slots; returns the keys
        and values of the slots read (``ctx.lo`` .. ``ctx.hi - 1``) and the context."""
        if ctx.rope is not None:
            k = apply_rotary(k, *ctx.rope)
        k, v = self.update(ctx.input_pos, k, v, ctx.lo, ctx.hi)
        return k, v, ctx

    def update(self, slots, k, v, lo, hi):  # k, v: b g t d -> b g s d (slots lo..hi-1, views)
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[:, :, lo:hi], self.v[:, :, lo:hi]

    def reset(self):
        for buffer in self.buffers():
            buffer.zero_()

    def select_rows(self, index):
        """Keep rows ``index`` of every buffer (the batch size may change)."""
        for name, buffer in list(self._buffers.items()):
            setattr(self, name, buffer.index_select(0, index))

    def copy_rows(self, source, index, n):
        """Row i of slots ``:n`` becomes ``source``'s row ``index[i]`` (rows may repeat: a copy is taken first)."""
        for name, buffer in self._buffers.items():
            buffer[:, :, :n] = getattr(source, name)[:, :, :n].index_select(0, index)


class Int8LayerKVCache(LayerKVCache):
    """Keys and values stored as int8 with one float32 scale per (row, head, token): ``x ~ q * scale``,
    ``scale = max|x| / 127`` over the head's ``d`` values, symmetric, round to nearest.

    Why this format: a token is quantized when it is written, from its own values alone, so nothing is ever
    re-quantized as tokens arrive (per-channel scales, better for keys' outlier channels, need statistics over
    tokens that are not there yet); a scale per head follows each head's own range. Each token costs
    ``d + 4`` bytes per head and tensor instead of ``2 d`` (bf16) or ``4 d`` (fp32). Reads dequantize the slots
    attended to, in the model's dtype."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None):
        nn.Module.__init__(self)
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.dtype = dtype
        self.register_buffer('k', torch.zeros(shape, device=device, dtype=torch.int8), persistent=False)
        self.register_buffer('v', torch.zeros(shape, device=device, dtype=torch.int8), persistent=False)
        scales = (batch_size, n_kv_heads, max_len, 1)
        self.register_buffer('k_scale', torch.zeros(scales, device=device), persistent=False)
        self.register_buffer('v_scale', torch.zeros(scales, device=device), persistent=False)

    @staticmethod
    def quantize(x):  # b g t d -> int8 b g t d, float32 b g t 1
        x = x.float()
        scale = x.abs().amax(-1, keepdim=True) / 127.0
        q = torch.where(scale > 0, x / scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        return q.round_().clamp_(-127, 127).to(torch.int8), scale

    def update(self, slots, k, v, lo, hi):
        for name, x in (('k', k), ('v', v)):
            q, scale = self.quantize(x)
            getattr(self, name).index_copy_(2, slots, q)
            getattr(self, name + '_scale').index_copy_(2, slots, scale)
        return tuple((getattr(self, n)[:, :, lo:hi].float() * getattr(self, n + '_scale')[:, :, lo:hi]).to(self.dtype)
                     for n in ('k', 'v'))


class WindowLayerKVCache(nn.Module):
    """The cache of a layer with a sliding window of ``window`` tokens: a ring of the last ``window`` tokens'
    keys and values (b g w d), whatever the context length. A forward attends to the ring and the new tokens
    (one mask from the indices each holds), then writes the newest ``window`` of the new tokens into the
    ring; so prompts and chunks of any length work."""

    def __init__(self, batch_size, n_kv_heads, window, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.window = window
        self.register_buffer('k', torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer('v', torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer('docs', torch.zeros(batch_size, window, dtype=torch.long, device=device),
                             persistent=False)  # b w
        self.register_buffer('index', torch.full((window,), -1, dtype=torch.long, device=device),
                             persistent=False)  # w: the cache index each slot holds, -1 = none

    def reset_state(self):
        self.index.fill_(-1)

    def reset(self):
        for buffer in (self.k, self.v, self.docs):
            buffer.zero_()
        self.reset_state()

    def keys(self, k, v, ctx):
        if ctx.rope is not None:
            k = apply_rotary(k, *ctx.rope)
        b, t = k.size(0), k.size(2)
        new = ctx.q_slots  # t: cache indices of the new tokens
        docs = ctx.q_docs if ctx.q_docs is not None else torch.zeros(b, t, dtype=torch.long, device=k.device)
        keys = torch.cat((self.k, k.to(self.k.dtype)), dim=2)  # b g w+t d
        values = torch.cat((self.v, v.to(self.v.dtype)), dim=2)
        # a ring slot holding an index at or past the first new one is from an earlier pass (generation's new
        # prefill of a cropped window restarts at index 0): it holds nothing of this one
        held = torch.where(self.index < new[0], self.index, -1)  # w
        self.index.copy_(held)
        kctx = AttentionContext(kind='explicit', q_slots=new, k_slots=torch.cat((held, new)),
                                q_docs=docs, k_docs=torch.cat((self.docs, docs), dim=1), window=self.window,
                                position=ctx.position, input_pos=ctx.input_pos)
        n = min(t, self.window)  # the newest n new tokens stay
        slots = new[t - n:] % self.window
        self.k.index_copy_(2, slots, k[:, :, t - n:].to(self.k.dtype))
        self.v.index_copy_(2, slots, v[:, :, t - n:].to(self.v.dtype))
        self.docs.index_copy_(1, slots, docs[:, t - n:])
        self.index.index_copy_(0, slots, new[t - n:])
        return keys, values, kctx

    def select_rows(self, index):
        for name in ('k', 'v', 'docs'):
            setattr(self, name, getattr(self, name).index_select(0, index))

    def copy_rows(self, source, index, n):
        for name in ('k', 'v', 'docs'):
            getattr(self, name).copy_(getattr(source, name).index_select(0, index))
        self.index.copy_(source.index)


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

    ``kv_dtype='int8'`` stores keys and values as int8 (``Int8LayerKVCache``); ``windows`` gives a layer with its
    own sliding window a ring of that many slots instead (``WindowLayerKVCache``). ``layers`` holds one store per
    layer that owns keys and values (layers sharing them have none; see ``Decoder.kv_stores``).

    ``static=False`` (default) attends only over the written slots (with a sliding window, only the window):
    cheapest on CPU, but it reads ``input_pos`` on the host each forward. ``static=True`` always attends over
    all slots with a mask: fixed shapes and no host syncs, for ``torch.compile``/CUDA graphs (it cannot check
    indices on the host: feed it what a dynamic cache accepts)."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None,
                 static=False, rolling=False, reach=None, *, kv_dtype=None, windows=None):
        super().__init__()
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r}; expected one of {', '.join(map(str, KV_DTYPES))}")
        windows = windows or [None] * n_layers
        self.layers = nn.ModuleList(
            KV_DTYPES[kv_dtype](batch_size, n_kv_heads, max_len, head_dim, device, dtype) if w is None else
            WindowLayerKVCache(batch_size, n_kv_heads, min(w, max_len), head_dim, device, dtype) for w in windows)
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
        for layer in self.layers:
            if hasattr(layer, 'reset_state'):
                layer.reset_state()

    def reset(self):
        """Empty the cache (zeros everywhere), keeping its buffers."""
        for layer in self.layers:
            layer.reset()
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
                layer.select_rows(index)
            self.doc_ids = self.doc_ids.index_select(0, index)
            return
        n = self.filled
        for layer in self.layers:
            layer.copy_rows(layer, index, n)
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
            layer.copy_rows(other, index, n)
        self.doc_ids[:, :n] = source.doc_ids[:, :n].index_select(0, index)
        self.has_docs, self.filled = self.has_docs or source.has_docs, max(self.filled, n)


KV_DTYPES = {None: LayerKVCache, 'int8': Int8LayerKVCache}  # kv_dtype: how a cache stores keys and values

"""Bounded KV caches for generation of any length: attention sinks + a recent window (StreamingLLM, Xiao et al.
2023) and eviction by cumulative attention score (H2O, Zhang et al. 2023). ``Decoder.init_cache(...,
sink_tokens=S, window=W)`` or ``(..., kv_budget=B[, window=W, sink_tokens=S])``; the inference functions take
the same keywords.

A row's cache holds at most ``budget`` tokens per layer and key/value head: the row's first ``sink_tokens``
tokens, its last ``window`` tokens and (H2O) the tokens of the highest attention received so far, summed over
the steps and the query heads of the group (``kv_budget - sink_tokens - window`` of them). Each forward attends
over the kept tokens and the new ones, then keeps the best ``budget`` of both; so a prompt of any length and one
token at a time both work, with no new prefill ever.

Positions are the tokens' places in the cache, not in the text (StreamingLLM): keys are kept before rotation and
rotated at each step at their rank among the kept tokens of their row (0, 1, ...), and a new query sits right
after them; ALiBi measures the same ranks. So the model never sees a distance beyond ``budget``. Only relative
positions (RoPE, ALiBi, none) can be moved like this.

Shapes: ``b`` batch, ``g`` key/value heads, ``h`` query heads, ``n`` budget, ``t`` new tokens, ``s = n + t``
candidates, ``d`` head size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from xlabml.attention import AttentionContext, Int8LayerKVCache, apply_rotary

NEVER = torch.finfo(torch.float32).max  # priority of a token that always stays (a sink, a recent one)


class BoundedContext(AttentionContext):
    """A layer's context over its candidates: the mask (or ALiBi bias) is given, not built from slots."""

    def __init__(self, mask, position_bias=None, needs_weights=False):
        super().__init__(kind='explicit', q_slots=None, k_slots=None)
        self.plain, self.needs_weights = False, needs_weights
        self.given, self.bias = mask, position_bias  # b h t s (bool), b h t s (float) or None

    def _slot_mask(self, dtype):
        if self.bias is None:
            return self.given
        return self.bias.masked_fill(~self.given, float('-inf')).to(dtype)


class BoundedLayerKVCache(nn.Module):
    """One layer's kept tokens: keys before rotation and values (b g n d), and for each (b, g, slot) the cache
    index it holds (-1: none), its ordinal among the row's real tokens, and its cumulative attention score."""

    def __init__(self, batch_size, n_kv_heads, budget, head_dim, device=None, dtype=None, kv_dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, budget, head_dim)
        self.int8, self.dtype = kv_dtype == 'int8', dtype
        store = torch.int8 if self.int8 else dtype
        self.register_buffer('k', torch.zeros(shape, device=device, dtype=store), persistent=False)
        self.register_buffer('v', torch.zeros(shape, device=device, dtype=store), persistent=False)
        if self.int8:
            self.register_buffer('k_scale', torch.zeros(shape[:-1] + (1,), device=device), persistent=False)
            self.register_buffer('v_scale', torch.zeros(shape[:-1] + (1,), device=device), persistent=False)
        self.register_buffer('index', torch.full(shape[:-1], -1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer('ordinal', torch.zeros(shape[:-1], dtype=torch.long, device=device), persistent=False)
        self.register_buffer('score', torch.zeros(shape[:-1], device=device), persistent=False)
        self.policy = None  # set by BoundedKVCache
        self.pending = None

    def reset(self):
        for name, buffer in self._buffers.items():
            buffer.fill_(-1 if name == 'index' else 0)

    def _read(self, name):  # b g n d, in the model's dtype
        x = getattr(self, name)
        return (x.float() * getattr(self, name + '_scale')).to(self.dtype) if self.int8 else x

    def keys(self, k, v, ctx):
        """Attends over the kept tokens and the new ones (b g t d, before rotation): returns their keys rotated
        at their ranks, their values and the layer's context; then keeps the best ``budget`` of them (after the
        attention weights are in, for H2O)."""
        b, g, t, _ = k.shape
        info = ctx.bounded
        raw = torch.cat((self._read('k'), k.to(self.dtype)), dim=2)  # b g s d, before rotation
        values = torch.cat((self._read('v'), v.to(self.dtype)), dim=2)
        index = torch.cat((self.index, ctx.q_slots.expand(b, g, t)), dim=2)  # b g s
        ordinal = torch.cat((self.ordinal, info['ordinal'][:, None].expand(b, g, t)), dim=2)
        valid = torch.cat((self.index >= 0, info['valid'][:, None].expand(b, g, t)), dim=2)
        score = torch.cat((self.score, self.score.new_zeros(b, g, t)), dim=2)
        # each candidate's rank among its row's real ones, in order: its position in the cache
        rank = torch.where(valid, ordinal, torch.iinfo(torch.long).max).argsort(dim=-1, stable=True).argsort(dim=-1)
        keys = raw
        if ctx.rope is not None:
            cos, sin = ctx.position.rotary(rank.flatten(0, 1))  # (b g) 1 s r/2
            keys = apply_rotary(raw, cos.view(b, g, -1, cos.size(-1)), sin.view(b, g, -1, sin.size(-1)))
        h = info['heads']
        q_index = ctx.q_slots[None, None, :, None]  # 1 1 t 1
        allowed = valid[:, :, None, :] & (index[:, :, None, :] <= q_index)  # b g t s
        allowed = (allowed | (index[:, :, None, :] == q_index)).repeat_interleave(h // g, dim=1)  # b h t s
        bias = None
        slopes = getattr(ctx.position, 'slopes', None)
        if slopes is not None:  # ALiBi on the places in the cache
            slopes = slopes(k.device) if callable(slopes) else slopes  # h
            distance = info['positions'][:, None, :, None] - rank.repeat_interleave(h // g, 1)[:, :, None, :]
            bias = -slopes[None, :, None, None].float() * distance.float()  # b h t s
        self.pending = dict(k=raw, v=values, index=index, ordinal=ordinal, valid=valid, score=score,
                            total=info['total'])
        if self.policy != 'score':
            self._keep()
        return keys, values, BoundedContext(allowed, bias, needs_weights=self.policy == 'score')

    def observe(self, weights):
        """H2O: adds this step's attention (b h t s) to the candidates' scores (summed over the group's query
        heads and the new queries), then keeps the best."""
        b, g = self.index.shape[:2]
        self.pending['score'] = self.pending['score'] + weights.float().view(b, g, -1, *weights.shape[-2:]).sum((2, 3))
        self._keep()

    def _keep(self):
        """Keeps the ``budget`` candidates of highest priority: sinks and recent tokens first, then (H2O) the
        highest scores or (StreamingLLM) the most recent."""
        c, self.pending = self.pending, None
        ordinal, valid = c['ordinal'], c['valid']
        always = (ordinal < self.sinks) | (ordinal >= c['total'][:, None, None] - self.recent)
        priority = torch.where(always, NEVER, c['score'] if self.policy == 'score' else ordinal.float())
        kept = torch.where(valid, priority, -NEVER).topk(self.index.size(-1), dim=-1, sorted=False).indices  # b g n

        def gather(z):
            return z.gather(2, kept if z.dim() == 3 else kept[..., None].expand(-1, -1, -1, z.size(-1)))

        keep_valid = gather(valid)
        self.index.copy_(torch.where(keep_valid, gather(c['index']), -1))
        self.ordinal.copy_(gather(ordinal))
        self.score.copy_(torch.where(keep_valid, gather(c['score']), 0.0))
        for name in ('k', 'v'):
            x = gather(c[name])
            if self.int8:
                q, scale = Int8LayerKVCache.quantize(x)
                getattr(self, name).copy_(q)
                getattr(self, name + '_scale').copy_(scale)
            else:
                getattr(self, name).copy_(x)

    def select_rows(self, index):
        for name, buffer in list(self._buffers.items()):
            setattr(self, name, buffer.index_select(0, index))

    def copy_rows(self, source, index):
        for name, buffer in self._buffers.items():
            buffer.copy_(getattr(source, name).index_select(0, index))


class BoundedKVCache(nn.Module):
    """The bounded cache of a whole decoder (module doc): a ``BoundedLayerKVCache`` per layer with its own keys
    and values, and each row's count of real tokens seen. ``unbounded``: generation needs no window and no new
    prefill (the model's context is what the cache keeps)."""
    rolling = unbounded = True
    static = False
    reach = None

    def __init__(self, n_layers, batch_size, n_kv_heads, head_dim, *, sink_tokens=0, window=None, kv_budget=None,
                 device=None, dtype=None, kv_dtype=None):
        super().__init__()
        for name, value, low in (('sink_tokens', sink_tokens, 0), ('window', window, 1), ('kv_budget', kv_budget, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name}={value!r}; expected an integer >= {low}")
        if kv_dtype not in (None, 'int8'):
            raise ValueError(f"kv_dtype={kv_dtype!r}; expected None or 'int8'")
        if kv_budget is None:
            if window is None:
                raise ValueError(f"sink_tokens={sink_tokens} needs window, the recent tokens kept after the sinks")
            budget, policy = sink_tokens + window, 'recent'
        else:
            window = max(1, kv_budget // 2) if window is None else window
            budget, policy = kv_budget, 'score'
            if sink_tokens + window > kv_budget:
                raise ValueError(f"sink_tokens={sink_tokens} + window={window} exceed kv_budget={kv_budget}; the "
                                 "rest of the budget is for the tokens of highest attention")
        self.budget, self.sink_tokens, self.window, self.policy = budget, sink_tokens, window, policy
        self.layers = nn.ModuleList(
            BoundedLayerKVCache(batch_size, n_kv_heads, budget, head_dim, device, dtype, kv_dtype)
            for _ in range(n_layers))
        for layer in self.layers:
            layer.policy, layer.sinks, layer.recent = policy, sink_tokens, window
        self.register_buffer('total', torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.n_heads = None

    @property
    def batch_size(self):
        return self.total.size(0)

    @property
    def max_len(self):
        return self.budget

    def context(self, decoder, x, positions, doc_ids, input_pos):
        """The forward's context: each new token's ordinal among its row's real tokens and its place in the cache
        (the position its query is rotated at); doc ids < 0 mark pads, which are never kept."""
        b, t = x.shape
        if input_pos is None:
            raise ValueError("a forward with a cache needs input_pos, the cache indices of the new tokens")
        if b != self.batch_size:
            raise ValueError(f"batch of {b} rows but the cache holds {self.batch_size}; use cache.reorder()")
        if not decoder.relative_positions:
            raise ValueError("sink_tokens/window/kv_budget place tokens by their rank in the cache, which needs "
                             "relative positions (rope, alibi, none)")
        valid = doc_ids >= 0 if doc_ids is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
        seen = valid.long().cumsum(1)  # b t
        ordinal = self.total[:, None] + seen - 1
        positions = (self.total.clamp(max=self.budget)[:, None] + seen - 1).clamp(min=0)  # b t
        total = self.total + seen[:, -1]
        self.total.copy_(total)
        ctx = AttentionContext(kind='explicit', q_slots=input_pos, k_slots=None, position=decoder.position,
                               input_pos=input_pos)
        ctx.plain = False
        ctx.bounded = {'valid': valid, 'ordinal': ordinal, 'positions': positions, 'total': total,
                       'heads': decoder.n_heads}
        return ctx, positions

    def reset_state(self):
        self.reset()

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.total.zero_()

    @torch.no_grad()
    def reorder(self, index):
        index = torch.as_tensor(index, dtype=torch.long, device=self.total.device)
        for layer in self.layers:
            layer.select_rows(index)
        self.total = self.total.index_select(0, index)

    @torch.no_grad()
    def take(self, source: BoundedKVCache, index):
        index = torch.as_tensor(index, dtype=torch.long, device=self.total.device)
        if len(index) != self.batch_size or source.budget != self.budget:
            raise ValueError(f"cannot fill a cache of {self.batch_size} rows x {self.budget} tokens from {len(index)} "
                             f"rows of a cache of {source.budget}")
        for layer, other in zip(self.layers, source.layers):
            layer.copy_rows(other, index)
        self.total.copy_(source.total.index_select(0, index))

"""Transformer-XL segment recurrence (Dai et al. 2019): each layer also attends to the keys and values of the
previous ``memory_len`` tokens of the same batch row, kept across training (and evaluation) steps.

The data side (``xlabml.segments``) feeds consecutive segments of each row's token stream at consecutive steps.
A ``SegmentMemory`` holds, per layer with its own keys and values, the keys (before rotation) and values of the
row's last ``memory_len`` tokens and each one's document id. A forward attends over ``[memory; segment]``: the
memory's tokens sit at slots ``0 .. M-1`` and the segment's at ``M .. M+t-1``, numbered again at each step, so
only distances reach the logits (relative positions: RoPE, ALiBi or none; absolute ones are refused by the
Decoder). The usual rule holds on those slots: causal, same document (a document boundary, or a row whose
stream restarts, ``reset``, hides the memory), within the sliding window if any. So a segment's logits are those
of one long window whose first M tokens are the memory.

Gradients: ``memory_grad='none'`` keeps the memory detached (Transformer-XL). ``'recompute'`` (LSWT's KV
recompute) runs the previous segment again, with gradients, to make the memory the current segment attends to:
the loss reaches the weights through the memory's keys and values too, at about twice the forward cost.
"""
from __future__ import annotations

import torch

from xlabml.attention import AttentionContext, apply_rotary

EMPTY = -1  # document id of a memory slot that holds nothing (never equal to a real document's, >= 0)


class LayerMemory:
    """One layer's memory for one forward: the previous keys (unrotated) and values (b g M d); its ``keys``
    returns them followed by the new ones, rotated at their slots, and keeps the new ones."""

    def __init__(self, k, v):
        self.k, self.v, self.new = k, v, None

    def keys(self, k, v, ctx):
        self.new = k, v
        keys = torch.cat((self.k.to(k.dtype), k), dim=2)  # b g M+t d
        values = torch.cat((self.v.to(v.dtype), v), dim=2)
        if ctx.rope_k is not None:
            keys = apply_rotary(keys, *ctx.rope_k)
        return keys, values, ctx


class MemoryState:
    """Keys ``k[i]`` and values ``v[i]`` (b g M d) of each layer with its own, and document ids ``docs`` (b M)."""

    def __init__(self, k: list, v: list, docs):
        self.k, self.v, self.docs = k, v, docs

    @classmethod
    def empty(cls, decoder, batch_size, device):
        layers = sum(i is not None for i in decoder.kv_stores)
        shape = (batch_size, decoder.n_kv_heads, decoder.memory_len, decoder.head_dim)
        return cls([torch.zeros(shape, device=device) for _ in range(layers)],
                   [torch.zeros(shape, device=device) for _ in range(layers)],
                   torch.full((batch_size, decoder.memory_len), EMPTY, dtype=torch.long, device=device))

    def advance(self, new: list, docs, detach: bool) -> MemoryState:
        """The state after a segment: the last M of ``[memory; new]`` (keys, values, document ids)."""
        m = self.docs.size(1)
        cut = (lambda z: z.detach()) if detach else (lambda z: z)
        k = [cut(torch.cat((old.to(nk.dtype), nk), dim=2)[:, :, -m:]) for old, (nk, _) in zip(self.k, new)]
        v = [cut(torch.cat((old.to(nv.dtype), nv), dim=2)[:, :, -m:]) for old, (_, nv) in zip(self.v, new)]
        return MemoryState(k, v, torch.cat((self.docs, docs), dim=1)[:, -m:])

    def forget(self, rows) -> MemoryState:
        """This state with the rows where ``rows`` (b,) is True emptied."""
        return MemoryState(self.k, self.v, self.docs.masked_fill(rows[:, None], EMPTY))

    def detach(self) -> MemoryState:
        return MemoryState([k.detach() for k in self.k], [v.detach() for v in self.v], self.docs)

    def as_dict(self) -> dict:
        return {"k": [k.detach().cpu() for k in self.k], "v": [v.detach().cpu() for v in self.v],
                "docs": self.docs.cpu()}

    @classmethod
    def from_dict(cls, state: dict, device) -> MemoryState:
        return cls([k.to(device) for k in state["k"]], [v.to(device) for v in state["v"]], state["docs"].to(device))


def memory_context(decoder, x, docs, memory_docs) -> AttentionContext:
    """The attention context of a segment ``x`` (b t) after a memory of M slots: queries at slots M..M+t-1,
    keys at 0..M+t-1, the usual rule on those slots (``AttentionContext``), keys rotated at theirs."""
    b, t = x.shape
    m = memory_docs.size(1)
    q_slots = torch.arange(m, m + t, device=x.device)
    k_slots = torch.arange(m + t, device=x.device)
    ctx = AttentionContext(kind='explicit', q_slots=q_slots, k_slots=k_slots, q_docs=docs,
                           k_docs=torch.cat((memory_docs, docs), dim=1), window=decoder.sliding_window,
                           position=decoder.position, rope_k=decoder.position.rotary(k_slots.expand(b, m + t)))
    ctx.plain = False
    return ctx


class SegmentMemory:
    """The memory of one stream of segments (one per stage: training, validation, ...), kept across forwards.

    Use: ``decoder(x, doc_ids=doc_ids, memory=memory.segment(reset))`` for each consecutive segment, where
    ``reset`` (b,) marks rows whose stream starts afresh (the memory is forgotten there). Rows attend to memory
    tokens of their own document only (``doc_ids`` must number documents consistently across segments)."""

    def __init__(self, recompute: bool = False):
        self.recompute = recompute
        self.state: MemoryState | None = None
        self.previous = None  # recompute: (x, docs, the state before it) of the last segment
        self._reset = None

    def reset(self) -> None:
        """Forget everything (a new pass over the data)."""
        self.state, self.previous, self._reset = None, None, None

    def segment(self, reset=None) -> SegmentMemory:
        """Marks the rows (bool (b,)) whose next segment starts a new stream; returns the memory."""
        self._reset = reset
        return self

    def forward(self, decoder, x, doc_ids):
        """The blocks' output (b t c) for segment ``x`` after this memory, which then moves past the segment."""
        b, t = x.shape
        if not decoder.memory_len:
            raise ValueError("a segment memory needs a model with memory_len > 0")
        docs = doc_ids if doc_ids is not None else torch.zeros_like(x)
        if self.state is None or self.state.docs.shape[0] != b or self.state.docs.device != x.device:
            self.state, self.previous = MemoryState.empty(decoder, b, x.device), None
        state = self.state
        if self.recompute and decoder.training and torch.is_grad_enabled() and self.previous is not None:
            px, pdocs, pstate = self.previous  # the previous segment again, now with gradients
            state = pstate.advance(self._run(decoder, px, pdocs, pstate)[1], pdocs, detach=False)
        if self._reset is not None:
            state = state.forget(self._reset.to(x.device, torch.bool))
            self._reset = None
        h, new = self._run(decoder, x, docs, state)
        self.previous = (x, docs, state.detach()) if self.recompute else None
        self.state = state.advance(new, docs, detach=True)
        return h

    @staticmethod
    def _run(decoder, x, docs, state: MemoryState):
        ctx = memory_context(decoder, x, docs, state.docs)
        stores = [LayerMemory(k, v) for k, v in zip(state.k, state.v)]
        h = decoder.hidden(x, ctx.q_slots.expand(x.shape), ctx, stores)
        return h, [store.new for store in stores]

    def state_dict(self) -> dict:
        """What a checkpoint keeps for an exact resume (tensors on the CPU)."""
        if self.state is None:
            return {}
        out = {"state": self.state.as_dict()}
        if self.previous is not None:
            x, docs, state = self.previous
            out["previous"] = {"x": x.cpu(), "docs": docs.cpu(), "state": state.as_dict()}
        return out

    def load_state_dict(self, state: dict, device=None) -> None:
        self.reset()
        if state.get("state"):
            self.state = MemoryState.from_dict(state["state"], device)
        if state.get("previous"):
            p = state["previous"]
            self.previous = (p["x"].to(device), p["docs"].to(device), MemoryState.from_dict(p["state"], device))

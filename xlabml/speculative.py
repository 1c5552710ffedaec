"""Speculative decoding: a small draft model proposes tokens, the target model checks several in one forward.

Each round the draft model proposes up to `draft_tokens` tokens one at a time (cheap: a small model); the target
model then runs one forward over the last settled token and the drafts, which gives its logits at every drafted
position at about the price of one token (batch-1 decoding streams the weights once per forward, whatever the
number of tokens). The drafts are checked left to right against the target's distribution:

- greedy: a draft is kept while it equals the target's argmax; the first that does not is replaced by the
  target's argmax; when all are kept the target's logits after the last draft give one more token. The output
  is the target's greedy output, token for token.
- sampling (Leviathan et al. 2023; Chen et al. 2023): draft ``d`` drawn from the draft's distribution ``q`` is
  kept with probability ``min(1, p(d) / q(d))``; the first rejected one is replaced by a draw from the residual
  ``max(0, p - q)`` (normalised); when all are kept, one more token is drawn from ``p`` after the last draft.
  Every emitted token then has exactly the target's distribution ``p`` (after temperature, top-k, top-p, min-p,
  exclusions and the repetition penalty, applied alike to both models: ``inference._Chooser.distribution``).

So a round emits between 1 and `draft_tokens + 1` tokens for one target forward and `draft_tokens` draft steps;
the speed-up depends on how often the draft agrees with the target (``SpeculativeStats.acceptance_rate``).

KV caches: both models keep theirs across rounds (``xlabml.inference``'s caches, allocated once). Rejected drafts
are rewound by moving each model's cache index back: a cache attends only to the indices written since, so the
stale entries are overwritten before they are read. The draft model needs the target's tokenizer (the same ids)
and nothing else: any XLab checkpoint trained with it. `kv_dtype="int8"` stores both caches as int8
(``inference.cache_options``): a token is quantized when written, so rewinding is the same index move. The other
compressions (sinks + window, an eviction budget) drop or move tokens by what was written, which a rewind cannot
undo: speculative decoding does not take them.

Context windows: the target follows ``xlabml.inference``'s rules exactly (an exact sliding window of
`block_size` tokens by default; `context_keep` or `rolling` as there), so the output is the plain strategy's.
A round verifies only the drafts that fit in the target's current window without moving it; once the window is
full, the target continues one plain step at a time by those rules (re-prefilling the window, rolling, or
restarting at `context_keep` tokens, after which speculation resumes: with `context_keep`, rounds go on past
`block_size`). The draft's window restarts at half its block size when full (its exactness does not matter:
only how often it agrees).

Batches: each prompt of a batch is generated alone, one after the other (rows accept different numbers of drafts).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xlabml import inference
from xlabml.inference import Prompts
from xlabml.packed import prepacked

__all__ = ["speculative_sample", "speculative_greedy_search", "speculative_stream", "accept_drafts",
           "SpeculativeStats"]


@dataclass
class SpeculativeStats:
    """Counts of a speculative generation (added to across calls when the same object is passed again)."""

    rounds: int = 0  # target forwards that checked drafts
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    plain_steps: int = 0  # target steps without drafts (the window was full)
    tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the drafted tokens the target kept."""
        return self.accepted / self.drafted if self.drafted else 0.0


def accept_drafts(p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """The speculative sampling rule, for rows of drafts.

    Args:
        p: (b, k + 1, v) the target's probabilities at each drafted position, and after the last draft.
        q: (b, k, v) the draft's probabilities each drafted token was drawn from.
        drafted: (b, k) the drafted tokens.
        generator: for the uniform draws and the residual draw.
    Returns:
        (accepted, token): (b,) the number of leading drafts kept, and (b,) the token that follows them: a draw
        from ``max(0, p - q)`` at the first rejected position, or from ``p`` after the last draft when all are
        kept.
    """
    b, k = drafted.shape
    p_d = p[:, :k].gather(-1, drafted[..., None])[..., 0]  # b k
    q_d = q.gather(-1, drafted[..., None])[..., 0]  # b k, > 0: each draft was drawn from q
    u = torch.rand(b, k, generator=generator, device=p.device, dtype=p.dtype)
    kept = u * q_d < p_d  # with probability min(1, p/q)
    accepted = kept.int().cumprod(-1).sum(-1)  # b: leading drafts kept
    rows = torch.arange(b, device=p.device)
    target = p[rows, accepted]  # b v
    draft = torch.where((accepted < k)[:, None], q[rows, accepted.clamp(max=k - 1)], 0.0) if k else 0.0
    residual = (target - draft).clamp_(min=0)
    # the residual vanishes only where p == q, whose drafts are never rejected (up to rounding): draw from p there
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target)
    return accepted, inference._draw(residual, generator)[:, 0]


class _Context:
    """One model's KV cache over the text being generated (batch 1), by ``xlabml.inference``'s window rules.

    The cache holds ``text[start:end]`` at cache indices (and positions) 0, 1, ... A window that would grow
    past `block_size` restarts at the most recent `keep` tokens, prefilled again (`keep` = `block_size`: the
    exact sliding window), unless the cache is `rolling` (relative positions: it rolls past `block_size`, one
    token at a time)."""

    def __init__(self, model: nn.Module, cache, block_size: int, keep: int, rolling: bool, text: Tensor,
                 n_vocab: int, compile: bool | str = False):
        self.model, self.cache, self.block_size, self.keep, self.rolling = model, cache, block_size, keep, rolling
        self.text = text  # the shared token buffer (capacity,)
        self.n_vocab = n_vocab  # logits are cut or padded (-inf) to this many classes
        self.start = self.end = 0
        self.last_only = {"last_only": True} if inference._accepts(model.forward, "last_only") else {}
        # one-token steps through the compiled decode step (a static cache); longer feeds run eagerly
        self.decode = inference._decode_fn(model, compile, text.device) if compile else None
        self.index = torch.zeros(1, dtype=torch.long, device=text.device)  # updated in place: static for graphs

    def reset(self, start: int) -> None:
        """An empty cache whose window begins at ``text[start]``."""
        self.start = self.end = start

    def room(self, end: int) -> int:
        """How many tokens past ``text[:end]`` one forward can feed without moving the window."""
        return self.block_size - (end - self.start)

    def advance(self, end: int) -> Tensor:
        """Feeds ``text[self.end:end]`` by the window rules; returns the logits (v,) after ``text[end - 1]``."""
        fill, n = self.end - self.start, end - self.end
        if fill == 0:  # nothing cached (first use, or rewound before the window): prefill the window ending here
            self.reset(max(0, end - self.block_size))
        elif fill + n > self.block_size and not (self.rolling and n == 1):
            if self.rolling:  # past the cache's size it rolls one token at a time
                for i in range(self.end + 1, end):
                    self.advance(i)
                return self.advance(end)
            self.reset(end - self.keep)  # the window restarts at the most recent `keep` tokens
        return self._forward(end, last_only=True)[-1]

    def verify(self, end: int) -> Tensor:
        """Feeds ``text[self.end:end]``, which must fit the window (``room``); returns the logits (n, v) after
        each fed token."""
        if end - self.start > self.block_size:
            raise AssertionError(f"verify() to {end} past the window {self.start}+{self.block_size}")
        return self._forward(end, last_only=False)

    def rewind(self, end: int) -> None:
        """Forgets the text from `end` on (rejected drafts); before the window's start, or in a cache that has
        rolled (its slots of older tokens are overwritten), the next ``advance`` prefills afresh."""
        if end < self.start or (self.rolling and self.end - self.start > self.block_size):
            self.reset(end)
        else:
            self.end = min(self.end, end)

    def _forward(self, end: int, last_only: bool) -> Tensor:
        x = self.text[self.end:end][None]  # 1 t
        if self.decode is not None and end - self.end == 1 and last_only:
            self.index.fill_(self.end - self.start)
            logits = self.decode(self.model, x, self.index[None], self.cache, self.index).clone()  # 1 v
        else:
            index = torch.arange(self.end - self.start, end - self.start, device=x.device)  # t: cache indices
            logits = self.model(x, positions=index[None], cache=self.cache, input_pos=index,
                                **(self.last_only if last_only else {}))[0]  # t v
        self.end = end
        v = logits.shape[-1]
        if v > self.n_vocab:  # a draft with classes the target has not: never proposed
            logits = logits[:, :self.n_vocab]
        elif v < self.n_vocab:
            logits = torch.cat((logits, logits.new_full((logits.shape[0], self.n_vocab - v), -torch.inf)), -1)
        return inference._at_least_float32(logits)


def _n_vocab(model: nn.Module, prompt: Tensor) -> int:
    """The number of classes of the model's logits (from its settings, else from one forward)."""
    for value in (getattr(model, "n_vocab", None), getattr(getattr(model, "hparams", None), "get",
                                                          lambda _: None)("n_vocab")):
        if isinstance(value, int):
            return value
    return int(model(prompt[:1][None]).shape[-1])


def _steps(target, draft, prompt, output_length, block_size, draft_block_size, draft_tokens, keep, rolling,
           eos_class, choose_args, stats, compile, cache_options=None) -> Iterator[Tensor]:
    """Yields the tokens each round (or plain step) emits (1-D, a copy), until `output_length` tokens or one
    equal to `eos_class` (included: callers cut)."""
    device = prompt.device
    P = len(prompt)
    n_vocab = _n_vocab(target, prompt)
    text = torch.zeros(P + output_length + draft_tokens + 1, dtype=torch.long, device=device)
    text[:P] = prompt
    choose = inference._Chooser([prompt], n_vocab, **choose_args)
    with ExitStack() as stack:
        caches = [stack.enter_context(inference._borrowed_cache(m, 1, size, device, static, cache_options))
                  for m, size, static in ((target, block_size, False),
                                          (draft, draft_block_size, inference._static(compile, device)))]
        can_roll = bool(getattr(caches[0], "rolling", False))
        if rolling and not can_roll:
            raise ValueError("rolling=True needs a target model whose positions are relative (rope, alibi, none); "
                             "this model's are absolute: use context_keep to trade exactness for speed")
        reach = getattr(caches[0], "reach", None)
        rolls = rolling or (can_roll and keep is None and reach is not None and reach <= block_size)
        big = _Context(target, caches[0], block_size, block_size if keep is None else keep, rolls, text, n_vocab)
        small = _Context(draft, caches[1], draft_block_size, max(1, draft_block_size // 2), False, text, n_vocab,
                         compile)
        # the target's cache takes the prompt's window but its last token; each round feeds that one and the drafts
        big.reset(max(0, P - block_size))
        if big.start < P - 1:
            big.verify(P - 1)
        n = P  # tokens of text so far
        while n < P + output_length:
            k = min(draft_tokens, P + output_length - n - 1, big.room(n))
            if k <= 0:  # no draft fits the target's window, or one token is left: a plain step
                text[n] = choose(big.advance(n)[None])[0]
                emitted = text[n:n + 1]
                stats.plain_steps += 1
            else:
                emitted = _round(big, small, choose, n, k, stats)
            if choose.seen is not None:
                choose.seen[0, emitted] = True
            n += len(emitted)
            stats.tokens += len(emitted)
            yield emitted.clone()
            if eos_class is not None and bool((emitted == eos_class).any()):
                return


def _round(big: _Context, small: _Context, choose, n: int, k: int, stats) -> Tensor:
    """One round: k drafts after ``text[:n]``, checked by one target forward; writes the emitted tokens into the
    text and returns them (a view)."""
    text = big.text
    seen = None if choose.seen is None else choose.seen.expand(k + 1, -1).clone()  # b=k+1: row i has drafts < i
    q = []
    logits = small.advance(n)
    for i in range(k):
        row_seen = None if seen is None else seen[i:i + 1]
        if choose.greedy:
            token = choose.adjusted(logits[None], row_seen).argmax(-1)
        else:
            q.append(choose.distribution(logits[None], row_seen))
            token = inference._draw(q[-1], choose.generator)[:, 0]
        text[n + i] = token[0]
        if seen is not None:
            seen[i + 1:, token[0]] = True
        if i + 1 < k:
            logits = small.advance(n + i + 1)
    target_logits = big.verify(n + k)[-(k + 1):]  # k+1 v: after text[n-1], and after each draft
    drafted = text[n:n + k]
    if choose.greedy:
        best = choose.adjusted(target_logits, seen).argmax(-1)  # k+1
        accepted = int((best[:k] == drafted).int().cumprod(0).sum())
        token = best[accepted]
    else:
        p = choose.distribution(target_logits, seen)
        accepted, token = accept_drafts(p[None], torch.cat(q)[None], drafted[None], choose.generator)
        accepted, token = int(accepted[0]), token[0]
    text[n + accepted] = token
    big.rewind(n + accepted)  # the target keeps the accepted drafts; the new token is fed with the next drafts
    small.rewind(n + accepted)
    stats.rounds += 1
    stats.drafted += k
    stats.accepted += accepted
    return text[n:n + accepted + 1]


def _arguments(target, draft, output_length, block_size, context_keep, rolling, draft_tokens, draft_block_size,
               stats, choose_args, kv_dtype=None):
    inference._check_positive("output_length", output_length, allow_zero=True)
    inference._check_positive("draft_tokens", draft_tokens)
    keep = inference._window(block_size, context_keep, rolling)
    draft_block_size = block_size if draft_block_size is None else draft_block_size
    inference._check_positive("draft_block_size", draft_block_size)
    device = inference._model_device(target)
    if inference._model_device(draft) != device:
        raise ValueError(f"draft model on {inference._model_device(draft)}, target on {device}: put both on one "
                         "device")
    options = inference.cache_options(kv_dtype)
    return keep, draft_block_size, SpeculativeStats() if stats is None else stats, choose_args, device, options


def speculative_sample(target: nn.Module, draft: nn.Module, x: Prompts, output_length: int, block_size: int,
                       eos_class: int | None = None, exclude_classes: Sequence[int] | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, *, min_p: float | None = None,
                       repetition_penalty: float = 1.0, context_keep: int | None = None, rolling: bool = False,
                       draft_tokens: int = 4, draft_block_size: int | None = None,
                       stats: SpeculativeStats | None = None, compile: bool | str = False,
                       kv_dtype: str | None = None) -> Tensor | list[Tensor]:
    """Samples from `target` as ``inference.sample`` does, with `draft` proposing tokens (see the module doc).

    Args:
        target: the model whose distribution the output follows (any module with the model's inference
            interface, as for ``inference.sample``).
        draft: a smaller model with the same vocabulary (the same tokenizer).
        draft_tokens: the most tokens the draft proposes per round (k).
        draft_block_size: the draft's context window (default `block_size`; at most the draft's ``max_len``).
        stats: a ``SpeculativeStats`` to add this call's counts to (rounds, drafted, accepted tokens).
        compile: ``torch.compile`` the draft's one-token step (as ``inference.sample``'s `compile`): the draft's
            steps are many and small, where eager Python costs most; the target's forwards take several tokens
            and run eagerly.
        kv_dtype: ``"int8"`` stores both models' KV caches as int8 (``inference.cache_options``); the output is
            then the plain strategy's with the same `kv_dtype`.
        Other arguments as for ``inference.sample`` (temperature 0 or top_k 1: greedy).
    Returns:
        as ``inference.sample``: the new ids of one prompt (1-D), or a list of them for a batch.
    """
    keep, draft_block_size, stats, choose_args, device, options = _arguments(
        target, draft, output_length, block_size, context_keep, rolling, draft_tokens, draft_block_size, stats,
        dict(exclude_classes=exclude_classes, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
             repetition_penalty=repetition_penalty, generator=generator), kv_dtype)
    with inference._eval_mode(target), inference._eval_mode(draft, pack=not compile):
        prompts, batched = inference._prompts(x, device)
        outputs = []
        for p in prompts:
            chunks = list(_steps(target, draft, p, output_length, block_size, draft_block_size, draft_tokens, keep,
                                 rolling, eos_class, choose_args, stats, compile, options)) if output_length else []
            tokens = torch.cat(chunks) if chunks else p[:0]
            outputs.append(inference._cut(tokens[None], eos_class)[0][:output_length].clone())
    return outputs if batched else outputs[0]


def speculative_stream(target: nn.Module, draft: nn.Module, x: Tensor, output_length: int, block_size: int,
                       eos_class: int | None = None, exclude_classes: Sequence[int] | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, *, min_p: float | None = None,
                       repetition_penalty: float = 1.0, context_keep: int | None = None, rolling: bool = False,
                       draft_tokens: int = 4, draft_block_size: int | None = None,
                       stats: SpeculativeStats | None = None, compile: bool | str = False,
                       kv_dtype: str | None = None) -> Iterator[int]:
    """Like ``speculative_sample`` for one prompt `x` (t,), but yields each new id (an int) as soon as its round
    settles it, stopping before <eos>; the same ids as ``speculative_sample`` with the same arguments."""
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError("speculative_stream takes one prompt: a 1-D tensor of token ids")
    args = _arguments(target, draft, output_length, block_size, context_keep, rolling, draft_tokens,
                      draft_block_size, stats, dict(exclude_classes=exclude_classes, temperature=temperature,
                                                    top_k=top_k, top_p=top_p, min_p=min_p,
                                                    repetition_penalty=repetition_penalty, generator=generator),
                      kv_dtype)
    keep, draft_block_size, stats, choose_args, device, options = args
    if output_length == 0:
        return
    modes = target.training, draft.training
    target.eval(), draft.eval()
    try:
        with ExitStack() as stack:
            stack.enter_context(prepacked(target))  # spans the yields: packed weights are used only without autograd
            if not compile:  # inductor packs the compiled step's weights itself
                stack.enter_context(prepacked(draft))
            with torch.inference_mode():
                prompts, _ = inference._prompts(x, device)
                steps = _steps(target, draft, prompts[0], output_length, block_size, draft_block_size, draft_tokens,
                               keep, rolling, eos_class, choose_args, stats, compile, options)
            stack.callback(steps.close)  # hands the caches back when the caller stops early
            produced = 0
            while produced < output_length:
                with torch.inference_mode():  # not held across yields: the caller's code runs in between
                    chunk = next(steps, None)
                if chunk is None:
                    return
                for token in chunk.tolist()[:output_length - produced]:
                    if token == eos_class:
                        return
                    produced += 1
                    yield token
    finally:
        target.train(modes[0])
        draft.train(modes[1])


def speculative_greedy_search(target: nn.Module, draft: nn.Module, x: Prompts, output_length: int,
                              block_size: int, eos_class: int | None = None,
                              exclude_classes: Sequence[int] | None = None, *, context_keep: int | None = None,
                              rolling: bool = False, draft_tokens: int = 4,
                              draft_block_size: int | None = None, stats: SpeculativeStats | None = None,
                              compile: bool | str = False, kv_dtype: str | None = None) -> Tensor | list[Tensor]:
    """``inference.greedy_search``'s output, with `draft` proposing tokens; arguments as for
    ``speculative_sample``."""
    return speculative_sample(target, draft, x, output_length, block_size, eos_class, exclude_classes,
                              temperature=0.0, context_keep=context_keep,
                              rolling=rolling, draft_tokens=draft_tokens, draft_block_size=draft_block_size,
                              stats=stats, compile=compile, kv_dtype=kv_dtype)

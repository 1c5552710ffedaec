"""Text generation with the model's KV cache: greedy search, sampling (streaming too) and beam search.

Every strategy works on any module with the model's inference interface (an `XLabModel` or its `Decoder`):

    cache = model.init_cache(batch_size, max_len=block_size)
    logits = model(x, positions=positions, doc_ids=doc_ids, cache=cache, input_pos=input_pos)  # b t v
    cache.reorder(index)

A prompt is prefilled once, then each step feeds one token per row. A batch of prompts of different lengths is
left-padded: pads get doc id -1 so real tokens never see them, and each row gets its own positions.

Context window rule (the same for every strategy and every row, so a batched row equals its lone run): by
default the window slides exactly, as in nanoGPT's generate: every token is chosen from the logits of a forward
over the row's most recent `block_size` tokens alone, at positions 0, 1, ... Until a row's window is full, the
cache makes that one token's work per step. Once it is full, a deeper layer's cached keys of the oldest tokens
still carry what those tokens saw before the window, so exactness takes a new prefill of the window at every
step (a `block_size`-token forward per token), except where nothing older can reach the logits: a model with
relative positions (RoPE, ALiBi, none) and a sliding window with `n_layers * (sliding_window - 1) < block_size`
rolls its cache past `block_size` exactly, at one token's cost. Two trade-offs, for speed:

- `context_keep=k`: when feeding one more token would make the window longer than `block_size`, the window
  restarts at the most recent `k` tokens, which are prefilled again (`block_size // 2` costs about one
  prefilled token per generated token). Any model.
- `rolling=True` (relative positions only): the cache keeps its last `block_size` tokens and decoding goes on at
  one token's cost, every layer attending to the last `block_size` tokens: the model run with a sliding window
  of `block_size` over the whole text (after a prompt cut to its last `block_size` tokens), which sees further
  back than the crop through its deeper layers. A model trained on full windows may degrade once its first
  tokens leave the cache (the "attention sink" effect of StreamingLLM).

KV cache compression (`cache_options`; every strategy and batch): `kv_dtype="int8"` stores the cache in int8;
`sink_tokens` + `window` (StreamingLLM) and `kv_budget` (H2O: heavy hitters + recent) bound it, so generation
goes on at one token's cost for any length, the model seeing only the tokens kept (relative positions only).
A linear-attention model keeps a fixed-size state instead of a cache and never needs a window either.

Caches are allocated once per (model, batch size, block size, dtype, device) and reused by later calls
(`release_caches(model)` frees them), so `compile=True` compiles the one-token decode step once: prompts of
any length and any `output_length` reuse its graph (the prefill runs eagerly). Logits are chosen from in
float32 whatever the model's dtype; the KV cache has the model's dtype.
"""
from __future__ import annotations

import inspect
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from xlabml.packed import prepacked

__all__ = ["sample", "greedy_search", "beam_search", "generate_stream", "release_caches", "cache_options", "score",
           "GenerationBatch"]

Prompts = Tensor | Sequence[Tensor] | Sequence[Sequence[int]]


# ---------------------------------------------------------------------------------------------------------------
# arguments


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _prompts(x: Prompts, device: torch.device) -> tuple[list[Tensor], bool]:
    """Returns the prompts as a list of 1-D LongTensors on `device`, and whether `x` was a batch."""
    if isinstance(x, Tensor):
        if x.dim() == 1:
            prompts, batched = [x], False
        elif x.dim() == 2:
            prompts, batched = list(x.unbind(0)), True
        else:
            raise ValueError(f"prompt tensor has shape {tuple(x.shape)}; expected (t,) or (b, t)")
    elif isinstance(x, Sequence) and not isinstance(x, str):
        prompts, batched = [torch.as_tensor(p) for p in x], True
        if not prompts:
            raise ValueError("empty batch of prompts; expected at least one prompt")
    else:
        raise TypeError(f"prompt of type {type(x).__name__}; expected a tensor or a list of 1-D tensors")
    for i, p in enumerate(prompts):
        if p.dim() != 1:
            raise ValueError(f"prompt {i} has shape {tuple(p.shape)}; expected a 1-D tensor of token ids")
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty; expected at least one token (e.g. <sos>)")
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise ValueError(f"prompt {i} has dtype {p.dtype}; expected integer token ids")
    return [p.to(device=device, dtype=torch.long) for p in prompts], batched


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name}={value!r}; expected an integer >= {0 if allow_zero else 1}")


def _window(block_size: int, context_keep: int | None, rolling: bool = False) -> int | None:
    _check_positive("block_size", block_size)
    if context_keep is not None:
        _check_positive("context_keep", context_keep)
        if context_keep > block_size:
            raise ValueError(f"context_keep={context_keep} exceeds block_size={block_size}")
        if rolling:
            raise ValueError(f"context_keep={context_keep} and rolling=True exclude each other; choose one")
    return context_keep


def cache_options(kv_dtype: str | None = None, sink_tokens: int = 0, window: int | None = None,
                  kv_budget: int | None = None) -> dict:
    """The KV cache compression keywords given (those left at their defaults are left out, so any model's
    `init_cache` works without them):

    - `kv_dtype="int8"`: keys and values stored as int8 with one scale per token and head (`xlabml.attention`).
    - `sink_tokens=S, window=W`: keep the first S and the last W tokens of each row, placed by their rank in the
      cache (StreamingLLM; relative positions): generation of any length with a bounded cache, no new prefill.
    - `kv_budget=B`: keep at most B tokens: the last `window` (default B // 2), the first `sink_tokens`, and those
      of highest cumulative attention (H2O).

    Composable with every strategy and batch; `xlabml.kvcache` has the details."""
    if kv_dtype is not None and kv_dtype != "int8":
        raise ValueError(f"kv_dtype={kv_dtype!r}; expected None or 'int8'")
    for name, value, low in (("sink_tokens", sink_tokens, 0), ("window", window, 1), ("kv_budget", kv_budget, 1)):
        if value is not None:
            _check_positive(name, value, allow_zero=low == 0)
    if sink_tokens and window is None and kv_budget is None:
        raise ValueError(f"sink_tokens={sink_tokens} needs window (the recent tokens kept after the sinks) or "
                         "kv_budget")
    given = {"kv_dtype": kv_dtype, "sink_tokens": sink_tokens or None, "window": window, "kv_budget": kv_budget}
    return {k: v for k, v in given.items() if v is not None}


def _excluded(exclude_classes, n_vocab: int, device: torch.device) -> Tensor | None:
    if exclude_classes is None:
        return None
    index = torch.as_tensor(list(exclude_classes), dtype=torch.long).flatten().unique()
    if index.numel() == 0:
        return None
    if int(index.min()) < 0 or int(index.max()) >= n_vocab:
        raise ValueError(f"exclude_classes {index.tolist()} outside the vocabulary 0..{n_vocab - 1}")
    if index.numel() >= n_vocab:
        raise ValueError(f"exclude_classes exclude all {n_vocab} classes; at least one must remain")
    return index.to(device)


def _accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword `name` (optional extras of the model interface: `last_only`, `static`)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def _eval_mode(model: nn.Module, pack: bool = True):
    """Inference mode and eval mode (no dropout) for the duration, restoring the module's mode afterwards; on a
    CPU, linear layers multiply by packed weights (`xlabml.packed`) unless `pack` is false (a compiled decode
    step: inductor packs them itself)."""
    training = model.training
    model.eval()
    try:
        with torch.inference_mode(), (prepacked(model) if pack else nullcontext()):
            yield
    finally:
        model.train(training)


# ---------------------------------------------------------------------------------------------------------------
# caches and compiled decode steps, kept per model across calls


class _CacheEntry:
    def __init__(self, cache):
        self.cache, self.busy = cache, False


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> _CacheEntry)
_caches_lock = threading.Lock()
CACHES_PER_MODEL = 2  # e.g. a prompt batch's and its beams'; the least recently used beyond this is dropped


@contextmanager
def _borrowed_cache(model: nn.Module, batch_size: int, max_len: int, device: torch.device, static: bool,
                    options: dict | None = None):
    """The model's KV cache for this (batch size, length, dtype, device, static, compression `options`), emptied,
    for the duration: made on first use and kept for later calls (never in the model's state dict: it lives here,
    keyed weakly by the model). A cache in use (a stream still open, another thread) is not shared: a second user
    gets a new one."""
    options = options or {}
    key = (batch_size, max_len, _model_dtype(model), device, static, tuple(sorted(options.items())))
    with _caches_lock:
        entries = _caches.setdefault(model, OrderedDict())
        entry = entries.get(key)
        if entry is not None and not entry.busy:
            entries.move_to_end(key)
            entry.busy = True
        else:
            entry = None
    if entry is not None:
        _empty(entry.cache)
    else:
        extra = {"static": True} if static and _accepts(model.init_cache, "static") else {}
        if _accepts(model.init_cache, "dtype"):  # the activations' dtype: a quantized model's weights are integers
            extra["dtype"] = key[2]
        entry = _CacheEntry(model.init_cache(batch_size, max_len=max_len, device=device, **extra, **options))
        entry.busy = True
        with _caches_lock:
            entries = _caches.setdefault(model, OrderedDict())
            if key not in entries or not entries[key].busy:
                entries[key] = entry
                entries.move_to_end(key)
                for old in [k for k, e in entries.items() if not e.busy][:max(0, len(entries) - CACHES_PER_MODEL)]:
                    del entries[old]
    try:
        yield entry.cache
    finally:
        with _caches_lock:
            entry.busy = False
            entries = _caches.get(model)
            # a cache whose batch size changed (a model's own cache type reordered to another size) is not kept
            if entries is not None and getattr(entry.cache, "batch_size", batch_size) != batch_size:
                if entries.get(key) is entry:
                    del entries[key]


def _empty(cache) -> None:
    """Empties a reused cache. A dynamic `KVCache` never reads a slot the current call has not written, so
    forgetting what it holds suffices; a static one reads every slot (masked), so it is zeroed."""
    if getattr(cache, "static", True) is False and hasattr(cache, "reset_state"):
        cache.reset_state()
    elif hasattr(cache, "reset"):
        cache.reset()


def release_caches(model: nn.Module) -> None:
    """Frees the KV caches and compiled decode steps kept for `model` (made again on the next call)."""
    with _caches_lock:
        _caches.pop(model, None)
    _compiled.pop(model, None)


def _at_least_float32(logits: Tensor) -> Tensor:
    """Logits of a bfloat16/float16 model in float32 (choosing among them needs the precision); float64 stays."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _decode(model, x, positions, cache, input_pos):
    return _at_least_float32(model(x, positions=positions, cache=cache, input_pos=input_pos)[:, -1])


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {mode: (weights' key, step)}


def _weights_key(model: nn.Module) -> tuple:
    """What changes when any weight does: its storage or its version counter (in-place writes; a tensor made
    under inference mode has none)."""
    return tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in model.parameters())


def _decode_fn(model: nn.Module, compile: bool | str, device: torch.device) -> Callable:
    """The one-token decode step `(model, x, positions, cache, input_pos) -> logits (b, v)` (at least float32),
    compiled with static shapes: on a GPU with CUDA graphs ("reduce-overhead"), on a CPU by inductor with
    `freezing` (weights folded into the graph as constants, linear weights packed for MKL/oneDNN, the small
    ops between matmuls fused). A compile mode name picks another mode. One compiled step per model: its
    graphs never serve another model, and a change to the weights (in place or not) compiles it again, since
    frozen weights are copies."""
    if not compile:
        return _decode
    mode = compile if isinstance(compile, str) else ("reduce-overhead" if device.type == "cuda" else None)
    freeze = device.type == "cpu" and not isinstance(compile, str)
    steps = _compiled.setdefault(model, {})
    key = _weights_key(model) if freeze else None
    if mode not in steps or steps[mode][0] != key:
        # a new code object per compiled step: dynamo keeps its graphs per code object, so this model's graphs
        # never mix with another model's (nor count against their recompile limit)
        fn = type(_decode)(_decode.__code__.replace(), _decode.__globals__, "decode_step")
        compiled = torch.compile(fn, dynamic=False, **({"mode": mode} if mode else {}))
        if freeze:
            def step(*args, _compiled=compiled):
                # dynamo reads the flag while tracing, inductor while compiling: both happen inside a call
                with torch._inductor.config.patch(freezing=True):
                    return _compiled(*args)
        else:
            step = compiled
        steps[mode] = key, step
    return steps[mode][1]


def _mark_static(cache) -> None:
    """Tells dynamo that the cache's buffers keep their addresses, so CUDA graphs may write them in place."""
    buffers = getattr(cache, "buffers", None)
    for buffer in buffers() if callable(buffers) else ():
        torch._dynamo.mark_static_address(buffer)


def _static(compile: bool | str, device: torch.device) -> bool:
    # a static cache (attention over all its slots, masked) has fixed shapes and needs no host reads: what
    # compile wants, and what keeps a GPU's queue full; a CPU is faster attending to the filled slots only
    return bool(compile) or device.type != "cpu"


# ---------------------------------------------------------------------------------------------------------------
# the batch of rows being generated, and their KV cache


class _Rows:
    """The token histories of a batch of rows, the window of each row that the KV cache holds, and the cache.

    `tokens` holds every row's prompt right-aligned at column `prompt_len`, then the generated tokens, so that
    all rows end at the same column `end`; row i's window is its last `context[i]` tokens, at positions 0 ..
    context[i] - 1. The last prefill wrote the windows right-aligned at cache indices 0..n-1 (shorter windows
    preceded by pads of doc id -1); each step writes the next index. A rolling cache maps it into its
    `block_size` slots modulo, keeping the last `block_size` tokens (positions keep counting up: the model's
    are relative). Otherwise a full window restarts at its last `keep` tokens (default `block_size`: a full
    window at every step), prefilled again. See the module doc for when rolling is exact.
    """

    def __init__(self, model: nn.Module, prompts: list[Tensor], block_size: int, keep: int | None,
                 max_new: int, cache, compile: bool | str = False, rolling: bool = False):
        device = prompts[0].device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        self.model, self.block_size, self.cache = model, block_size, cache
        can_roll = bool(getattr(cache, "rolling", False))
        if rolling and not can_roll:
            raise ValueError("rolling=True needs a model whose positions are relative (rope, alibi, none); this "
                             "model's are absolute: use context_keep to trade exactness for speed")
        reach = getattr(cache, "reach", None)
        exact = can_roll and keep is None and reach is not None and reach <= block_size
        # a cache that bounds itself (a linear-attention state, sinks + window, a budget) never prefills again
        self.rolling = rolling or exact or getattr(cache, "unbounded", False)
        self.keep = block_size if keep is None else keep
        self.prompt_len = max(len(p) for p in prompts)
        self.tokens = torch.zeros(len(prompts), self.prompt_len + max_new, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.tokens[i, self.prompt_len - len(p):self.prompt_len] = p
        self.end = self.prompt_len
        self.context = lengths.clamp(max=block_size)  # b
        if compile and device.type == "cuda":
            _mark_static(cache)
        self.last_only = {"last_only": True} if _accepts(model.forward, "last_only") else {}
        self.fill = 0  # cache indices written since the last prefill
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # updated in place: static for graphs
        self.decode = _decode_fn(model, compile, device)
        self.compiled = bool(compile)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def prefill(self, width: int | None = None) -> Tensor:
        """Runs every row's window through the model from an empty cache, left-padded to `width` cache indices
        (default: the longest window's); returns the last logits (b, v)."""
        n = int(self.context.max()) if width is None else width
        x = self.tokens[:, max(0, self.end - n):self.end]  # b t
        if x.shape[1] < n:  # wider than every history: more pads
            x = torch.cat([x.new_zeros(x.shape[0], n - x.shape[1]), x], dim=1)
        index = torch.arange(n, device=x.device)
        positions = index - (n - self.context)[:, None]  # b t, negative on pad slots
        # doc ids only where rows are padded: without them the model's decode steps need no mask
        doc_ids = torch.where(positions >= 0, 0, -1) if bool((self.context < n).any()) else None
        logits = self.model(x, positions=positions.clamp(min=0), doc_ids=doc_ids, cache=self.cache,
                            input_pos=index, **self.last_only)
        self.fill = n
        return _at_least_float32(logits[:, -1])

    def step(self, token: Tensor) -> Tensor:
        """Appends one token per row (b,) and returns the next logits (b, v), float32 or float64."""
        self.tokens[:, self.end] = token
        self.end += 1
        if self.rolling or self.fill < self.block_size:
            self.input_pos.fill_(self.fill)
            positions = self.context[:, None]  # b 1: each new token follows its row's window
            logits = self.decode(self.model, token[:, None], positions, self.cache, self.input_pos)
            if self.compiled:
                logits = logits.clone()  # compiled graphs may reuse their output buffer
            self.context = self.context + 1
            self.fill += 1
            return logits
        grown = self.context + 1
        self.context = torch.where(grown > self.block_size, self.keep, grown)
        return self.prefill()

    def reorder(self, index: Tensor, cache=None) -> None:
        """Keeps/duplicates rows: row i becomes old row index[i] (the batch size may change). With `cache` (of
        the new batch size), the rows are copied into it, which then replaces the current cache."""
        self.tokens = self.tokens[index]
        self.context = self.context[index]
        if cache is not None and hasattr(cache, "take"):
            cache.take(self.cache, index)
            self.cache = cache
        else:
            self.cache.reorder(index)


# ---------------------------------------------------------------------------------------------------------------
# choosing the next token


class _Chooser:
    """Turns logits (b, v) into next tokens (b,) on the device, without host synchronisation.

    Order: excluded classes, repetition penalty, temperature, top-k, top-p, min-p, then a draw. Temperature 0 or
    top_k 1 is greedy (argmax).
    """

    def __init__(self, prompts: list[Tensor], n_vocab: int, exclude_classes=None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, generator: torch.Generator | None = None):
        device = prompts[0].device
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature!r}; expected a finite number >= 0")
        if top_k is not None:
            _check_positive("top_k", top_k)
        if top_p is not None and not (0 < top_p <= 1):
            raise ValueError(f"top_p={top_p!r}; expected 0 < top_p <= 1")
        if min_p is not None and not (0 <= min_p <= 1):
            raise ValueError(f"min_p={min_p!r}; expected 0 <= min_p <= 1")
        if not (isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={repetition_penalty!r}; expected a number > 0")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator on {generator.device}; expected one on the model's device {device}")
        self.excluded = _excluded(exclude_classes, n_vocab, device)
        self.greedy = temperature == 0 or top_k == 1
        self.temperature = float(temperature)
        self.top_k = None if top_k is None or top_k >= n_vocab else top_k
        self.top_p = None if top_p is None or top_p >= 1 else float(top_p)
        self.min_p = min_p or None
        self.generator = generator
        self.penalty = float(repetition_penalty)
        self.seen = None
        if self.penalty != 1.0:  # b v: classes already in a row's prompt or output
            self.seen = torch.zeros(len(prompts), n_vocab, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                self.seen[i, p] = True

    def __call__(self, logits: Tensor) -> Tensor:
        logits = self.adjusted(logits)
        if self.greedy:
            token = logits.argmax(-1)
        else:
            token = self._draw(logits if self.temperature == 1.0 else logits / self.temperature)
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        return token

    def adjusted(self, logits: Tensor, seen: Tensor | None = None) -> Tensor:
        """Logits (b, v) in float32 with the excluded classes and the repetition penalty applied; `seen` (b, v)
        replaces the rows' own record of the classes already generated (speculative decoding's positions)."""
        logits = logits.float()
        if self.excluded is not None:
            logits = logits.index_fill(-1, self.excluded, -math.inf)
        seen = self.seen if seen is None else seen
        if seen is not None:  # CTRL-style: shrink the logits of seen classes towards less likely
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(seen, penalised, logits)
        return logits

    def distribution(self, logits: Tensor, seen: Tensor | None = None) -> Tensor:
        """The probabilities (b, v) that the next token is drawn with, over the whole vocabulary (one-hot at the
        argmax when greedy); `seen` as for `adjusted`."""
        logits = self.adjusted(logits, seen)
        if self.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs, index = self._candidates(logits if self.temperature == 1.0 else logits / self.temperature)
        if index is not None:
            probs = torch.zeros_like(logits).scatter_(-1, index, probs)
        return probs / probs.sum(-1, keepdim=True)

    def _draw(self, logits: Tensor) -> Tensor:
        probs, index = self._candidates(logits)
        choice = _draw(probs, self.generator)  # b 1
        if index is not None:
            choice = index.gather(-1, choice)
        return choice[:, 0]

    def _candidates(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """Unnormalised probabilities of the candidates after top-k, top-p and min-p, and their classes when the
        candidates are a sorted subset of the vocabulary (else None: the columns are the classes)."""
        index = None
        if self.top_k is not None:
            logits, index = logits.topk(self.top_k, dim=-1)  # b k, sorted
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None:  # keep the smallest prefix whose mass reaches top_p (always the first)
            if index is None:
                probs, index = self._sorted(probs)
            before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(before >= self.top_p, 0.0)
        if self.min_p is not None:
            top = probs[:, :1] if index is not None else probs.amax(-1, keepdim=True)
            probs = probs.masked_fill(probs < self.min_p * top, 0.0)
        return probs, index

    def _sorted(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Probabilities sorted in descending order, with their classes; only as many as top-p can keep."""
        if probs.device.type == "cpu" and probs.shape[-1] > 4 * _NUCLEUS_PROBE:
            # a full sort of a large vocabulary costs a CPU far more than the forward; the nucleus of a trained
            # model is nearly always within the most likely few hundred classes (checking costs a host read,
            # which a CPU does not mind)
            top, index = probs.topk(_NUCLEUS_PROBE, dim=-1)
            if bool((top.sum(-1) >= self.top_p).all()):
                return top, index
        return probs.sort(dim=-1, descending=True)


_NUCLEUS_PROBE = 256


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row from unnormalised probabilities (b, n) -> indices (b, 1), by inverting the cumulative
    sum at a uniform point: an order of magnitude cheaper than torch.multinomial on a CPU, no host sync, and a
    class of zero mass is never drawn (its cumulative sum equals its predecessor's)."""
    cdf = probs.cumsum(-1)  # b n, non-decreasing
    total = cdf[:, -1:]
    point = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    point = torch.minimum(point, torch.nextafter(total, torch.zeros_like(total)))  # stays below the last step
    return torch.searchsorted(cdf, point, right=True).clamp_(max=probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------------------------
# greedy search and sampling


def _token_steps(model, prompts, output_length, block_size, keep, rolling, choose_args, eos_class, compile, cache
                 ) -> Iterator[Tensor]:
    """Yields the next token of every row (b,) per step; stops after `output_length` steps or when every row
    has produced `eos_class`. Rows keep going after their own <eos>; callers cut them."""
    rows = _Rows(model, prompts, block_size, keep, output_length, cache, compile, rolling)
    logits = rows.prefill()
    choose = _Chooser(prompts, logits.shape[-1], **choose_args)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    sync_every = 1 if logits.device.type == "cpu" else 8  # a host sync stalls a GPU queue; a CPU has none
    for t in range(output_length):
        token = choose(logits)
        yield token
        if eos_class is not None:
            finished |= token == eos_class
            if (t + 1) % sync_every == 0 and bool(finished.all()):
                return
        if t + 1 < output_length:
            logits = rows.step(token)


def _cut(tokens: Tensor, eos_class: int | None) -> list[Tensor]:
    """Rows of (b, t) up to (excluding) their first <eos>."""
    if eos_class is None:
        return list(tokens.unbind(0))
    is_eos = tokens == eos_class
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), tokens.shape[1]).tolist()
    return [row[:n] for row, n in zip(tokens.unbind(0), lengths)]


def _generate(model, x, output_length, block_size, eos_class, context_keep, rolling, compile, cache_options,
              **choose_args):
    _check_positive("output_length", output_length, allow_zero=True)
    keep = _window(block_size, context_keep, rolling)
    with _eval_mode(model, pack=not compile):
        prompts, batched = _prompts(x, _model_device(model))
        if output_length == 0:
            tokens = torch.zeros(len(prompts), 0, dtype=torch.long, device=prompts[0].device)
        else:
            device = prompts[0].device
            with _borrowed_cache(model, len(prompts), block_size, device, _static(compile, device),
                                 cache_options) as cache:
                steps = list(_token_steps(model, prompts, output_length, block_size, keep, rolling, choose_args,
                                          eos_class, compile, cache))
            tokens = torch.stack(steps, dim=1)  # b t
        outputs = [row.clone() for row in _cut(tokens, eos_class)]
    return outputs if batched else outputs[0]


def sample(model: nn.Module, x: Prompts, output_length: int, block_size: int, eos_class: int | None = None,
           exclude_classes: Sequence[int] | None = None, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None, *, min_p: float | None = None,
           repetition_penalty: float = 1.0, context_keep: int | None = None, rolling: bool = False,
           compile: bool | str = False, kv_dtype: str | None = None, sink_tokens: int = 0,
           window: int | None = None, kv_budget: int | None = None) -> Tensor | list[Tensor]:
    """Samples up to `output_length` new tokens after each prompt.

    Args:
        model: module with the model's forward/`init_cache` interface (an `XLabModel` or its `Decoder`).
        x: one prompt, a 1-D LongTensor of ids (t,); or a batch: a 2-D tensor (b, t) or a list of 1-D tensors
            of any lengths.
        output_length: the most tokens to generate per prompt.
        block_size: the longest context the model sees (normally the model's `max_len`); see the module doc.
        eos_class: a row stops at this id, which is not included in its output.
        exclude_classes: ids never generated.
        temperature: divides the logits; 0 means greedy.
        top_k: draw among the k most likely classes (1 means greedy).
        top_p: draw among the most likely classes whose probability mass reaches top_p (nucleus).
        generator: a `torch.Generator` on the model's device, for reproducible draws.
        min_p: drop classes less likely than `min_p` times the most likely one.
        repetition_penalty: > 1 makes classes already in the prompt or output less likely (logits divided by
            it when positive, multiplied when negative).
        context_keep: when given, a full window restarts at its most recent `context_keep` tokens (faster, not
            exact; see the module doc). Default: an exact sliding window of `block_size` tokens.
        rolling: past `block_size`, roll the KV cache instead (relative positions only; one token's cost per
            step, not exact; see the module doc).
        compile: `torch.compile` the one-token decode step (True, or a compile mode name); compiled once per
            model and batch size, whatever the prompt lengths and `output_length` (the prefill stays eager).
            Pays off on a GPU; on a CPU see `bench/generate.py`.
        kv_dtype, sink_tokens, window, kv_budget: KV cache compression (see `cache_options`).

    Returns:
        the new ids (1-D LongTensor, without the prompt and without <eos>) for a 1-D `x`; for a batch, a list of
        such tensors, one per prompt.
    """
    return _generate(model, x, output_length, block_size, eos_class, context_keep, rolling, compile,
                     cache_options(kv_dtype, sink_tokens, window, kv_budget),
                     exclude_classes=exclude_classes, temperature=temperature, top_k=top_k, top_p=top_p,
                     min_p=min_p, repetition_penalty=repetition_penalty, generator=generator)


def greedy_search(model: nn.Module, x: Prompts, output_length: int, block_size: int, eos_class: int | None = None,
                  exclude_classes: Sequence[int] | None = None, *, context_keep: int | None = None,
                  rolling: bool = False, compile: bool | str = False, kv_dtype: str | None = None,
                  sink_tokens: int = 0, window: int | None = None, kv_budget: int | None = None
                  ) -> Tensor | list[Tensor]:
    """Generates the most likely next token at each step (argmax); arguments and result as for `sample`."""
    return _generate(model, x, output_length, block_size, eos_class, context_keep, rolling, compile,
                     cache_options(kv_dtype, sink_tokens, window, kv_budget),
                     exclude_classes=exclude_classes, temperature=0.0)


def generate_stream(model: nn.Module, x: Tensor, output_length: int, block_size: int,
                    eos_class: int | None = None, exclude_classes: Sequence[int] | None = None,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, *, min_p: float | None = None,
                    repetition_penalty: float = 1.0, context_keep: int | None = None, rolling: bool = False,
                    compile: bool | str = False, kv_dtype: str | None = None, sink_tokens: int = 0,
                    window: int | None = None, kv_budget: int | None = None) -> Iterator[int]:
    """Like `sample` for one prompt `x` (t,), but yields each new id (an int) as soon as it is chosen, stopping
    before <eos>. Use temperature=0 for greedy search. The result equals `sample`'s with the same arguments."""
    _check_positive("output_length", output_length, allow_zero=True)
    keep = _window(block_size, context_keep, rolling)
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError("generate_stream takes one prompt: a 1-D tensor of token ids")
    choose_args = dict(exclude_classes=exclude_classes, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty, generator=generator)
    options = cache_options(kv_dtype, sink_tokens, window, kv_budget)
    training = model.training
    model.eval()
    try:
        with ExitStack() as stack:
            if not compile:  # spans the yields: packed weights are used only without autograd
                stack.enter_context(prepacked(model))
            with torch.inference_mode():
                prompts, _ = _prompts(x, _model_device(model))
                device = prompts[0].device
                cache = stack.enter_context(_borrowed_cache(model, 1, block_size, device, _static(compile, device),
                                                            options))
                steps = _token_steps(model, prompts, output_length, block_size, keep, rolling, choose_args, None,
                                     compile, cache)
            while True:
                with torch.inference_mode():  # not held across yields: the caller's code runs in between
                    token = next(steps, None)
                    if token is None:
                        return
                    token = int(token[0])
                if token == eos_class:
                    return
                yield token
    finally:
        model.train(training)


# ---------------------------------------------------------------------------------------------------------------
# scoring a text as generation sees it


def score(model: nn.Module, x: Tensor, block_size: int, *, context_keep: int | None = None, rolling: bool = False,
          kv_dtype: str | None = None, sink_tokens: int = 0, window: int | None = None,
          kv_budget: int | None = None) -> Tensor:
    """Negative log-likelihood (nats, float32) of every token of each row of `x` (b, t) after its first: each from
    the logits generation would choose it from (the same window rule, the same KV cache, compression included),
    then fed as the next token (teacher forcing). What a cache option costs in quality reads off a held-out text.

    Returns: (b, t - 1)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] < 2:
        raise ValueError("score takes a (b, t) tensor of token ids with t >= 2")
    keep = _window(block_size, context_keep, rolling)
    options = cache_options(kv_dtype, sink_tokens, window, kv_budget)
    with _eval_mode(model):
        x = x.to(device=_model_device(model), dtype=torch.long)
        b, t = x.shape
        with _borrowed_cache(model, b, block_size, x.device, _static(False, x.device), options) as cache:
            rows = _Rows(model, list(x[:, :1].unbind(0)), block_size, keep, t - 1, cache, rolling=rolling)
            logits = rows.prefill()
            nll = []
            for i in range(1, t):
                nll.append(-torch.log_softmax(logits.float(), -1).gather(1, x[:, i:i + 1])[:, 0])
                if i + 1 < t:
                    logits = rows.step(x[:, i])
        return torch.stack(nll, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# beam search


def beam_search(model: nn.Module, x: Prompts, beam_width: int, output_length: int, block_size: int,
                eos_class: int | None = None, exclude_classes: Sequence[int] | None = None,
                length_penalty: float = 0.0, *, context_keep: int | None = None, rolling: bool = False,
                kv_dtype: str | None = None, sink_tokens: int = 0, window: int | None = None,
                kv_budget: int | None = None) -> Tensor | list[Tensor]:
    """Beam search for the most likely continuation of each prompt.

    All beams of all prompts advance together in one batched forward per step. At each step the W×V
    continuations of the W open beams of a prompt are ranked by their summed log-probability; those among the
    best W that end in <eos> become finished hypotheses, scored `sum_log_prob / length ** length_penalty`
    (length counts the generated tokens including <eos>), and the best W that do not end in <eos> stay open.
    Beams still open after `output_length` tokens finish there. Search stops early once no open beam can beat
    the best finished hypothesis. `beam_width=1` is greedy search (for `length_penalty <= 0`).

    Args:
        beam_width: W, open beams per prompt. length_penalty: > 0 favours longer outputs, < 0 shorter ones.
        Other arguments as for `sample`.

    Returns:
        the best finished hypothesis (new ids without <eos>): a 1-D tensor for a 1-D `x`, else a list of them.
    """
    _check_positive("beam_width", beam_width)
    _check_positive("output_length", output_length, allow_zero=True)
    keep = _window(block_size, context_keep, rolling)
    lp = float(length_penalty)
    options = cache_options(kv_dtype, sink_tokens, window, kv_budget)
    with _eval_mode(model):
        prompts, batched = _prompts(x, _model_device(model))
        outputs = _beam_search(model, prompts, beam_width, output_length, block_size, keep, rolling, eos_class,
                               exclude_classes, lp, options) if output_length else [p[:0] for p in prompts]
        outputs = [row.clone() for row in outputs]
    return outputs if batched else outputs[0]


def _beam_search(model, prompts, W, output_length, block_size, keep, rolling, eos_class, exclude_classes, lp,
                 options=None):
    n, device = len(prompts), prompts[0].device
    with ExitStack() as stack:
        cache = stack.enter_context(_borrowed_cache(model, n, block_size, device, _static(False, device), options))
        rows = _Rows(model, prompts, block_size, keep, output_length, cache, rolling=rolling)
        logits = rows.prefill()  # n v: the W beams of a prompt start identical, so prefill each prompt once
        if W > 1:
            expand = torch.arange(n, device=device).repeat_interleave(W)
            rows.reorder(expand, stack.enter_context(
                _borrowed_cache(model, n * W, block_size, device, _static(False, device), options)))
            logits = logits[expand]
        return _beams(rows, logits, n, W, output_length, eos_class, exclude_classes, lp)


def _beams(rows, logits, n, W, output_length, eos_class, exclude_classes, lp):
    device = logits.device
    V = logits.shape[-1]
    excluded = _excluded(exclude_classes, V, device)
    scores = torch.full((n, W), -math.inf, device=device)  # summed log-probs of the open beams
    scores[:, 0] = 0.0  # one live beam at first, so the first step does not pick the same token W times
    beams = torch.zeros(n, W, output_length, dtype=torch.long, device=device)  # tokens of the open beams
    best = torch.full((n,), -math.inf, device=device)  # best finished hypothesis per prompt: score,
    best_len = torch.zeros(n, dtype=torch.long, device=device)  # length (without <eos>),
    best_tokens = torch.zeros(n, output_length, dtype=torch.long, device=device)  # tokens
    prompt_idx = torch.arange(n, device=device)
    identity = torch.arange(n * W, device=device)
    k = min(2 * W if eos_class is not None else W, W * V)  # W open beams remain even if W of the best 2W end in <eos>
    for t in range(output_length):
        logits = logits.float()
        if excluded is not None:
            logits = logits.index_fill(-1, excluded, -math.inf)
        total = scores[:, :, None] + torch.log_softmax(logits, -1).view(n, W, V)  # n W V
        top, index = total.view(n, W * V).topk(k)  # n k
        beam, token = index // V, index % V
        if eos_class is not None:
            ends = (token == eos_class) & (torch.arange(k, device=device) < W)
            ended = torch.where(ends, top / (t + 1) ** lp, -math.inf)
            score, pick = ended.max(-1)
            better = score > best
            best = torch.where(better, score, best)
            best_len = torch.where(better, t, best_len)
            source = beams[prompt_idx, beam[prompt_idx, pick]]  # n L
            best_tokens = torch.where(better[:, None], source, best_tokens)
            # open beams: the best W continuations that do not end in <eos> (a stable sort keeps their order)
            order = (token == eos_class).int().argsort(dim=-1, stable=True)[:, :W]
            top, beam, token = top.gather(-1, order), beam.gather(-1, order), token.gather(-1, order)
        else:
            top, beam, token = top[:, :W], beam[:, :W], token[:, :W]
        scores = top
        beams = beams.gather(1, beam[:, :, None].expand(-1, -1, output_length))
        beams[:, :, t] = token
        if t + 1 == output_length:  # open beams end here
            score, pick = (scores / output_length ** lp).max(-1)
            better = score > best
            best_len = torch.where(better, output_length, best_len)
            best_tokens = torch.where(better[:, None], beams[prompt_idx, pick], best_tokens)
            break
        # the best any open beam can still reach: its log-prob only falls, its length is t+2..output_length
        reach = scores / (output_length if lp > 0 else t + 2) ** lp
        if bool((best >= reach.amax(-1)).all()):
            break
        order = (prompt_idx[:, None] * W + beam).view(-1)
        if not torch.equal(order, identity):  # copying every layer's cache costs about a forward's time
            rows.reorder(order)
        logits = rows.step(token.view(-1))
    return [best_tokens[i, :n_i] for i, n_i in enumerate(best_len.tolist())]


# ---------------------------------------------------------------------------------------------------------------
# step-level generation: rows that join and leave between steps (continuous batching, e.g. a server)


class _BatchRow:
    def __init__(self, ids: list[int], max_new: int, eos_class: int | None, chooser: _Chooser):
        self.ids, self.max_new, self.eos_class, self.chooser = ids, max_new, eos_class, chooser
        self.generated, self.done = 0, False


class GenerationBatch:
    """Sampling one token per step for a set of rows that may change between steps: continuous batching.

        with inference.GenerationBatch(model, block_size) as batch:   # in the thread that will step it
            row = batch.add(prompt, 64, eos_class=eos, temperature=0.8, generator=generator)
            while batch:
                for row, token, finished in batch.step():  # every row's next token, in one forward
                    ...                                    # batch.remove(row) ends a row early (a stop string)

    Each row keeps its own window (the module doc's rule), its own `_Chooser` and generator, so its tokens are
    the ones `sample` gives for its prompt and arguments alone, whatever else is in the batch and whenever it
    joined. Rows added join together at the next `step`: their windows are prefilled on their own and their
    cache rows copied in beside the live rows' (see `_join`; where that cannot be done, every row's window is
    prefilled anew: `merges` and `rebuilds` count the two). A finished or removed row leaves by a reorder of
    the KV cache. Tokens stay on the model's device; `step` reads the chosen ones to the host once.

    Entering the batch (a context manager) puts the model in eval mode with packed CPU weights until exit, and
    holds a KV cache of the current row count (borrowed as `sample` borrows its caches, and released on exit).
    Enter and step it in one thread: the model must not be used elsewhere meanwhile.

    Args:
        model: as for `sample`.
        block_size: the longest context the model sees (normally the model's `max_len`).
        n_vocab: the model's output classes; default: read from one forward of one token on entry.
    """

    def __init__(self, model: nn.Module, block_size: int, *, n_vocab: int | None = None):
        _check_positive("block_size", block_size)
        self.model, self.block_size, self.n_vocab = model, block_size, n_vocab
        self.device = _model_device(model)
        self._rows: dict[int, _BatchRow] = {}  # row id -> row, live or joining
        self._order: list[int] = []  # ids of the rows of `_batch`, in its row order
        self._joining: list[int] = []
        self._batch: _Rows | None = None
        self._pending: Tensor | None = None  # the last tokens chosen for `_order`'s rows, fed at the next step
        self._next_id = 0
        self.merges = self.rebuilds = 0  # joins done by copying cache rows, and by prefilling every window
        self._stack: ExitStack | None = None
        self._cache_stack = ExitStack()

    def __enter__(self) -> GenerationBatch:
        self._stack = ExitStack()
        self._stack.enter_context(_eval_mode(self.model))
        self._stack.callback(lambda: self._cache_stack.close())  # the stack of the cache held at exit
        if self.n_vocab is None:
            self.n_vocab = self.model(torch.zeros(1, 1, dtype=torch.long, device=self.device)).shape[-1]
        return self

    def __exit__(self, *exc) -> None:
        self._rows.clear()
        self._order, self._joining, self._batch, self._pending = [], [], None, None
        self._stack.close()
        self._stack = None

    def __len__(self) -> int:
        """The rows still generating (joining or live, not finished nor removed)."""
        return sum(not row.done for row in self._rows.values())

    def add(self, prompt: Tensor | Sequence[int], max_new_tokens: int, eos_class: int | None = None,
            exclude_classes: Sequence[int] | None = None, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, generator: torch.Generator | None = None, *, min_p: float | None = None,
            repetition_penalty: float = 1.0) -> int:
        """Adds a row that joins at the next `step` and finishes after `max_new_tokens` tokens or at its
        `eos_class` (which is returned, as its last token). Sampling arguments as for `sample` (temperature 0 is
        greedy). Returns the row's id. Raises ValueError for a bad argument, before anything changes."""
        if self._stack is None:
            raise RuntimeError("GenerationBatch.add outside its `with` block; enter the batch first")
        _check_positive("max_new_tokens", max_new_tokens)
        with torch.inference_mode():
            prompts, _ = _prompts(torch.as_tensor(prompt), self.device)
            chooser = _Chooser(prompts, self.n_vocab, exclude_classes=exclude_classes, temperature=temperature,
                               top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                               generator=generator)
        row = self._next_id
        self._next_id += 1
        self._rows[row] = _BatchRow(prompts[0].tolist(), max_new_tokens, eos_class, chooser)
        self._joining.append(row)
        return row

    def remove(self, row: int) -> None:
        """Ends a row now: it gets no more tokens (a finished or already removed row: nothing to do)."""
        if row in self._rows:
            self._rows[row].done = True

    def step(self) -> list[tuple[int, int, bool]]:
        """Chooses every unfinished row's next token: returns `(row id, token, finished)` per row, finished when
        the token is the row's `eos_class` or its last one. An empty list when no row is left."""
        with torch.inference_mode():
            self._drop_done()
            if self._joining:
                logits = self._join()
            elif self._order:
                logits = self._batch.step(self._pending)
            else:
                return []
            rows = [self._rows[i] for i in self._order]
            self._pending = torch.cat([row.chooser(logits[i:i + 1]) for i, row in enumerate(rows)])  # b
            tokens = self._pending.tolist()
        for row, token in zip(rows, tokens):
            row.ids.append(token)
            row.generated += 1
            row.done = token == row.eos_class or row.generated == row.max_new
        return [(i, token, row.done) for i, row, token in zip(self._order, rows, tokens)]

    def _drop_done(self) -> None:
        self._joining = [i for i in self._joining if not self._rows[i].done]
        keep = [k for k, i in enumerate(self._order) if not self._rows[i].done]
        if len(keep) < len(self._order):
            self._order = [self._order[k] for k in keep]
            if keep:
                index = torch.tensor(keep, device=self.device)
                self._batch.reorder(index)
                self._pending = self._pending[index]
            else:
                self._batch, self._pending = None, None
                self._cache_stack.close()
        for i in [i for i, row in self._rows.items() if row.done]:
            del self._rows[i]

    def _join(self) -> Tensor:
        """The joining rows' windows prefilled into the batch; returns every row's next logits (b, v).

        The live rows step as usual (their pending tokens at cache index `fill`); the joining rows' windows are
        prefilled in a cache of their own, left-padded to the same `fill + 1` indices, and the two caches' rows
        are copied into one: a join costs its own rows' prefill. Where that cannot be done (no live rows, a
        window longer than the live rows' span, a batch about to re-prefill or roll, a cache of another type)
        the batch is rebuilt instead: every window prefilled anew."""
        live, joining = self._batch, [self._rows[i] for i in self._joining]
        width = None if live is None else live.fill + 1  # the cache indices the live rows span after this step
        if (live is None or width > self.block_size or max(len(row.ids) for row in joining) > width
                or not _plain_cache(live.cache)):
            return self._rebuild()
        logits = live.step(self._pending)
        with ExitStack() as scratch:
            cache = scratch.enter_context(_borrowed_cache(
                self.model, len(joining), self.block_size, self.device, _static(False, self.device)))
            new = _Rows(self.model, [torch.tensor(row.ids, device=self.device) for row in joining], self.block_size,
                        None, 1, cache)
            logits = torch.cat([logits, new.prefill(width)])
            self._order += self._joining
            self._joining = []
            merged = self._borrow(len(self._order))
            _copy_rows(merged, [live.cache, cache], width)
        # no window has slid (the live rows span fewer than block_size indices): each is its row's whole history,
        # as _Rows takes it
        self._batch = self._rows_for(merged)
        self._batch.fill = width
        self.merges += 1
        return logits

    def _rebuild(self) -> Tensor:
        """Every row's window (its prompt and tokens so far, joining rows too) prefilled into a new batch."""
        self._order += self._joining
        self._joining = []
        self._batch = self._rows_for(self._borrow(len(self._order)))
        self.rebuilds += 1
        return self._batch.prefill()

    def _borrow(self, batch_size: int):
        """A cache for `batch_size` rows, in place of the batch's current one (held until the next)."""
        stack = ExitStack()
        cache = stack.enter_context(_borrowed_cache(self.model, batch_size, self.block_size, self.device,
                                                    _static(False, self.device)))
        self._batch, self._pending = None, None
        self._cache_stack.close()
        self._cache_stack = stack
        return cache

    def _rows_for(self, cache) -> _Rows:
        """`_Rows` of the batch's rows (each with its last `block_size` tokens so far) over `cache`."""
        rows = [self._rows[i] for i in self._order]
        prompts = [torch.tensor(row.ids[-self.block_size:], device=self.device) for row in rows]
        max_new = max(row.max_new - row.generated for row in rows)
        return _Rows(self.model, prompts, self.block_size, None, max_new, cache)


def _plain_cache(cache) -> bool:
    """Whether `cache` is a plain `KVCache`, whose rows `_copy_rows` can copy (another type is rebuilt)."""
    from xlabml.attention import KVCache, LayerKVCache

    return type(cache) is KVCache and all(type(layer) is LayerKVCache for layer in cache.layers)


def _copy_rows(target, sources: list, n: int) -> None:
    """Fills `target`'s rows with the rows of `sources` in order: their first `n` cache indices, keys, values
    and doc ids (a source that never had pads holds no doc ids: its tokens are all real, doc id 0)."""
    start = 0
    for source in sources:
        rows = slice(start, start + source.batch_size)
        for layer, other in zip(target.layers, source.layers):
            layer.k[rows, :, :n] = other.k[:, :, :n]
            layer.v[rows, :, :n] = other.v[:, :, :n]
        target.doc_ids[rows, :n] = source.doc_ids[:, :n] if source.has_docs else 0
        start += source.batch_size
    target.has_docs = True
    if not target.static:
        target.filled = n

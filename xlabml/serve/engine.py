"""The worker thread that owns the model: every request's choices generated together, a token per step.

Requests become ``Job``s of one or more choices (a prompt, sampling arguments, a seed, stop strings). The
event-loop thread validates them and hands them to ``Engine.submit``, which never blocks; the engine thread
admits waiting jobs between decode steps, FIFO, while the batch has room (``max_batch`` rows; a job's choices
join together), and steps one ``xlabml.inference.GenerationBatch`` holding every admitted choice as a row:
rows join and leave between steps (continuous batching), each with its own window, chooser and generator, so
a choice's tokens do not depend on what else is in the batch. After each step the engine turns each row's
token into text (``TextStream``: whole characters, stop strings cut) and hands every job its events through
the job's event loop; a choice ends at <eos>, at a stop string or at ``max_tokens``, and a cancelled job (its
client went away) leaves at the next step.

Choice k of a request with ``seed`` s draws from ``torch.Generator().manual_seed(s + k)``: choice 0 is what
``xlabml.inference.sample`` gives with ``manual_seed(s)``. Without a seed each choice gets a random one.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from xlabml.inference import GenerationBatch
from xlabml.serve.protocol import APIError
from xlabml.serve.text import TextStream


@dataclass
class ChoiceSpec:
    """One choice to generate: prompt ids, at most `max_tokens` new tokens (1 or more), sampling keywords of
    ``GenerationBatch.add``, the draw's seed (None: random), stop strings, whether to strip the text, and the ids
    that end it as <eos> does (a chat template's role tokens: counted in the tokens, never decoded)."""

    prompt: list[int]
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    strip: bool = False
    stop_ids: list[int] = field(default_factory=list)


class Job:
    """One request's choices. The engine thread sends it lists of events, read with ``await job.events()``:

    - ``("text", index, text)``: more text of choice `index`;
    - ``("end", index, finish_reason, completion_tokens)``: choice `index` is complete ("stop" or "length";
      the tokens count every token generated, a closing <eos> included);
    - ``("error", status, message)``: the job failed; no more events follow.
    """

    def __init__(self, choices: list[ChoiceSpec], loop: asyncio.AbstractEventLoop):
        self.choices, self.loop = choices, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set in the event loop, read by the engine thread

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> list[tuple]:
        return await self.queue.get()

    def send(self, events: list[tuple]) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class _Choice:
    def __init__(self, job: Job, index: int, text: TextStream, stop_ids=()):
        self.job, self.index, self.text, self.tokens = job, index, text, 0
        self.stop_ids = frozenset(stop_ids)


class Engine:
    """Generates submitted jobs' choices in one worker thread (``start``/``close``), batched together.

    Args:
        model: the model (eval mode is set while serving), on its device.
        tokenizer: its ``Tokenizer``.
        block_size: the model's context window.
        eos_class: the id that ends a choice.
        exclude_classes: ids never generated.
        max_batch: the most rows (choices) generated together.
        max_queue: the most rows waiting for room in the batch; ``submit`` refuses more (HTTP 429).
    """

    def __init__(self, model, tokenizer, *, block_size: int, eos_class: int, exclude_classes: list[int],
                 max_batch: int = 16, max_queue: int = 64):
        self.model, self.tokenizer, self.block_size = model, tokenizer, block_size
        self.eos_class, self.exclude_classes = eos_class, list(exclude_classes)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self._waiting: deque[Job] = deque()
        self._waiting_rows = 0
        self._live: dict[int, _Choice] = {}  # row id -> choice
        self._cond = threading.Condition()
        self._closing = self._held = False
        self._thread: Optional[threading.Thread] = None
        self.peak_rows = 0  # the most rows stepped together so far

    # --- the event loop's side ---

    def start(self) -> None:
        """Starts the worker thread; returns once it is ready, or raises what stopped it."""
        self._closing, self._ready, self._failure = False, threading.Event(), None
        self._thread = threading.Thread(target=self._run, name="xlab-serve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            self._thread = None
            raise self._failure

    def close(self) -> None:
        """Stops the worker after its current step; jobs still waiting or running get a 503."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queues a job. Raises APIError 429 when the queue is full, 503 when the engine is not running."""
        with self._cond:
            if self._closing or self._thread is None or not self._thread.is_alive():
                raise APIError(503, "the server is shutting down", code="unavailable")
            if self._waiting_rows + len(job.choices) > self.max_queue:
                raise APIError(429, f"too many requests waiting ({self._waiting_rows} choices queued, at most "
                               f"{self.max_queue}); retry later", code="queue_full")
            self._waiting.append(job)
            self._waiting_rows += len(job.choices)
            self._cond.notify()

    @property
    def waiting_rows(self) -> int:
        return self._waiting_rows

    @property
    def live_rows(self) -> int:
        return len(self._live)

    @contextmanager
    def held(self):
        """Admits no job while inside (rows already running go on): jobs submitted meanwhile join together."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify()

    # --- the worker thread ---

    def _run(self) -> None:
        batch = GenerationBatch(self.model, self.block_size)
        try:
            batch.__enter__()
        except Exception as error:  # noqa: BLE001 - start() raises it
            self._failure = error
            return
        finally:
            self._ready.set()
        try:
            while self._admit(batch):
                self._drop_cancelled(batch)
                if batch:
                    self._step(batch)
        finally:
            self._fail_all(batch, 503, "the server is shutting down")
            batch.__exit__(None, None, None)

    def _admit(self, batch: GenerationBatch) -> bool:
        """Moves waiting jobs that fit into the batch; waits while there is nothing to do. False: closing."""
        with self._cond:
            while not self._closing and not self._live and (self._held or not self._waiting):
                self._cond.wait()
            if self._closing:
                return False
            admitted = []
            while self._waiting and not self._held:
                job = self._waiting[0]
                if not job.cancelled and len(self._live) + len(admitted) + len(job.choices) > self.max_batch:
                    break
                self._waiting.popleft()
                self._waiting_rows -= len(job.choices)
                if not job.cancelled:
                    admitted.append(job)
        for job in admitted:
            self._add(batch, job)
        return True

    def _add(self, batch: GenerationBatch, job: Job) -> None:
        rows = []
        try:
            for index, spec in enumerate(job.choices):
                generator = None
                if spec.sampling.get("temperature", 1.0) != 0:
                    generator = torch.Generator(device=self.device)
                    if spec.seed is None:
                        generator.seed()
                    else:
                        generator.manual_seed((spec.seed + index) % 2 ** 64)
                row = batch.add(spec.prompt, spec.max_tokens, eos_class=self.eos_class,
                                exclude_classes=self.exclude_classes, generator=generator, **spec.sampling)
                rows.append(row)
                self._live[row] = _Choice(job, index, TextStream(self.tokenizer, spec.stop, spec.strip),
                                          spec.stop_ids)
        except ValueError as error:  # arguments the request validation let through
            for row in rows:
                batch.remove(row)
                del self._live[row]
            job.send([("error", 400, str(error))])

    def _drop_cancelled(self, batch: GenerationBatch) -> None:
        for row in [row for row, choice in self._live.items() if choice.job.cancelled]:
            batch.remove(row)
            del self._live[row]

    def _step(self, batch: GenerationBatch) -> None:
        self.peak_rows = max(self.peak_rows, len(batch))
        try:
            results = batch.step()
        except Exception as error:  # noqa: BLE001 - the jobs fail, the server goes on
            message = f"generation failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})"
            self._fail_all(batch, 500, message, waiting=False)
            return
        events: dict[Job, list[tuple]] = {}
        for row, token, finished in results:
            choice = self._live[row]
            choice.tokens += 1
            reason = None
            if token == self.eos_class or token in choice.stop_ids:
                text, reason = choice.text.finish(), "stop"
                if token != self.eos_class:  # the batch ends a row by itself at <eos> only
                    batch.remove(row)
            else:
                text = choice.text.add(token)
                if choice.text.stopped:
                    reason = "stop"
                    batch.remove(row)
                elif finished:
                    text, reason = text + choice.text.finish(), "length"
            out = events.setdefault(choice.job, [])
            if text:
                out.append(("text", choice.index, text))
            if reason is not None:
                out.append(("end", choice.index, reason, choice.tokens))
                del self._live[row]
        for job, out in events.items():
            if out:
                job.send(out)

    def _fail_all(self, batch: GenerationBatch, status: int, message: str, waiting: bool = True) -> None:
        jobs = {choice.job for choice in self._live.values()}
        for row in self._live:
            batch.remove(row)
        self._live.clear()
        if waiting:
            with self._cond:
                jobs.update(self._waiting)
                self._waiting.clear()
                self._waiting_rows = 0
        for job in jobs:
            job.send([("error", status, message)])

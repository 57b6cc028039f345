"""One request on its way through the scheduler: what to generate, the events it produces, and the
text bookkeeping that turns canvases into OpenAI-style deltas.

A diffusion LM commits tokens out of order. What a client may read as final text is the committed
prefix: the generated positions up to the first one still masked, cut at the first EOS and at
``max_tokens``, and before the first stop string a request gave (``dllm.runtime.text``).
``IncrementalText`` turns each step's canvas row into the new part of that prefix (and, for clients that
asked, a snapshot of the whole canvas with the masked positions marked). Once the committed prefix holds a
stop string the answer is final, so the generation can end there: the rest of the canvas could not change it.

Events cross from the worker thread to the request's event loop through ``Job.emit``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import threading
import time
from typing import Sequence, Union

from dllm.runtime import DecodeConfig
from dllm.runtime.text import CommittedText, Ending


class FinishReason(str, enum.Enum):
    STOP = "stop"          # the model wrote an end-of-sequence token, or one of the request's stop strings
    LENGTH = "length"      # max_tokens (or the canvas) ran out first


class Outcome(str, enum.Enum):
    """How a request ended (the ``outcome`` label of ``dllm_requests_total``)."""
    OK = "ok"
    CANCELLED = "cancelled"        # the client went away; the generation stopped between two steps
    FAILED = "failed"              # the runtime raised (a 500 for the client)
    REJECTED = "rejected"          # a 4xx before it was queued
    OVERLOADED = "overloaded"      # the queue was full (503)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated request: token ids in, how to decode, what to stream back."""
    prompt_ids: tuple[int, ...]
    config: DecodeConfig
    max_tokens: int                # the answer holds at most this many tokens (config.gen_length >= it)
    stream: bool = False           # emit text deltas as the committed prefix grows
    canvas: bool = False           # emit the whole canvas after every step (stream only)
    endpoint: str = "chat"         # metrics label
    stop: tuple[str, ...] = ()     # the answer ends before the first of these strings (OpenAI's ``stop``)


@dataclasses.dataclass(frozen=True)
class Canvas:
    """The generated part of the canvas after one step. ``pieces[i]`` is position i's token text, or
    None while it is still masked; ``ids[i]`` is its id (the mask id while masked)."""
    step: int
    ids: list[int]
    pieces: list[str | None]

    def to_dict(self) -> dict:
        masked = sum(p is None for p in self.pieces)
        return {"step": self.step, "committed": len(self.pieces) - masked, "masked": masked,
                "ids": self.ids, "canvas": self.pieces}


@dataclasses.dataclass(frozen=True)
class Progress:
    """After one step: the new committed text (may be empty) and, when asked, the canvas."""
    text: str
    canvas: Canvas | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    text: str                      # the rest of the answer not yet sent as Progress
    full_text: str                 # the whole answer
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    steps: int
    gen_length: int
    wall_s: float                  # the generation itself
    queue_s: float                 # waiting for the worker


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = Union[Progress, Finished, Failed]


class Cancelled(Exception):
    """Raised between two steps to stop the generation of a request whose client went away."""


class Job:
    """A request in flight: its events go to an asyncio queue on the loop that submitted it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    # -- worker side ----------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Hand an event to the request's loop (thread-safe; dropped when that loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:       # the loop closed: the server is shutting down
            pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- request side ---------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request: dropped if still queued, stopped after the current step if running."""
        self._cancelled.set()

    async def next_event(self) -> Event:
        return await self._events.get()


class IncrementalText:
    """Turns the generated canvas row of each step into Progress events, then the final Finished: the
    runtime's ``CommittedText`` (deltas that only ever extend what was sent, never half a character nor
    what could begin a stop string; ``stopped`` once the committed prefix holds a stop string) plus, for
    clients that asked, each step's canvas with every position's token text."""

    def __init__(self, tokenizer, mask_id: int, eos_ids: Sequence[int], request: GenerationRequest):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.request = request
        self.text = CommittedText(tokenizer, mask_id, eos_ids, max_tokens=request.max_tokens, stop=request.stop)
        self._piece_cache: dict[int, str] = {}

    @property
    def stopped(self) -> bool:
        """Whether the committed prefix holds a stop string: the answer is final, the generation may end."""
        return self.text.stopped is not None

    def step(self, step: int, gen_ids: list[int]) -> Progress | None:
        """gen_ids: the generated positions of the canvas after step ``step`` (mask id where masked). Without
        streaming this only looks for stop strings (``stopped``) and returns None."""
        delta = self.text.advance(gen_ids)
        if not self.request.stream:
            return None
        canvas = self._canvas(step, gen_ids) if self.request.canvas else None
        if not delta and canvas is None:
            return None
        return Progress(delta, canvas)

    def finish(self, gen_ids: list[int] | None, prompt_tokens: int, steps: int, wall_s: float,
               queue_s: float) -> Finished:
        """The answer from the final canvas ``gen_ids``; None once ``stopped`` (the generation ended there)."""
        answer = self.text.answer(gen_ids)
        reason = FinishReason.LENGTH if answer.ending == Ending.LENGTH else FinishReason.STOP
        rest = self.text.rest(answer.text) if self.request.stream else answer.text    # nothing was sent without a stream
        return Finished(rest, answer.text, reason, prompt_tokens, len(answer.ids), steps,
                        self.request.config.gen_length, wall_s, queue_s)

    def _canvas(self, step: int, gen_ids: list[int]) -> Canvas:
        missing = sorted({t for t in gen_ids if t != self.mask_id and t not in self._piece_cache})
        if missing:
            for t, piece in zip(missing, self.tokenizer.batch_decode([[t] for t in missing])):
                self._piece_cache[t] = piece
        return Canvas(step, list(gen_ids), [None if t == self.mask_id else self._piece_cache[t] for t in gen_ids])

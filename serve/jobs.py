"""One request on its way through the scheduler: what to generate, the events it produces, and the
text bookkeeping that turns canvases into OpenAI-style deltas.

A diffusion LM commits tokens out of order. What a client may read as final text is the committed
prefix: the generated positions up to the first one still masked, cut at the first EOS and at
``max_tokens``, and before the first stop string a request gave. ``IncrementalText`` turns each step's canvas
row into the new part of that prefix (and, for clients that asked, a snapshot of the whole canvas with the
masked positions marked). Once the committed prefix holds a stop string the answer is final, so the
generation can end there: the rest of the canvas could not change it.

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


def content_ids(ids: Sequence[int], eos_ids: Sequence[int], max_tokens: int) -> tuple[list[int], FinishReason]:
    """The answer's token ids (cut at the first EOS and at ``max_tokens``) and why it ended."""
    eos = set(eos_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    if cut is not None and cut <= max_tokens:
        return list(ids[:cut]), FinishReason.STOP
    end = len(ids) if cut is None else cut
    return list(ids[:min(end, max_tokens)]), FinishReason.LENGTH


class IncrementalText:
    """Turns the generated canvas row of each step into Progress events, then the final Finished.

    Text deltas only ever extend what was sent: the committed prefix never changes once committed,
    and a trailing replacement character (half of a multi-byte character split across tokens) is
    held back until the token that completes it is committed, as is a trailing piece of text that
    could be the start of a stop string.

    With stop strings the answer is the text before the earliest stop string, and its tokens are those up
    to the one that completes it: the same whether the stop string shows in the committed prefix of a
    step (``stopped``: the generation may end there) or only in the final canvas.
    """

    def __init__(self, tokenizer, mask_id: int, eos_ids: Sequence[int], request: GenerationRequest):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.eos = set(eos_ids)
        self.request = request
        self.sent = ""
        self.stopped: tuple[list[int], str] | None = None   # the answer's ids and text, once a stop string shows
        self._piece_cache: dict[int, str] = {}

    def step(self, step: int, gen_ids: list[int]) -> Progress | None:
        """gen_ids: the generated positions of the canvas after step ``step`` (mask id where masked). Without
        streaming this only looks for stop strings (``stopped``) and returns None."""
        prefix = []
        for t in gen_ids[:self.request.max_tokens]:
            if t == self.mask_id or t in self.eos:
                break
            prefix.append(t)
        text = self._decode(prefix)
        if self.request.stop and self.stopped is None:
            self.stopped = self._cut_at_stop(prefix, text)
        if not self.request.stream:
            return None
        if self.stopped is not None:
            text = self.stopped[1]
        else:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._stop_start(text)]
        delta = self._extend(text)
        canvas = self._canvas(step, gen_ids) if self.request.canvas else None
        if not delta and canvas is None:
            return None
        return Progress(delta, canvas)

    def finish(self, gen_ids: list[int] | None, prompt_tokens: int, steps: int, wall_s: float,
               queue_s: float) -> Finished:
        """The answer from the final canvas ``gen_ids``; None once ``stopped`` (the generation ended there)."""
        if self.stopped is not None:
            (ids, text), reason = self.stopped, FinishReason.STOP
            gen_length = self.request.config.gen_length
        else:
            ids, reason = content_ids(gen_ids, self.eos, self.request.max_tokens)
            text, gen_length = self._decode(ids), len(gen_ids)
            cut = self._cut_at_stop(ids, text) if self.request.stop else None
            if cut is not None:
                (ids, text), reason = cut, FinishReason.STOP
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        return Finished(rest, text, reason, prompt_tokens, len(ids), steps, gen_length, wall_s, queue_s)

    def _cut_at_stop(self, ids: list[int], text: str) -> tuple[list[int], str] | None:
        """(the ids up to the one that completes the earliest stop string, the text before it), or None when
        ``text`` (the decoding of ``ids``) holds no stop string."""
        if not any(s in text for s in self.request.stop):
            return None
        for k in range(1, len(ids) + 1):         # once per request: the first token count whose text has one
            head = self._decode(ids[:k])
            found = [i for i in (head.find(s) for s in self.request.stop) if i >= 0]
            if found:
                return ids[:k], head[:min(found)]
        return None

    def _stop_start(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins a stop string (held back: it may be one)."""
        return max((n for s in self.request.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _extend(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _canvas(self, step: int, gen_ids: list[int]) -> Canvas:
        missing = sorted({t for t in gen_ids if t != self.mask_id and t not in self._piece_cache})
        if missing:
            for t, piece in zip(missing, self.tokenizer.batch_decode([[t] for t in missing])):
                self._piece_cache[t] = piece
        return Canvas(step, list(gen_ids), [None if t == self.mask_id else self._piece_cache[t] for t in gen_ids])

"""The text of a generation as it becomes final.

A diffusion LM commits tokens out of order. What is final after a step is the committed prefix: the
generated positions up to the first one still masked, cut at the first EOS (and, where a caller caps the
answer, at ``max_tokens``). ``CommittedText`` turns each step's generated row into the new part of that
text, so that the pieces it hands out add up to the final answer:

- a trailing replacement character (one character whose bytes span several tokens, not all committed yet)
  is held back until the token that completes it is committed;
- with stop strings, a trailing piece of text that could begin one is held back too, and the answer ends
  before the earliest stop string. Its tokens run up to the one that completes the stop string, and that
  answer is the same whether the stop string shows in a step's committed prefix (``stopped``: nothing
  later can change it, so the generation may end there) or only in the final canvas.

``Pipeline.stream`` and the server's streams both use it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence


class Ending(str, enum.Enum):
    """Why an answer ends where it does."""
    EOS = "eos"              # the model wrote an end-of-sequence token
    STOP = "stop"            # one of the caller's stop strings
    LENGTH = "length"        # max_tokens, or the canvas, ran out first


@dataclasses.dataclass(frozen=True)
class Answer:
    ids: list[int]           # the answer's tokens (up to the one that completes a stop string)
    text: str
    ending: Ending


class CommittedText:
    """One sequence's final text, step by step (see the module docstring)."""

    def __init__(self, tokenizer, mask_id: int, eos_ids: Sequence[int], *, max_tokens: int | None = None,
                 stop: Sequence[str] = ()):
        self.tokenizer, self.mask_id, self.eos = tokenizer, mask_id, set(eos_ids)
        self.max_tokens, self.stop = max_tokens, tuple(stop)
        self.sent = ""                          # the text handed out so far
        self.stopped: Answer | None = None      # the answer, once a committed prefix holds a stop string
        self._settled = False                   # the prefix reached an EOS or max_tokens: nothing changes later

    def advance(self, gen_ids: Sequence[int]) -> str:
        """The new final text after a step; ``gen_ids``: the generated positions (the mask id where masked)."""
        if self._settled or self.stopped is not None:
            return ""
        prefix = []
        for t in gen_ids[:self.max_tokens]:
            if t == self.mask_id:
                break
            if t in self.eos:
                self._settled = True
                break
            prefix.append(t)
        else:                                   # every position up to the limit committed, none an EOS
            self._settled = True
        text = self.decode(prefix)
        if self.stop:
            self.stopped = self._cut_at_stop(prefix, text)
        if self.stopped is not None:
            text = self.stopped.text
        elif not self._settled:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._stop_start(text)]
        return self._extend(text)

    def answer(self, gen_ids: Sequence[int]) -> Answer:
        """The answer from the final generated row: cut at the first EOS, ``max_tokens`` and stop string."""
        if self.stopped is not None:
            return self.stopped
        eos_at = next((i for i, t in enumerate(gen_ids) if t in self.eos), None)
        limit = len(gen_ids) if self.max_tokens is None else self.max_tokens
        if eos_at is not None and eos_at <= limit:
            ids, ending = list(gen_ids[:eos_at]), Ending.EOS
        else:                                   # no EOS within the limit
            ids, ending = list(gen_ids[:limit]), Ending.LENGTH
        text = self.decode(ids)
        return (self._cut_at_stop(ids, text) if self.stop else None) or Answer(ids, text, ending)

    def rest(self, text: str) -> str:
        """What the final answer's ``text`` adds to the text handed out (marked as handed out)."""
        return self._extend(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if ids else ""

    def _cut_at_stop(self, ids: list[int], text: str) -> Answer | None:
        """The answer up to the earliest stop string in ``text`` (the decoding of ``ids``), or None."""
        if not any(s in text for s in self.stop):
            return None
        for k in range(1, len(ids) + 1):         # once per answer: the first token count whose text holds one
            head = self.decode(ids[:k])
            found = [i for i in (head.find(s) for s in self.stop) if i >= 0]
            if found:
                return Answer(ids[:k], head[:min(found)], Ending.STOP)
        return None

    def _stop_start(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins a stop string (held back: it may be one)."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _extend(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""

"""The OpenAI wire format: request bodies (pydantic) and the JSON of responses, chunks and errors.

Requests accept the OpenAI fields a diffusion LM can honour; fields it cannot (n > 1, logprobs,
penalties, top_p != 1) are accepted only at their neutral values, and any other field is an error, so
a client never silently gets something other than what it asked for.
Decoding knobs travel in the ``dllm`` extension object (see ``dllm.serve.requests``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from dllm.serve.jobs import Canvas, Finished


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Union[str, None] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")       # name, tool_call_id, ... are carried, not used
    role: str
    content: Union[str, list[ContentPart], None] = None


class _Common(_Body):
    model: str
    max_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    seed: Union[int, None] = None
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    n: Union[int, None] = None
    top_p: Union[float, None] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Union[float, None] = None
    frequency_penalty: Union[float, None] = None
    user: Union[str, None] = None
    dllm: Union[dict[str, Any], None] = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Union[int, None] = None
    logprobs: Union[bool, None] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: Union[bool, None] = None
    logprobs: Union[int, None] = None
    suffix: Union[str, None] = None


# -- responses ------------------------------------------------------------------

class Reply:
    """Builds the JSON of one response (or one stream) of either endpoint."""

    def __init__(self, kind: Literal["chat", "completion"], model: str):
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, done: Finished) -> dict:
        """The non-streaming response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": done.full_text},
                      "logprobs": None, "finish_reason": done.finish_reason.value}
            out = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": done.full_text, "logprobs": None, "finish_reason": done.finish_reason.value}
            out = self._base("text_completion")
        out.update(choices=[choice], usage=usage(done), dllm=stats(done))
        return out

    def chunk(self, text: str | None, *, first: bool = False, finish: Finished | None = None,
              canvas: Canvas | None = None) -> dict:
        """One streamed chunk: new text, the role (first chat chunk), the finish reason, the canvas."""
        reason = finish.finish_reason.value if finish is not None else None
        if self.kind == "chat":
            delta: dict = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            elif first:
                delta["content"] = ""
            out = self._base("chat.completion.chunk")
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
        else:
            out = self._base("text_completion")
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
        if canvas is not None:
            out["dllm"] = canvas.to_dict()
        elif finish is not None:
            out["dllm"] = stats(finish)
        return out

    def usage_chunk(self, done: Finished) -> dict:
        """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
        out = self._base("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        out.update(choices=[], usage=usage(done))
        return out


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def stats(done: Finished) -> dict:
    """The ``dllm`` object of a finished response: what the generation cost."""
    return {"steps": done.steps, "gen_length": done.gen_length, "wall_s": round(done.wall_s, 6),
            "queue_s": round(done.queue_s, 6)}


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

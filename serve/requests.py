"""From an OpenAI request body to a GenerationRequest: the prompt's token ids and a DecodeConfig.

| request field | DecodeConfig |
|---|---|
| `max_tokens` (`max_completion_tokens`) | `gen_length` = max_tokens rounded up to whole blocks; the answer is cut at max_tokens |
| `temperature`, `seed` | `temperature`, `seed` |
| `dllm.method` | `method_config(method)` (e.g. `"dcu+apd"`, `"full"`) |
| `dllm.<field>` | that DecodeConfig field (`block_length`, `steps`, `threshold`, `budget`, `tau0`, ...) |
| `dllm.canvas` | not decoding: stream the whole canvas after every step |
| `stop` | not decoding: the answer ends before the first stop string (``GenerationRequest.stop``) |

Unset fields keep the server's defaults (``ServeConfig.default_decode_config``); ``steps`` defaults
to the gen length (one token per step for the ``schedule`` commit). Every problem is a RequestError
that names the field and the fix; nothing is queued until the request is known to be valid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dllm.errors import DllmError
from dllm.runtime import DecodeConfig, method_config
from dllm.serve.config import round_up
from dllm.serve.jobs import GenerationRequest
from dllm.serve.protocol import ChatCompletionRequest, CompletionRequest

# DecodeConfig fields the request sets through its own OpenAI fields, never through `dllm`
_OWN_FIELDS = {"gen_length": "max_tokens", "temperature": "temperature", "seed": "seed"}
EXTENSION_KEYS = ("method", "canvas")
MAX_STOP = 4                   # stop strings per request, as in OpenAI's API


class RequestError(DllmError):
    """A request the server will not run; becomes an OpenAI error JSON with ``status``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What request validation needs to know about the served model."""
    name: str
    max_seq_len: int
    vocab_size: int
    mask_id: int
    default: DecodeConfig          # the server's default decoding (its gen_length is the default max_tokens)
    default_max_tokens: int


def chat_request(body: ChatCompletionRequest, model: ModelInfo, encode) -> GenerationRequest:
    """encode(messages) -> token ids through the tokenizer's chat template."""
    _common_checks(body, model)
    if body.logprobs:
        raise RequestError("logprobs are not supported; leave logprobs unset", param="logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise RequestError("max_tokens and max_completion_tokens disagree; send one of them",
                           param="max_completion_tokens")
    messages = [{"role": m.role, "content": _text_content(m.content, i)} for i, m in enumerate(body.messages)]
    try:
        ids = encode(messages)
    except (DllmError, ValueError, TypeError) as e:
        raise RequestError(f"could not apply the model's chat template to messages: {e}", param="messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _generation_request(body, model, ids, max_tokens, "chat")


def completion_request(body: CompletionRequest, model: ModelInfo, encode) -> GenerationRequest:
    """encode(text) -> token ids; a prompt of token ids passes through."""
    _common_checks(body, model)
    if body.echo:
        raise RequestError("echo is not supported; leave echo unset", param="echo")
    if body.logprobs:
        raise RequestError("logprobs are not supported; leave logprobs unset", param="logprobs")
    if body.suffix:
        raise RequestError("suffix is not supported; leave suffix unset", param="suffix")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise RequestError(f"one prompt per request, got {len(prompt)}; send one request per prompt",
                               param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            ids = encode(prompt)
        except (DllmError, ValueError, TypeError) as e:
            raise RequestError(f"could not tokenize the prompt: {e}", param="prompt") from None
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < model.vocab_size or t == model.mask_id]
        if bad:
            raise RequestError(f"prompt token ids must lie in [0, {model.vocab_size}) and not be the mask id "
                               f"{model.mask_id}; got {bad[:5]}", param="prompt")
    return _generation_request(body, model, ids, body.max_tokens, "completions")


def decode_config(model: ModelInfo, max_tokens: int, temperature: float | None, seed: int | None,
                  dllm: dict[str, Any] | None) -> tuple[DecodeConfig, bool]:
    """The request's DecodeConfig and whether it asked for the canvas stream."""
    opts = dict(dllm or {})
    canvas = opts.pop("canvas", False)
    if not isinstance(canvas, bool):
        raise RequestError(f"dllm.canvas must be true or false, got {canvas!r}", param="dllm.canvas")
    for field, own in _OWN_FIELDS.items():
        if field in opts:
            raise RequestError(f"dllm.{field} is set by the request's `{own}` field; send `{own}` instead",
                               param=f"dllm.{field}")
    cfg = model.default
    method = opts.pop("method", None)
    try:
        if method is not None:
            if not isinstance(method, str):
                raise RequestError(f"dllm.method must be a string such as \"dcu+apd\", got {method!r}",
                                   param="dllm.method")
            cfg = method_config(method, cfg)
        block = opts.get("block_length", cfg.block_length)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise RequestError(f"dllm.block_length must be an integer >= 1, got {block!r}", param="dllm.block_length")
        gen = round_up(max_tokens, block)
        changes = {"steps": gen, **opts, "gen_length": gen}
        if temperature is not None:
            changes["temperature"] = temperature
        if seed is not None:
            changes["seed"] = seed
        return cfg.replace(**changes), canvas
    except RequestError:
        raise
    except DllmError as e:
        raise RequestError(f"bad decoding settings: {e}", param="dllm", code="invalid_dllm_option") from None


def _common_checks(body, model: ModelInfo) -> None:
    if body.model != model.name:
        raise RequestError(f"the model {body.model!r} does not exist here; this server serves {model.name!r} "
                           "(GET /v1/models)", status=404, param="model", code="model_not_found")
    neutral = {"n": (body.n, (None, 1)), "top_p": (body.top_p, (None, 1.0)),
               "presence_penalty": (body.presence_penalty, (None, 0.0)),
               "frequency_penalty": (body.frequency_penalty, (None, 0.0))}
    for name, (value, allowed) in neutral.items():
        if value not in allowed:
            raise RequestError(f"{name}={value!r} is not supported by this server; leave {name} unset",
                               param=name)
    if body.stream_options is not None and not body.stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")


def _generation_request(body, model: ModelInfo, ids: list[int], max_tokens: int | None,
                        endpoint: str) -> GenerationRequest:
    if max_tokens is None:
        max_tokens = model.default_max_tokens
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    cfg, canvas = decode_config(model, max_tokens, body.temperature, body.seed, body.dllm)
    if canvas and not body.stream:
        raise RequestError("dllm.canvas streams the canvas and needs stream: true", param="dllm.canvas")
    if not ids:
        raise RequestError("the prompt is empty; send at least one token", param="prompt")
    total = len(ids) + cfg.gen_length
    if total > model.max_seq_len:
        room = model.max_seq_len - len(ids)
        fix = (f"lower max_tokens to at most {room - room % cfg.block_length}" if room >= cfg.block_length
               else f"shorten the prompt to at most {model.max_seq_len - cfg.block_length} tokens")
        raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens {max_tokens} rounded up to whole blocks "
                           f"of {cfg.block_length} ({cfg.gen_length}) is {total} tokens, more than the model's "
                           f"canvas of {model.max_seq_len}; {fix}", param="max_tokens",
                           code="context_length_exceeded")
    return GenerationRequest(tuple(int(t) for t in ids), cfg, max_tokens, stream=body.stream, canvas=canvas,
                             endpoint=endpoint, stop=_stop_strings(body.stop))


def _stop_strings(stop) -> tuple[str, ...]:
    """OpenAI's ``stop``: one string or a list of up to MAX_STOP non-empty strings (an empty list: none)."""
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOP:
        raise RequestError(f"stop holds {len(strings)} strings; send at most {MAX_STOP}", param="stop")
    if any(not s for s in strings):
        raise RequestError("stop strings must not be empty; drop the empty one", param="stop")
    return tuple(strings)


def _text_content(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise RequestError(f"messages[{index}] has a {part.type!r} content part; this model reads text only",
                               param=f"messages[{index}].content")
        parts.append(part.text)
    return "".join(parts)

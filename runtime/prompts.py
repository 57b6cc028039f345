"""Prompts at the edge: text, chat messages or token ids in, checked token ids out (``Pipeline.encode``).

Everything a user can get wrong in a prompt is caught here with a message that says what to do:
text that is not valid UTF-8, chat messages without a chat template, a batch where one prompt is
expected, ids outside the vocabulary. Characters the tokenizer does not know are accepted (the
tokenizer maps them to a special token), but a ``DllmWarning`` names them, so an answer to a
question that was silently changed never looks like the model's fault.
"""

from __future__ import annotations

import numbers
import warnings

import torch

from dllm.errors import ConfigError, DllmWarning, EngineDirError


def check_text(text: str, what: str = "the prompt") -> str:
    """``text`` if it is valid Unicode that encodes to UTF-8 (command lines may carry raw bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ConfigError(f"{what} is not valid UTF-8 (bytes {raw!r} at character {e.start}); pass UTF-8 text "
                          "(check the encoding of the terminal or the file it came from)") from None
    return text


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids | ({unk} if unk is not None else set())


def warn_unknown_characters(tokenizer, text: str, what: str = "the prompt") -> None:
    """Warn when ``text`` holds characters the tokenizer can only map to a special token (its "unknown").

    A special token may only come from its own literal text; one that covers other characters is a
    replacement. Tokenizers without offsets (slow ones) are not checked.
    """
    specials = _special_ids(tokenizer)
    if not specials or not text:
        return
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return
    replaced, by = [], set()
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid in specials and a < b and text[a:b] != tokenizer.convert_ids_to_tokens(tid):
            replaced.append(text[a:b])
            by.add(tokenizer.convert_ids_to_tokens(tid))
    if replaced:
        shown = sorted(set(replaced))
        warnings.warn(f"{what} has {len(replaced)} character(s) the tokenizer does not know, replaced by "
                      f"{sorted(by)}: {shown[:10]}{' ...' if len(shown) > 10 else ''}; the model sees the replacement "
                      "token instead, so rephrase without them for a faithful answer", DllmWarning, stacklevel=3)


def encode_text(tokenizer, text: str) -> list[int]:
    check_text(text)
    warn_unknown_characters(tokenizer, text)
    return [int(x) for x in tokenizer(text)["input_ids"]]


def check_messages(messages) -> list[dict]:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ConfigError(f"chat message {i} needs 'role' and 'content' keys, got {got}")
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise ConfigError(f"chat message {i}: {key!r} must be a string, got {type(m[key]).__name__}")
            check_text(m[key], f"chat message {i}'s {key}")
    return list(messages)


def _require_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where} has no chat template, so chat messages cannot be formatted; send the prompt as "
                          "plain text (drop --chat), or add a chat_template to tokenizer_config.json")


def _apply_template(tokenizer, messages: list[dict], where: str) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:   # jinja2 raises its own errors for templates that reject the messages
        raise ConfigError(f"{where}'s chat template rejected the messages ({type(e).__name__}: {e}); check the "
                          "roles and their order (e.g. user, assistant, user)") from None
    if hasattr(out, "keys") and "input_ids" in out:    # newer transformers may return a dict
        out = out["input_ids"]
    return [int(x) for x in out]


def encode_chat(tokenizer, messages, where: str = "the tokenizer") -> list[int]:
    """Chat messages through the tokenizer's chat template, with the assistant turn opened."""
    messages = check_messages(messages)
    _require_template(tokenizer, where)
    for i, m in enumerate(messages):
        warn_unknown_characters(tokenizer, m["content"], f"chat message {i}")
    return _apply_template(tokenizer, messages, where)


def encode_text_as_chat(tokenizer, text: str, where: str = "the tokenizer") -> list[int]:
    """A text prompt as the user turn of the chat template (how an instruct model expects a question),
    checked and reported as a text prompt."""
    check_text(text)
    if not text:
        raise ConfigError("the prompt is empty; pass text, chat messages or at least one token id")
    _require_template(tokenizer, where)
    warn_unknown_characters(tokenizer, text)
    return _apply_template(tokenizer, [{"role": "user", "content": text}], where)


def check_ids(prompt, vocab_size: int) -> list[int]:
    """Token ids of one prompt (a list, a 1-D or [1, P] tensor), each in [0, vocab_size)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() > 2 or (prompt.dim() == 2 and prompt.shape[0] != 1):
            raise ConfigError(f"the prompt tensor has shape {list(prompt.shape)}, a batch in one tensor; pass one "
                              "[P] or [1, P] tensor per prompt (a list of prompts decodes as a batch)")
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ConfigError(f"prompt ids must be integers, got a {prompt.dtype} tensor")
        ids = prompt.reshape(-1).tolist()
    else:
        ids = list(prompt)
        if any(isinstance(x, (list, tuple)) or (isinstance(x, torch.Tensor) and x.dim() > 0) for x in ids):
            raise ConfigError("the prompt mixes token ids and lists; pass one list of ids per prompt (a list of "
                              "such lists decodes as a batch)")
        for i, x in enumerate(ids):
            if isinstance(x, bool) or not isinstance(x, (numbers.Integral, torch.Tensor)):
                raise ConfigError(f"prompt id {i} is {x!r} ({type(x).__name__}); token ids are integers")
        ids = [int(x) for x in ids]
    if not ids:
        raise ConfigError("the prompt is empty; pass at least one token (e.g. the BOS id)")
    for i, x in enumerate(ids):
        if not 0 <= x < vocab_size:
            raise ConfigError(f"prompt id {x} (position {i}) is outside the vocabulary [0, {vocab_size}); pass ids "
                              "from this model's tokenizer")
    return ids


def load_tokenizer(tokenizer_dir):
    """The Hugging Face tokenizer stored in ``tokenizer_dir`` (local files only, no remote code)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # config.json of an unknown model type warns; harmless here
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:   # JSON errors, Rust panics, OSError: transformers passes them all through
        raise EngineDirError(f"the tokenizer in {tokenizer_dir} does not load ({type(e).__name__}: {str(e)[:200]}); "
                             "re-run dllm-export to copy the checkpoint's tokenizer files again, or pass "
                             "Pipeline(engines, tokenizer=...)") from None
    finally:
        hf_logging.set_verbosity(verbosity)

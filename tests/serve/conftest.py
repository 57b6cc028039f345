"""Helpers shared by the decode-worker tests: a chat request as the HTTP layer makes it, and a job's events."""

from __future__ import annotations

from dllm.runtime import DecodeConfig, method_config
from dllm.serve.jobs import Failed, Finished, GenerationRequest, Job


def request(pipe, text: str, method: str, **kw) -> GenerationRequest:
    """One user message, 32 tokens in one block of 32 steps, decoded with ``method``."""
    ids = pipe.encode([{"role": "user", "content": text}])
    cfg = method_config(method, DecodeConfig(gen_length=32, block_length=32, steps=32))
    return GenerationRequest(tuple(ids), cfg, 32, **kw)


async def drain(job: Job) -> list:
    """Every event of ``job`` up to and including its Finished or Failed."""
    events = []
    while True:
        events.append(await job.next_event())
        if isinstance(events[-1], (Finished, Failed)):
            return events

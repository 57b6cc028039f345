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


def stop_reference(pipe, req: GenerationRequest) -> tuple[str, int]:
    """The answer to ``req`` with its stop strings, from ``pipe`` run to the end: the final text cut before the
    earliest stop string, and the step at which the committed prefix (the text up to the first masked
    position) first held one (the generation's last step when none did)."""
    spec, P, hits = pipe.spec, len(req.prompt_ids), []

    def on_step(canvas, view, committed):
        prefix = []
        for t in canvas[0, P:P + req.max_tokens].tolist():
            if t == spec.mask_id or t in spec.eos_ids:
                break
            prefix.append(t)
        if any(s in pipe.tokenizer.decode(prefix, skip_special_tokens=True) for s in req.stop):
            hits.append(view.step)

    result = pipe.generate(list(req.prompt_ids), req.config, on_step=on_step)
    found = [i for i in (result.text.find(s) for s in req.stop) if i >= 0]
    return result.text[:min(found)] if found else result.text, hits[0] if hits else result.steps

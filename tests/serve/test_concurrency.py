"""16 streaming clients at once: each gets its own answer, equal to Pipeline.generate, while the
server decodes one request at a time (its queue takes the rest)."""

from __future__ import annotations

import asyncio
import re

import pytest

from dllm.runtime import DecodeConfig, method_config
from dllm.tools.tasks import generate

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-llada"
METHODS = ("full", "dcu+apd", "dual+threshold", "dcu+factor")


def test_sixteen_concurrent_streaming_clients(served, reference_pipeline):
    problems = generate("arithmetic", 8, seed=21) + generate("sorting", 8, seed=21)
    jobs = [(p.messages(), METHODS[i % len(METHODS)], 7 + i) for i, p in enumerate(problems)]
    temps = [0.0 if i % 2 else 0.8 for i in range(len(jobs))]       # half of them sample, each with its seed
    want = [reference_pipeline.generate(m, method_config(method, DecodeConfig(gen_length=32, block_length=32,
                                                                              steps=32, temperature=t, seed=seed))).text
            for (m, method, seed), t in zip(jobs, temps)]
    assert len(set(want)) > 8                                        # distinct answers, so mix-ups would show

    async def one(client, messages, method, seed, temperature):
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, stream=True,
                                                      temperature=temperature, seed=seed,
                                                      extra_body={"dllm": {"method": method}})
        parts = []
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
        return "".join(parts)

    async def everyone():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, m, method, seed, t) for (m, method, seed), t in zip(jobs, temps)))
        finally:
            await client.close()

    got = asyncio.run(everyone())
    assert got == want
    metrics = httpx.get(f"{served.url}/metrics").text
    assert "dllm_max_batch 1.0" in metrics
    waited = float(re.search(r"dllm_queue_wait_seconds_count ([0-9.]+)", metrics).group(1))
    assert waited >= 16

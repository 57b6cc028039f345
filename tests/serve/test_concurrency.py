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


@pytest.fixture(scope="module")
def served_batched(shipped_engine_dir):
    """The same server with --max-batch 4: requests that share a config share every step."""
    from dllm.serve.config import ServeConfig
    from dllm.serve.server import BackgroundServer

    server = BackgroundServer(ServeConfig(shipped_engine_dir, port=0, max_tokens=32, max_batch=4)).start()
    yield server
    server.stop()


def test_concurrent_clients_of_a_batching_server_get_their_own_answers(served_batched, reference_pipeline):
    problems = generate("arithmetic", 6, seed=5) + generate("sorting", 6, seed=5)
    methods = ("dcu+apd", "full")
    jobs = [(p.messages(), methods[i % 2]) for i, p in enumerate(problems)]
    want = [reference_pipeline.generate(m, method_config(method, DecodeConfig(gen_length=32, block_length=32,
                                                                              steps=32))).text
            for m, method in jobs]

    async def one(client, messages, method, stream):
        if not stream:
            reply = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32,
                                                         extra_body={"dllm": {"method": method}})
            return reply.choices[0].message.content
        chunks = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, stream=True,
                                                      extra_body={"dllm": {"method": method}})
        return "".join([c.choices[0].delta.content or "" async for c in chunks])

    async def everyone():
        client = openai.AsyncOpenAI(base_url=f"{served_batched.url}/v1", api_key="unused", max_retries=0,
                                    timeout=120)
        try:
            return await asyncio.gather(*(one(client, m, method, i % 3 != 0) for i, (m, method) in enumerate(jobs)))
        finally:
            await client.close()

    assert asyncio.run(everyone()) == want
    assert httpx.get(f"{served_batched.url}/health").json()["max_batch"] == 4
    metrics = httpx.get(f"{served_batched.url}/metrics").text
    assert "dllm_max_batch 4.0" in metrics
    done = sum(float(v) for v in re.findall(r'dllm_requests_total\{[^}]*outcome="ok"[^}]*\} ([0-9.]+)', metrics))
    assert done >= len(jobs)

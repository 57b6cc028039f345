"""Scale-out: the same app on a real local Ray cluster, 2 replicas on CPU, each with its own Pipeline;
Ray Serve's proxy spreads requests over both and every answer is still Pipeline.generate's."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dllm.runtime import DecodeConfig, method_config
from dllm.tools.tasks import generate

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-llada"


@pytest.fixture(scope="module")
def ray_url(shipped_engine_dir):
    """Ray (2 CPUs, no dashboard) started here, the app deployed with 2 replicas of 0.5 CPU each."""
    import ray

    from dllm.serve import ray_app
    from dllm.serve.config import RayConfig, ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")           # a test cluster reports nothing anywhere
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray_app.deploy(ServeConfig(shipped_engine_dir, port=port, max_tokens=32),
                                 RayConfig(replicas=2, num_cpus=0.5))
        finally:
            ray_app.shutdown()
            ray.shutdown()


def test_two_replicas_share_the_requests_and_answer_correctly(ray_url, reference_pipeline):
    problems = generate("arithmetic", 6, seed=5) + generate("sorting", 6, seed=5)
    cfg = method_config("dcu+apd", DecodeConfig(gen_length=32, block_length=32, steps=32))
    want = [reference_pipeline.generate(p.messages(), cfg).text for p in problems]

    async def ask_all():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(p):
                r = await client.post(f"{ray_url}/v1/chat/completions",
                                      json={"model": MODEL, "messages": p.messages(), "max_tokens": 32})
                return r.status_code, r.headers.get("x-dllm-replica"), r.json()
            return await asyncio.gather(*(one(p) for p in problems))

    replies = asyncio.run(ask_all())
    assert [status for status, _, _ in replies] == [200] * len(problems), replies
    assert [body["choices"][0]["message"]["content"] for _, _, body in replies] == want
    replicas = {replica for _, replica, _ in replies}
    for _ in range(20):                              # spread by Ray Serve's router; a few more tries at most
        if len(replicas) == 2:
            break
        replicas.add(httpx.get(f"{ray_url}/health", timeout=30).headers["x-dllm-replica"])
    assert len(replicas) == 2 and all(r.startswith("ray-") for r in replicas), replicas


def test_the_openai_client_streams_through_ray_serve(ray_url, reference_pipeline):
    messages = [{"role": "user", "content": "Sort: 52 71 19 4"}]
    want = reference_pipeline.generate(messages, method_config("full", DecodeConfig(gen_length=32, steps=32))).text
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, stream=True,
                                            extra_body={"dllm": {"method": "full"}})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    with pytest.raises(openai.BadRequestError, match="max_tokens"):       # errors pass through the proxy as 4xx
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=0)
    metrics = httpx.get(f"{ray_url}/metrics", timeout=30).text
    assert "dllm_max_batch 1.0" in metrics and 'replica="ray-' in metrics


def test_deployment_settings_pass_through_to_ray_serve(tmp_path):
    from dllm.errors import ConfigError
    from dllm.serve.config import RayConfig, ServeConfig
    from dllm.serve.ray_app import deployment

    config = ServeConfig(tmp_path)
    d = deployment(config, RayConfig(replicas=3, num_cpus=2, num_gpus=1, max_ongoing_requests=4))
    assert d.num_replicas == 3 and d.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    assert d.max_ongoing_requests == 4
    scaling = {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 2}
    d = deployment(config, RayConfig(replicas=None, autoscaling=scaling))
    got = d._deployment_config.autoscaling_config
    assert (got.min_replicas, got.max_replicas, got.target_ongoing_requests) == (1, 5, 2)
    with pytest.raises(ConfigError, match="mn_replicas"):
        deployment(config, RayConfig(replicas=None, autoscaling={"mn_replicas": 1}))
    with pytest.raises(ConfigError, match="max_replicas"):
        deployment(config, RayConfig(replicas=None, autoscaling={"min_replicas": 5, "max_replicas": 3}))

"""Bad requests get OpenAI-style JSON errors with 4xx codes; a client that disconnects frees its slot;
the server keeps answering through all of it."""

from __future__ import annotations

import re
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-llada"
MSG = [{"role": "user", "content": "What is 47+38?"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MSG, **fields}


BAD = [
    # (body, status, param, a word of the message)
    (chat(model="gpt-4o"), 404, "model", "does not exist"),
    (chat(max_tokens=0), 400, "max_tokens", "at least 1"),
    (chat(max_tokens=-3), 400, "max_tokens", "at least 1"),
    (chat(max_tokens=2000), 400, "max_tokens", "canvas of 512"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "9" * 500}]}, 400, "max_tokens", "shorten the prompt"),
    (chat(dllm={"threshold": 2.0}), 400, "dllm", "threshold"),
    (chat(dllm={"method": "warp+speed"}), 400, "dllm", "unknown cache policy"),
    (chat(dllm={"budgett": 4}), 400, "dllm", "budgett"),
    (chat(dllm={"block_length": 0}), 400, "dllm.block_length", "block_length"),
    (chat(max_tokens=64, dllm={"method": "full", "steps": 7}), 400, "dllm", "steps"),
    (chat(dllm={"gen_length": 64}), 400, "dllm.gen_length", "max_tokens"),
    (chat(dllm={"canvas": True}), 400, "dllm.canvas", "stream"),
    (chat(temperature=-1.0), 400, "dllm", "temperature"),
    (chat(temperature="hot"), 400, "temperature", "temperature"),
    (chat(n=2), 400, "n", "n=2"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (chat(stop=["a", ""]), 400, "stop", "empty"),
    (chat(stop=3), 400, "stop", "stop: Input should be a valid string or input should be a valid list"),
    (chat(top_p=0.5), 400, "top_p", "top_p"),
    (chat(logprobs=True), 400, "logprobs", "logprobs"),
    (chat(tools=[{"type": "function"}]), 400, "tools", "unrecognized request argument"),
    ({"model": MODEL}, 400, "messages", "missing"),
    ({"model": MODEL, "messages": []}, 400, "messages", "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content", "text only"),
    (chat(stream_options={"include_usage": True}), 400, "stream_options", "stream: true"),
]


@pytest.mark.parametrize("body,status,param,word", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_chat_requests_get_openai_errors(served, body, status, param, word):
    resp = httpx.post(f"{served.url}/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert word in err["message"] and "\n" not in err["message"]


@pytest.mark.parametrize("body,param,word", [
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"model": MODEL, "prompt": [1, 2, 999]}, "prompt", "[0, 102)"),
    ({"model": MODEL, "prompt": [1, 2, 2]}, "prompt", "mask id"),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": "hi", "echo": True}, "echo", "echo"),
    ({"model": MODEL}, "prompt", "missing"),
    ({"model": MODEL, "prompt": 3}, "prompt", "prompt: Input should be a valid string or input should be a valid list"),
    ({"model": MODEL, "prompt": "hi", "stop": ["x", 3]}, "stop", "stop.1: Input should be a valid string"),
])
def test_bad_completion_requests(served, body, param, word):
    resp = httpx.post(f"{served.url}/v1/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param and word in resp.json()["error"]["message"]


def test_malformed_json_unknown_routes_and_methods(served):
    for raw in (b'{"model": "tiny-llada", "messages": [', b"not json", b""):
        resp = httpx.post(f"{served.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    resp = httpx.post(f"{served.url}/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    resp = httpx.post(f"{served.url}/v1/embeddings", json={})
    assert resp.status_code == 404 and "no route" in resp.json()["error"]["message"]
    resp = httpx.get(f"{served.url}/v1/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()


def test_the_openai_client_sees_the_errors_and_the_server_keeps_serving(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="threshold"):
        client.chat.completions.create(model=MODEL, messages=MSG, stream=True, extra_body={"dllm": {"threshold": 7}})
    out = client.chat.completions.create(model=MODEL, messages=MSG)
    assert out.choices[0].message.content == "85"
    metrics = httpx.get(f"{served.url}/metrics").text
    assert _metric(metrics, 'dllm_requests_total{endpoint="chat",outcome="rejected"}') >= 3


def _metric(text: str, name: str) -> float:
    m = re.search(re.escape(name) + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


def _wait_for(served, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{served.url}/metrics").text
        if predicate(text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"metrics never satisfied the condition:\n{text}")


LONG = {"model": MODEL, "messages": MSG, "max_tokens": 448, "dllm": {"method": "full"}}   # 448 one-token steps


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    before = httpx.get(f"{served.url}/metrics").text
    cancelled = _metric(before, 'dllm_requests_total{endpoint="chat",outcome="cancelled"}')
    steps = _metric(before, "dllm_decode_steps_total")
    body = {**LONG, "stream": True, "dllm": {"method": "full", "canvas": True}}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith('data: {"id"') and '"canvas"' in line
            if seen == 3:
                break                   # leave after three steps of 448
    after = _wait_for(served, lambda t: _metric(t, 'dllm_requests_total{endpoint="chat",outcome="cancelled"}')
                      == cancelled + 1 and _metric(t, "dllm_running_requests") == 0)
    assert _metric(after, "dllm_decode_steps_total") - steps < 300      # stopped between steps, long before 448
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=MSG).choices[0].message.content == "85"


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(served):
    before = httpx.get(f"{served.url}/metrics").text
    cancelled = _metric(before, 'dllm_requests_total{endpoint="chat",outcome="cancelled"}')
    steps = _metric(before, "dllm_decode_steps_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(5.0, read=0.3))
    after = _wait_for(served, lambda t: _metric(t, 'dllm_requests_total{endpoint="chat",outcome="cancelled"}')
                      == cancelled + 1 and _metric(t, "dllm_running_requests") == 0)
    assert _metric(after, "dllm_decode_steps_total") - steps < 300


def test_a_full_queue_answers_503_and_recovers(shipped_engine_dir):
    import asyncio

    from dllm.serve.app import load_state
    from dllm.serve.config import ServeConfig
    from dllm.serve.server import BackgroundServer

    state = load_state(ServeConfig(shipped_engine_dir, port=0, max_queue=1, max_tokens=32), warmup=False)

    async def scenario(url):
        async with httpx.AsyncClient(timeout=60) as client:
            body = {**LONG, "stream": True, "dllm": {"method": "full", "canvas": True}}
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as running:
                async for line in running.aiter_lines():
                    if '"canvas"' in line:
                        break                                        # the first request is decoding
                queued = asyncio.ensure_future(client.post(f"{url}/v1/chat/completions", json=LONG))
                while (await client.get(f"{url}/health")).json()["queue_depth"] < 1:
                    await asyncio.sleep(0.02)
                refused = await client.post(f"{url}/v1/chat/completions", json=LONG)
                queued.cancel()
            await asyncio.sleep(0.5)
            ok = await client.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MSG})
            return refused, ok

    with BackgroundServer(state.config, state=state) as server:
        refused, ok = asyncio.run(scenario(server.url))
        metrics = httpx.get(f"{server.url}/metrics").text
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert "--max-queue 1" in refused.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "85"
    assert _metric(metrics, 'dllm_requests_total{endpoint="chat",outcome="overloaded"}') == 1

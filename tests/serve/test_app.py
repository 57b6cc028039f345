"""dllm-serve on the shipped model, through the official openai client and raw HTTP: the answers
equal Pipeline.generate for the same DecodeConfig, streamed or not, chat or text completions."""

from __future__ import annotations

import json

import pytest

from dllm.runtime import DecodeConfig, method_config

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-llada"
ARITH = [{"role": "user", "content": "What is 47+38?"}]
SORT = [{"role": "user", "content": "Sort: 52 71 19 4"}]


def cfg(method: str, gen: int = 32, block: int = 32, **knobs) -> DecodeConfig:
    return method_config(method, DecodeConfig(gen_length=gen, block_length=block, steps=gen)).replace(**knobs)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def sse_chunks(resp) -> list:
    """The JSON chunks of a raw SSE response; checks that it ends with data: [DONE]."""
    lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_health_metrics_and_replica_header(served):
    models = httpx.get(f"{served.url}/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    health = httpx.get(f"{served.url}/health")
    assert health.json()["status"] == "ok" and health.json()["max_batch"] == 1
    assert health.headers["x-dllm-replica"] == health.json()["replica"] == models.headers["x-dllm-replica"]
    metrics = httpx.get(f"{served.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("dllm_requests_total", "dllm_queue_depth", "dllm_step_seconds_bucket", "dllm_batch_occupancy",
                 "dllm_completion_tokens_total", "dllm_prompt_tokens_total", "dllm_running_requests"):
        assert name in metrics.text
    assert "dllm_max_batch 1.0" in metrics.text        # requests run one at a time


@pytest.mark.parametrize("method,messages", [("full", SORT), ("dcu+apd", ARITH), ("dual+threshold", SORT),
                                             ("dcu+apd", SORT)])
def test_chat_equals_pipeline_generate(client, reference_pipeline, method, messages):
    want = reference_pipeline.generate(messages, cfg(method))
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32,
                                         extra_body={"dllm": {"method": method}})
    assert out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(want.prompt_ids)
    assert out.usage.completion_tokens == len(reference_pipeline.tokenizer(want.text, add_special_tokens=False)
                                              ["input_ids"])
    assert out.model_extra["dllm"]["steps"] == want.steps and out.model_extra["dllm"]["gen_length"] == 32

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, stream=True,
                                            extra_body={"dllm": {"method": method}})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert len({c.id for c in chunks}) == 1


def test_the_server_default_is_dcu_apd(client, reference_pipeline):
    want = reference_pipeline.generate(ARITH, cfg("dcu+apd"))
    out = client.chat.completions.create(model=MODEL, messages=ARITH)      # max_tokens: server default 32
    assert out.choices[0].message.content == want.text == "85"


def test_sampling_follows_temperature_and_seed(client, reference_pipeline):
    for seed in (1, 2):
        want = reference_pipeline.generate(SORT, cfg("full", temperature=1.5, seed=seed))
        out = client.chat.completions.create(model=MODEL, messages=SORT, max_tokens=32, temperature=1.5, seed=seed,
                                             extra_body={"dllm": {"method": "full"}})
        assert out.choices[0].message.content == want.text


def test_knobs_in_the_dllm_object(client, reference_pipeline):
    knobs = {"block_length": 8, "threshold": 0.5, "cache": "dual", "commit": "threshold"}
    want = reference_pipeline.generate(SORT, cfg("full", gen=32, block=8, cache="dual", commit="threshold",
                                                 threshold=0.5))
    out = client.chat.completions.create(model=MODEL, messages=SORT, max_tokens=32, extra_body={"dllm": knobs})
    assert out.choices[0].message.content == want.text
    assert out.model_extra["dllm"]["steps"] == want.steps


def test_max_tokens_rounds_the_canvas_up_and_cuts_the_answer(client, reference_pipeline):
    want = reference_pipeline.generate(SORT, cfg("full"))
    assert len(want.text) > 3                       # character-level tokenizer: 3 tokens = 3 characters
    out = client.chat.completions.create(model=MODEL, messages=SORT, max_tokens=3,
                                         extra_body={"dllm": {"method": "full"}})
    assert out.model_extra["dllm"]["gen_length"] == 32          # 3 rounded up to one block of 32
    assert out.choices[0].message.content == want.text[:3]
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    stream = client.chat.completions.create(model=MODEL, messages=SORT, max_tokens=3, stream=True,
                                            extra_body={"dllm": {"method": "full"}})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text[:3]


def test_stop_strings_end_the_answer_streamed_or_not(client, reference_pipeline):
    want = reference_pipeline.generate(SORT, cfg("full")).text
    assert want.startswith("4 19 52")
    extra = {"dllm": {"method": "full"}}
    out = client.chat.completions.create(model=MODEL, messages=SORT, max_tokens=32, stop=[" 5", "x"], extra_body=extra)
    assert out.choices[0].message.content == "4 19" and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len("4 19 5")          # up to the token that completes the stop string
    assert out.model_extra["dllm"]["steps"] <= 32
    stream = client.chat.completions.create(model=MODEL, messages=SORT, max_tokens=32, stop=" 5", stream=True,
                                            extra_body=extra)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "4 19"
    assert chunks[-1].choices[0].finish_reason == "stop"
    prompt = reference_pipeline.encode(SORT)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, stop="9", extra_body=extra)
    assert out.choices[0].text == "4 1" and out.choices[0].finish_reason == "stop"


def test_text_completions_with_text_and_token_id_prompts(client, served, reference_pipeline):
    prompt = reference_pipeline.tokenizer.apply_chat_template(SORT, add_generation_prompt=True, tokenize=False)
    want = reference_pipeline.generate(prompt, cfg("dcu+apd", gen=64), chat=False)   # already templated
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64)
    assert out.object == "text_completion" and out.choices[0].text == want.text
    ids = reference_pipeline.encode(prompt)
    raw = httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 64})
    assert raw.status_code == 200 and raw.json()["choices"][0]["text"] == want.text
    stream = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=64, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_stream_options_include_usage(served, reference_pipeline):
    want = reference_pipeline.generate(ARITH, cfg("dcu+apd"))
    body = {"model": MODEL, "messages": ARITH, "max_tokens": 32, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(resp)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == len(want.prompt_ids)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("method,block", [("full", 32), ("dual+threshold", 8)])
def test_canvas_stream_marks_committed_and_masked_positions(served, reference_pipeline, method, block):
    want = reference_pipeline.generate(SORT, cfg(method, block=block))
    body = {"model": MODEL, "messages": SORT, "max_tokens": 32, "stream": True,
            "dllm": {"method": method, "block_length": block, "canvas": True}}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body) as resp:
        chunks = sse_chunks(resp)
    steps = [c["dllm"] for c in chunks if c.get("dllm") and "canvas" in c["dllm"]]
    assert [s["step"] for s in steps] == list(range(1, want.steps + 1))          # one snapshot per step
    assert [s["committed"] for s in steps] == [sum(want.tokens_per_step[:i + 1]) for i in range(want.steps)]
    mask = reference_pipeline.spec.mask_id
    for s in steps:
        assert len(s["canvas"]) == len(s["ids"]) == 32 and s["masked"] == 32 - s["committed"]
        assert all((piece is None) == (t == mask) for piece, t in zip(s["canvas"], s["ids"]))
    assert steps[-1]["ids"] == want.ids and steps[-1]["masked"] == 0
    if method == "dual+threshold":
        assert max(want.tokens_per_step) > 1                           # several tokens commit in one step
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

"""The decode worker: one job at a time, cancelled jobs dropped or stopped between steps, and a
generation that raises ends that request only."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("prometheus_client")

from dllm.serve.jobs import Failed, Finished, GenerationRequest, Job, Progress  # noqa: E402
from tests.serve.conftest import drain, request, stop_reference  # noqa: E402


@pytest.fixture(scope="module")
def state(shipped_engine_dir):
    from dllm.serve.app import load_state
    from dllm.serve.config import ServeConfig

    state = load_state(ServeConfig(shipped_engine_dir, max_tokens=32), warmup=False)
    state.scheduler.start()
    yield state
    state.scheduler.stop()


def test_jobs_run_in_order_and_a_failing_generation_spares_the_worker(state, reference_pipeline):
    pipe = state.pipeline
    good = request(pipe, "What is 47+38?", "full", stream=True)
    bad = GenerationRequest(good.prompt_ids + (pipe.spec.mask_id,), good.config, 32)   # the loop refuses mask ids
    want = reference_pipeline.generate(list(good.prompt_ids), good.config).text

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job(r, loop) for r in (good, bad, good)]
        for j in jobs:
            state.scheduler.submit(j)
        return [await drain(j) for j in jobs]

    first, failed, again = asyncio.run(run())
    assert isinstance(failed[-1], Failed) and "mask id" in failed[-1].message
    for events in (first, again):
        assert isinstance(events[-1], Finished) and events[-1].full_text == want
        assert all(isinstance(e, Progress) for e in events[:-1]) and len(events) > 1
        assert "".join(e.text for e in events) == want                  # deltas + the rest = the answer
    deadline = time.monotonic() + 10
    while state.scheduler.running and time.monotonic() < deadline:   # the worker resets it after the last event
        time.sleep(0.01)
    assert state.scheduler.depth == 0 and state.scheduler.running == 0


def test_a_stop_string_ends_the_generation_at_the_step_that_commits_it(state, reference_pipeline):
    pipe = state.pipeline
    reqs = [request(pipe, "Sort: 52 71 19 3 88", "full", stream=stream, stop=(" 1",)) for stream in (True, False)]
    text, steps = stop_reference(reference_pipeline, reqs[0])
    assert text == "3" and steps < reqs[0].config.steps
    before = state.metrics.decode_steps._value.get()

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job(r, loop) for r in reqs]
        for j in jobs:
            state.scheduler.submit(j)
        return [await drain(j) for j in jobs]

    for events in asyncio.run(run()):
        assert isinstance(events[-1], Finished) and (events[-1].full_text, events[-1].steps) == (text, steps)
        assert "".join(e.text for e in events) == text and events[-1].finish_reason.value == "stop"
    assert state.metrics.decode_steps._value.get() - before == 2 * steps       # no step after the stop


def test_a_queued_job_cancelled_before_it_starts_never_runs(state):
    pipe = state.pipeline
    long = request(pipe, "Sort: 5 3 1", "full")
    long = GenerationRequest(long.prompt_ids, long.config.replace(gen_length=256, steps=256), 256, stream=True,
                             canvas=True)                     # an event after every step
    short = request(pipe, "What is 1+2?", "full")

    async def run():
        loop = asyncio.get_running_loop()
        first, doomed, last = Job(long, loop), Job(short, loop), Job(short, loop)
        for j in (first, doomed, last):
            state.scheduler.submit(j)
        step = (await first.next_event()).canvas.step      # the first job is running, the other two wait
        doomed.cancel()
        first.cancel()
        done = await drain(last)
        return step, first, doomed, done

    step, first, doomed, done = asyncio.run(run())
    assert step == 1
    assert first._events.qsize() <= 1        # stopped after the step it was in when cancelled: no Finished
    assert doomed._events.empty()            # no event at all: it was dropped from the queue
    assert isinstance(done[-1], Finished) and done[-1].completion_tokens > 0

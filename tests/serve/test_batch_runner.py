"""The batching decode worker (--max-batch > 1): requests that share a decoding config share every step,
each gets exactly the answer it gets alone, is answered when its own sequence ends, and a cancelled or
bad request changes no other."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("prometheus_client")

from dllm.serve.jobs import Failed, Finished, GenerationRequest, Job, Progress  # noqa: E402
from tests.serve.conftest import drain, request, stop_reference  # noqa: E402


@pytest.fixture(scope="module")
def state(shipped_engine_dir):
    from dllm.serve.app import load_state
    from dllm.serve.config import ServeConfig
    from dllm.serve.scheduler import BatchRunner

    state = load_state(ServeConfig(shipped_engine_dir, max_tokens=32, max_batch=4), warmup=False)
    assert isinstance(state.scheduler.runner, BatchRunner) and state.scheduler.runner.max_batch == 4
    return state           # each test runs its own worker over this runner (run_batch)


def run_batch(state, requests, cancel_after_first_event: int | None = None):
    """Submit every request to a fresh worker, then start it, so that they form one batch; returns each job's
    events and the order in which the jobs finished."""
    from dllm.serve.scheduler import Scheduler

    scheduler = Scheduler(state.scheduler.runner, state.metrics, max_queue=16)

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job(r, loop) for r in requests]
        for j in jobs:
            scheduler.submit(j)
        order = []

        async def watch(i, job):
            if i == cancel_after_first_event:
                await job.next_event()
                job.cancel()
                return None
            events = await drain(job)
            order.append(i)
            return events

        scheduler.start()
        try:
            return await asyncio.gather(*(watch(i, j) for i, j in enumerate(jobs))), order
        finally:
            await loop.run_in_executor(None, scheduler.stop)

    return asyncio.run(run())


def test_a_batch_answers_each_request_as_alone_and_as_soon_as_it_ends(state, reference_pipeline):
    pipe = state.pipeline
    texts = ["What is 47+38?", "Sort: 52 71 19 3 88", "What is 5+6?", "Sort: 9 4 7"]
    reqs = [request(pipe, t, "dcu+apd", stream=i % 2 == 0) for i, t in enumerate(texts)]
    reqs.append(request(pipe, "What is 12+7?", "full"))            # another config: its own batch
    want = [reference_pipeline.generate(list(r.prompt_ids), r.config).text for r in reqs]
    steps = [reference_pipeline.generate(list(r.prompt_ids), r.config).steps for r in reqs]
    assert len(set(steps[:4])) > 1                                          # they end at different steps
    before = state.metrics.decode_steps._value.get()
    results, order = run_batch(state, reqs)
    for events, text, r in zip(results, want, reqs):
        assert isinstance(events[-1], Finished) and events[-1].full_text == text
        if r.stream:
            assert all(isinstance(e, Progress) for e in events[:-1])
            assert "".join(e.text for e in events) == text
    # the dcu+apd four share steps: the batch ran as many steps as its longest sequence, not their sum
    ran = state.metrics.decode_steps._value.get() - before
    assert ran == max(steps[:4]) + steps[4]
    # and whoever needed the fewest steps was answered first
    assert order[0] == min(range(4), key=lambda i: steps[i])


def test_a_cancelled_request_leaves_its_batch_mates_unchanged(state, reference_pipeline):
    pipe = state.pipeline
    long = request(pipe, "Sort: 5 3 1", "full", stream=True, canvas=True)      # an event every step
    others = [request(pipe, t, "full") for t in ("What is 30+4?", "Sort: 8 2 6")]
    want = [reference_pipeline.generate(list(r.prompt_ids), r.config).text for r in others]
    results, _ = run_batch(state, [others[0], long, others[1]], cancel_after_first_event=1)
    assert results[1] is None
    assert [events[-1].full_text for events in (results[0], results[2])] == want


def test_a_stop_string_ends_its_sequence_early_and_changes_no_batch_mate(state, reference_pipeline):
    pipe = state.pipeline
    sort = "Sort: 52 71 19 3 88"                  # `full` commits "3 1" at step 28 of 32, "3 19 5" at 30
    reqs = [request(pipe, sort, "full", stream=True, stop=(" ",)), request(pipe, "What is 47+38?", "full"),
            request(pipe, sort, "full", stream=True, stop=("52", "zz")), request(pipe, sort, "full", stop=("9",))]
    want = [stop_reference(reference_pipeline, r) for r in reqs]
    assert [w[0] for w in want] == ["3", "85", "3 19 ", "3 1"]
    assert want[0][1] < reqs[0].config.steps and want[2][1] == reqs[2].config.steps     # one ends early
    results, order = run_batch(state, reqs)
    for events, (text, steps), r in zip(results, want, reqs):
        done = events[-1]
        assert isinstance(done, Finished) and (done.full_text, done.steps) == (text, steps)
        assert done.finish_reason.value == "stop"
        if r.stream:
            assert "".join(e.text for e in events) == text and "5" not in "".join(e.text for e in events[:-1])
    assert order[0] == 0                          # answered at its stop, before its batch-mates end
    assert results[0][-1].completion_tokens == 2 and results[2][-1].completion_tokens == 7


def test_a_bad_request_fails_alone(state, reference_pipeline):
    pipe = state.pipeline
    good = request(pipe, "What is 47+38?", "dcu+apd")
    bad = GenerationRequest(good.prompt_ids + (pipe.spec.mask_id,), good.config, 32)   # the loop refuses mask ids
    long = GenerationRequest(good.prompt_ids * 100, good.config, 32)                  # beyond max_seq_len
    results, _ = run_batch(state, [good, bad, good, long])
    want = reference_pipeline.generate(list(good.prompt_ids), good.config).text
    assert isinstance(results[1][-1], Failed) and "mask id" in results[1][-1].message
    assert isinstance(results[3][-1], Failed) and "max_seq_len" in results[3][-1].message
    assert results[0][-1].full_text == results[2][-1].full_text == want


def test_max_batch_defaults_and_limits(shipped_engine_dir):
    from dllm.errors import ConfigError
    from dllm.serve.app import serving_batch
    from dllm.serve.config import ServeConfig

    assert serving_batch(ServeConfig(shipped_engine_dir), 8) == 1                     # CPU: one at a time
    assert serving_batch(ServeConfig(shipped_engine_dir, device="cuda"), 8) == 8      # GPU: the engines' limit
    assert serving_batch(ServeConfig(shipped_engine_dir, device="cuda"), None) == 8   # torch checkpoint
    assert serving_batch(ServeConfig(shipped_engine_dir, max_batch=3), 8) == 3
    with pytest.raises(ConfigError, match=r"--max-batch 9 exceeds the 8 .*dllm-export --max-batch 9"):
        serving_batch(ServeConfig(shipped_engine_dir, max_batch=9), 8)
    with pytest.raises(ConfigError, match="--max-batch must be an integer >= 1"):
        ServeConfig(shipped_engine_dir, max_batch=0)


def test_a_job_taken_in_while_a_batch_runs_gets_its_answer_alone(state, reference_pipeline):
    """Between two steps the runner offers its free slots to the queue (``more``): a job with the batch's
    config and a prompt that fits its canvas joins the running batch and gets exactly its answer alone; a
    job with another config, or a longer prompt, is not taken."""
    pipe, runner = state.pipeline, state.scheduler.runner
    first = [request(pipe, t, "dcu+apd") for t in ("What is 47+38?", "Sort: 9 4 7")]
    late = request(pipe, "What is 5+6?", "dcu+apd", stream=True)
    ref = [reference_pipeline.generate(list(r.prompt_ids), r.config) for r in (*first, late)]
    (a, c), L = sorted(r.steps for r in ref[:2])[::-1], ref[2].steps
    assert a > c + 1                                     # the short one frees its slot while the long one runs
    offers = []

    async def run():
        loop = asyncio.get_running_loop()
        jobs, late_job = [Job(r, loop) for r in first], Job(late, loop)
        for job in (*jobs, late_job):
            job.started = job.submitted                  # what the scheduler sets when it takes a job
        longer = Job(request(pipe, "Sort: 52 71 19 3 88 14 27 60 33 45 2 99", "dcu+apd"), loop)
        other = Job(request(pipe, "What is 5+6?", "full"), loop)
        queue = [late_job]

        def more(fits, n):
            offers.append(n)
            assert not fits(other) and not fits(longer) and fits(late_job)
            taken, queue[:] = queue[:n], queue[n:]
            return taken

        before = state.metrics.decode_steps._value.get()
        watched = asyncio.gather(*(drain(j) for j in (*jobs, late_job)))
        await loop.run_in_executor(None, runner.run, jobs, more)
        return await asyncio.wait_for(watched, 60), state.metrics.decode_steps._value.get() - before

    events, ran = asyncio.run(run())
    assert [e[-1].full_text for e in events] == [r.text for r in ref]
    assert "".join(e.text for e in events[2]) == ref[2].text                 # streamed as it decoded
    assert offers[0] == 1                   # offered once a slot was free (a CPU batch has a slot per job)
    # it shared the long job's steps, starting right after the short one's last step (no idle step)
    assert ran == max(a, c + L) < a + L


def test_the_queue_gives_a_running_batch_only_what_fits_from_its_head(state):
    """Scheduler._take_more: jobs from the head of the queue while they fit, cancelled ones dropped; a job
    that does not fit stays first in line and nothing behind it overtakes it."""
    from dllm.serve.scheduler import Scheduler

    pipe = state.pipeline
    scheduler = Scheduler(state.scheduler.runner, state.metrics, max_queue=8)

    async def run():
        loop = asyncio.get_running_loop()
        dcu = [Job(request(pipe, t, "dcu+apd"), loop) for t in ("a", "b", "c")]
        full = Job(request(pipe, "d", "full"), loop)
        for job in (dcu[0], dcu[1], full, dcu[2]):
            scheduler.submit(job)
        dcu[1].cancel()
        fits = lambda job: job.request.config == dcu[0].request.config       # noqa: E731
        assert scheduler._take_more(fits, 5) == [dcu[0]]                   # b dropped, stops at the full job
        assert list(scheduler._queue) == [full, dcu[2]] and dcu[0].started is not None
        assert scheduler._take_more(lambda job: True, 1) == [full]
        assert scheduler._take_more(fits, 0) == [] and list(scheduler._queue) == [dcu[2]]

    asyncio.run(run())

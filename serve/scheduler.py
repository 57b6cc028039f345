"""The decode worker: one thread takes queued requests in batches and hands each batch to a Runner.

```
HTTP handlers --submit(Job)--> queue --take <= runner.max_batch--> Runner.run(batch) --emit--> Job events
```
The HTTP layer only submits jobs and reads their events. A runner decides how a batch is decoded:
``SequentialRunner`` runs one request at a time through ``Pipeline.generate`` (``max_batch`` 1: the others
queue); ``BatchRunner`` takes up to ``--max-batch`` jobs and decodes those that share a decoding config
together (``Pipeline.generate([...])``: one step serves them all, each gets exactly its tokens alone),
answering each job as soon as its own sequence ends.

Between two steps a runner checks each job's cancel flag (set when its client disconnects) and stops
that job; a queued job that was cancelled is dropped without running. Nothing a request does can stop
the worker: every exception ends that request only.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Protocol

from dllm.errors import DllmError
from dllm.serve.jobs import Cancelled, Failed, IncrementalText, Job, Outcome
from dllm.serve.metrics import ServeMetrics

log = logging.getLogger("dllm.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


class Runner(Protocol):
    """Decodes a batch of at most ``max_batch`` jobs, emitting each job's events (Progress..., then
    Finished or Failed; nothing for a job it stopped because it was cancelled)."""
    max_batch: int

    def run(self, jobs: list[Job]) -> None: ...


class SequentialRunner:
    """One job at a time on one Pipeline (``Pipeline.generate`` with a per-step callback)."""
    max_batch = 1

    def __init__(self, pipeline, metrics: ServeMetrics):
        self.pipeline = pipeline
        self.metrics = metrics

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._run_one(job)

    def _run_one(self, job: Job) -> None:
        req, pipe, metrics = job.request, self.pipeline, self.metrics
        P = len(req.prompt_ids)
        text = IncrementalText(pipe.tokenizer, pipe.spec.mask_id, pipe.spec.eos_ids, req)
        last = time.perf_counter()

        def on_step(canvas, view, committed):       # canvas [1, P + G] on the engine's device
            nonlocal last
            now = time.perf_counter()
            metrics.step_seconds.observe(now - last)
            metrics.decode_steps.inc()
            last = now
            if job.cancelled:
                raise Cancelled
            if req.stream:
                progress = text.step(view.step, canvas[0, P:].tolist())
                if progress is not None:
                    job.emit(progress)

        try:
            result = pipe.generate(list(req.prompt_ids), req.config, on_step=on_step)
        except Cancelled:
            metrics.count(req.endpoint, Outcome.CANCELLED)
            return
        except DllmError as e:      # the runtime refused the request (validation should have caught it)
            log.warning("generation refused: %s", e)
            metrics.count(req.endpoint, Outcome.FAILED)
            job.emit(Failed(f"generation failed: {e}"))
            return
        except Exception as e:      # noqa: BLE001 - a request must never take the worker down
            log.exception("generation failed")
            metrics.count(req.endpoint, Outcome.FAILED)
            job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        done = text.finish(result.ids, P, result.steps, result.wall_s, job.started - job.submitted)
        metrics.prompt_tokens.inc(P)
        metrics.completion_tokens.inc(done.completion_tokens)
        metrics.request_seconds.observe(time.perf_counter() - job.submitted)
        metrics.count(req.endpoint, Outcome.OK)
        job.emit(done)


class BatchRunner:
    """Up to ``max_batch`` jobs per call on one Pipeline. Jobs with the same DecodeConfig share every step
    (in arrival order of their first job, a group after another); a job whose client went away is dropped
    between two steps without changing its batch-mates' tokens (``stop``), and each job is answered when
    its sequence ends (``on_result``), not when the batch does."""

    def __init__(self, pipeline, metrics: ServeMetrics, max_batch: int):
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_batch = max_batch
        self._single = SequentialRunner(pipeline, metrics)

    def run(self, jobs: list[Job]) -> None:
        groups: dict = {}
        for job in jobs:
            groups.setdefault(job.request.config, []).append(job)
        for group in groups.values():
            if len(group) == 1:
                self._single.run(group)
            else:
                self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
        pipe, metrics = self.pipeline, self.metrics
        reqs = [j.request for j in jobs]
        texts = [IncrementalText(pipe.tokenizer, pipe.spec.mask_id, pipe.spec.eos_ids, r) for r in reqs]
        answered: set[int] = set()
        first_step = last_step = pipe.executor.steps_run
        last = time.perf_counter()

        def on_step(i, canvas, view, committed):        # canvas [1, P + G] of job i
            nonlocal last_step, last
            if pipe.executor.steps_run != last_step:      # the first sequence reported of a new batched step
                now = time.perf_counter()
                metrics.step_seconds.observe(now - last)
                metrics.decode_steps.inc()
                last_step, last = pipe.executor.steps_run, now
            if reqs[i].stream and not jobs[i].cancelled:
                progress = texts[i].step(view.step, canvas[0, len(reqs[i].prompt_ids):].tolist())
                if progress is not None:
                    jobs[i].emit(progress)

        def on_result(i, result):
            job, req = jobs[i], reqs[i]
            P = len(req.prompt_ids)
            done = texts[i].finish(result.ids, P, result.steps, result.wall_s, job.started - job.submitted)
            metrics.prompt_tokens.inc(P)
            metrics.completion_tokens.inc(done.completion_tokens)
            metrics.request_seconds.observe(time.perf_counter() - job.submitted)
            metrics.count(req.endpoint, Outcome.OK)
            answered.add(i)
            job.emit(done)

        try:
            pipe.generate([list(r.prompt_ids) for r in reqs], reqs[0].config, on_step=on_step,
                          stop=lambda i: jobs[i].cancelled, on_result=on_result, batch_size=len(jobs))
        except DllmError as e:
            if pipe.executor.steps_run == first_step:
                # refused before any step (one bad prompt refuses the batch): run them one by one, so that
                # only the bad one fails
                log.info("batch refused (%s); running its %d jobs one at a time", e, len(jobs))
                self._single.run(jobs)
                return
            self._fail(jobs, answered, f"generation failed: {e}")
            return
        except Exception as e:      # noqa: BLE001 - a request must never take the worker down
            log.exception("batched generation failed")
            self._fail(jobs, answered, f"generation failed: {type(e).__name__}: {e}")
            return
        for i, job in enumerate(jobs):
            if i not in answered:                            # dropped by stop(): its client went away
                metrics.count(job.request.endpoint, Outcome.CANCELLED)

    def _fail(self, jobs: list[Job], answered: set[int], message: str) -> None:
        for i, job in enumerate(jobs):
            if i not in answered:
                self.metrics.count(job.request.endpoint, Outcome.FAILED)
                job.emit(Failed(message))


class Scheduler:
    """A bounded queue and the one worker thread that drains it through a Runner."""

    def __init__(self, runner: Runner, metrics: ServeMetrics, max_queue: int):
        self.runner = runner
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch: list[Job] = []
        self.running = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dllm-decode-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Drop queued jobs, stop the running ones after their current step, join the worker."""
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancel()
                job.emit(Failed("the server is shutting down"))
            self._queue.clear()
            self.metrics.queue_depth.set(0)
            for job in self._batch:
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (--max-queue {self.max_queue})")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def _take(self) -> list[Job] | None:
        """The next batch: waits for one job, then takes whatever else is queued, up to max_batch."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                batch = []
                while self._queue and len(batch) < self.runner.max_batch:
                    job = self._queue.popleft()
                    if job.cancelled:        # its client left while it waited
                        self.metrics.count(job.request.endpoint, Outcome.CANCELLED)
                        continue
                    batch.append(job)
                self.metrics.queue_depth.set(len(self._queue))
                if batch:
                    return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.perf_counter()
            for job in batch:
                job.started = now
                self.metrics.queue_seconds.observe(now - job.submitted)
            with self._cond:
                self._batch = batch
            self.running = len(batch)
            self.metrics.running.set(len(batch))
            self.metrics.batch_occupancy.set(len(batch) / self.runner.max_batch)
            try:
                self.runner.run(batch)
            except Exception as e:      # noqa: BLE001 - a runner bug ends its batch, never the worker
                log.exception("runner failed")
                for job in batch:
                    self.metrics.count(job.request.endpoint, Outcome.FAILED)
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self._batch = []
                self.running = 0
                self.metrics.running.set(0)
                self.metrics.batch_occupancy.set(0)

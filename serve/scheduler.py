"""The decode worker: one thread takes queued requests in batches and hands each batch to a Runner.

```
HTTP handlers --submit(Job)--> queue --take <= runner.max_batch--> Runner.run(batch) --emit--> Job events
```
The HTTP layer only submits jobs and reads their events. A runner decides how a batch is decoded:
``SequentialRunner`` runs one request at a time through ``Pipeline.generate`` (``max_batch`` 1: the others
queue); ``BatchRunner`` takes up to ``--max-batch`` jobs and decodes those that share a decoding config
together (the runtime's ``BatchDecoder``: one step serves them all, each gets exactly its tokens alone),
answering each job as soon as its own sequence ends, and takes jobs that arrive meanwhile into free slots
between two steps (``more``: step-level continuous batching of the queue).

Between two steps a runner checks each job's cancel flag (set when its client disconnects) and stops
that job; a queued job that was cancelled is dropped without running. A job with stop strings is answered,
and its sequence stopped, at the step whose committed prefix first holds one. Nothing a request does can
stop the worker: every exception ends that request only.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Protocol

from dllm.errors import DllmError
from dllm.serve.jobs import Cancelled, Failed, Finished, IncrementalText, Job, Outcome
from dllm.serve.metrics import ServeMetrics

log = logging.getLogger("dllm.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


class _StopStringHit(Exception):
    """Raised between two steps to end a generation whose committed prefix holds one of its stop strings."""


# more(fits, n): up to n queued jobs, taken from the head of the queue while fits(job) holds (the worker's
# admission of late jobs into a running batch; an empty list when none qualifies)
TakeMore = Callable[[Callable[[Job], bool], int], list[Job]]


class Runner(Protocol):
    """Decodes a batch of at most ``max_batch`` jobs, emitting each job's events (Progress..., then
    Finished or Failed; nothing for a job it stopped because it was cancelled). A runner may take more
    jobs from the queue while it runs (``more``)."""
    max_batch: int

    def run(self, jobs: list[Job], more: TakeMore | None = None) -> None: ...


class SequentialRunner:
    """One job at a time on one Pipeline (``Pipeline.generate`` with a per-step callback)."""
    max_batch = 1

    def __init__(self, pipeline, metrics: ServeMetrics):
        self.pipeline = pipeline
        self.metrics = metrics

    def run(self, jobs: list[Job], more: TakeMore | None = None) -> None:
        for job in jobs:          # one at a time: later jobs wait in the queue, so ``more`` is not used
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
            if req.stream or req.stop:
                progress = text.step(view.step, canvas[0, P:].tolist())
                if progress is not None:
                    job.emit(progress)
                if text.stopped:
                    raise _StopStringHit(view.step)

        try:
            result = pipe.generate(list(req.prompt_ids), req.config, on_step=on_step)
        except Cancelled:
            metrics.count(req.endpoint, Outcome.CANCELLED)
            return
        except _StopStringHit as hit:
            _answer(metrics, job, text.finish(None, P, hit.args[0], time.perf_counter() - job.started,
                                              job.started - job.submitted))
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
        _answer(metrics, job, text.finish(result.ids, P, result.steps, result.wall_s, job.started - job.submitted))


class BatchRunner:
    """Up to ``max_batch`` jobs at a time on one Pipeline. Jobs with the same DecodeConfig share every step
    (in arrival order of their first job, a group after another); a job whose client went away is dropped
    between two steps without changing its batch-mates' tokens, and each job is answered when its sequence
    ends, not when the batch does. The last group also takes queued jobs that arrive while it runs
    (``more``): between two steps, while it has a free slot and the job at the head of the queue shares
    its config and fits its canvas (a longer prompt, or another config, waits for the next batch, and
    stops admission so that it is not overtaken for ever).

    Slots: on CUDA the batch keeps ``max_batch`` slots, since a step reads every weight once whatever the
    batch and a free slot costs little; on the CPU a slot costs its compute, so a batch has as many slots
    as it starts with jobs, and late jobs take the slots of finished ones."""

    def __init__(self, pipeline, metrics: ServeMetrics, max_batch: int):
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_batch = max_batch

    def run(self, jobs: list[Job], more: TakeMore | None = None) -> None:
        groups: dict = {}
        for job in jobs:
            groups.setdefault(job.request.config, []).append(job)
        groups = list(groups.values())
        for n, group in enumerate(groups):
            self._run_group(group, more if n == len(groups) - 1 else None)

    def _run_group(self, jobs: list[Job], more: TakeMore | None) -> None:
        from dllm.runtime.loop import BatchDecoder, batch_canvas_length
        from dllm.threads import torch_threads

        pipe, metrics = self.pipeline, self.metrics
        cfg, spec, executor = jobs[0].request.config, pipe.spec, pipe.executor
        limit = pipe.max_seq_len or spec.max_seq_len
        # the canvas of the prompts that fit the engines (one too long is refused at submit, on its own)
        lengths = [n for n in (len(j.request.prompt_ids) for j in jobs) if n + cfg.gen_length <= limit]
        N = batch_canvas_length(executor, lengths, cfg.gen_length, limit) if lengths else limit
        slots = self.max_batch if pipe.engines.device.type == "cuda" else len(jobs)
        members = list(jobs)                        # every job of this batch, late ones included
        by_index: dict[int, Job] = {}
        texts: dict[int, IncrementalText] = {}
        closed: set[int] = set()                    # id() of the jobs answered or refused
        last = time.perf_counter()

        def on_result(i, result):
            job = by_index[i]
            closed.add(id(job))
            _answer(metrics, job, texts[i].finish(result.ids, len(job.request.prompt_ids), result.steps,
                                                  result.wall_s, job.started - job.submitted))

        def add(job: Job) -> None:
            req = job.request
            try:
                i = batch.submit(list(req.prompt_ids))
            except DllmError as e:         # the runtime refused this request: it fails alone
                log.warning("request refused: %s", e)
                metrics.count(req.endpoint, Outcome.FAILED)
                closed.add(id(job))
                job.emit(Failed(f"generation failed: {e}"))
                return
            by_index[i] = job
            texts[i] = IncrementalText(pipe.tokenizer, spec.mask_id, spec.eos_ids, req)

        def fits(job: Job) -> bool:
            return job.request.config == cfg and len(job.request.prompt_ids) <= batch.room

        try:
            with torch_threads(pipe.engines.torch_threads):
                batch = BatchDecoder(pipe.engines, cfg, slots, N, executor=executor, max_seq_len=pipe.max_seq_len,
                                     stop=lambda i: by_index[i].cancelled or id(by_index[i]) in closed,
                                     on_finish=on_result)
                for job in jobs:
                    add(job)
                while True:
                    if more is not None and batch.free_slots > 0:
                        for job in more(fits, batch.free_slots):
                            members.append(job)
                            add(job)
                    events = batch.step()
                    if not events:
                        break
                    now = time.perf_counter()
                    metrics.step_seconds.observe(now - last)
                    metrics.decode_steps.inc()
                    last = now
                    rows = None                            # the batch's canvas on the host, once per step
                    for i, _, view, _ in events:           # job i's step
                        job, req = by_index[i], by_index[i].request
                        if (req.stream or req.stop) and not job.cancelled and id(job) not in closed:
                            if rows is None:               # one device copy, not one per sequence
                                rows = batch.canvas.to("cpu")
                                slot = {run.index: b for b, run in enumerate(batch.slots) if run is not None}
                            P = len(req.prompt_ids)
                            progress = texts[i].step(view.step, rows[slot[i], P:P + cfg.gen_length].tolist())
                            if progress is not None:
                                job.emit(progress)
                            if texts[i].stopped:       # answered now; stop() drops its sequence
                                closed.add(id(job))
                                _answer(metrics, job, texts[i].finish(None, P, view.step,
                                                                      time.perf_counter() - job.started,
                                                                      job.started - job.submitted))
        except DllmError as e:
            self._fail(members, closed, f"generation failed: {e}")
            return
        except Exception as e:      # noqa: BLE001 - a request must never take the worker down
            log.exception("batched generation failed")
            self._fail(members, closed, f"generation failed: {type(e).__name__}: {e}")
            return
        for job in members:
            if id(job) not in closed:                        # dropped by stop(): its client went away
                metrics.count(job.request.endpoint, Outcome.CANCELLED)

    def _fail(self, jobs: list[Job], closed: set[int], message: str) -> None:
        for job in jobs:
            if id(job) not in closed:
                self.metrics.count(job.request.endpoint, Outcome.FAILED)
                job.emit(Failed(message))


def _answer(metrics: ServeMetrics, job: Job, done: Finished) -> None:
    """Send a finished job its answer and count it."""
    metrics.prompt_tokens.inc(done.prompt_tokens)
    metrics.completion_tokens.inc(done.completion_tokens)
    metrics.request_seconds.observe(time.perf_counter() - job.submitted)
    metrics.count(job.request.endpoint, Outcome.OK)
    job.emit(done)


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

    def _take_more(self, fits: Callable[[Job], bool], n: int) -> list[Job]:
        """Up to ``n`` queued jobs for the running batch, from the head of the queue while ``fits`` holds (a job
        that does not fit stays first in line, and nothing behind it overtakes it)."""
        taken = []
        with self._cond:
            while self._queue and len(taken) < n and not self._stopping:
                job = self._queue[0]
                if job.cancelled:        # its client left while it waited
                    self._queue.popleft()
                    self.metrics.count(job.request.endpoint, Outcome.CANCELLED)
                    continue
                if not fits(job):
                    break
                taken.append(self._queue.popleft())
            if taken:
                now = time.perf_counter()
                for job in taken:
                    job.started = now
                    self.metrics.queue_seconds.observe(now - job.submitted)
                self._batch.extend(taken)
                self.running = len(self._batch)
                self.metrics.queue_depth.set(len(self._queue))
                self.metrics.running.set(self.running)
                self.metrics.batch_occupancy.set(min(1.0, self.running / self.runner.max_batch))
        return taken

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
                self._batch = list(batch)
            self.running = len(batch)
            self.metrics.running.set(len(batch))
            self.metrics.batch_occupancy.set(len(batch) / self.runner.max_batch)
            try:
                self.runner.run(batch, more=self._take_more)
            except Exception as e:      # noqa: BLE001 - a runner bug ends its batch, never the worker
                log.exception("runner failed")
                with self._cond:
                    running = list(self._batch)          # the batch and any job it took in while it ran
                for job in running:
                    self.metrics.count(job.request.endpoint, Outcome.FAILED)
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self._batch = []
                self.running = 0
                self.metrics.running.set(0)
                self.metrics.batch_occupancy.set(0)

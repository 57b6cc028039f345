"""The CUDA-graph path's host logic, on the CPU: graph keys, replayed payloads, bucketed row counts.

A captured graph replays its kernels with every host value baked in at capture, and hands back what the
unit returned then. ``RerunGraphs`` stands in for that on the CPU: a replay runs the captured unit again,
with the Python objects it closed over at capture (the capture's step views, plans and row choices) and
with the host state of the executor and its policies as it was at capture (``_HostState``), and returns
the payload of its first replay, never a fresh one. So a key that misses a host value the unit depends
on, or a payload read as if it were fresh, decodes differently from eager here, as it would on a GPU.
(Device tensors are shared, as a graph reads live memory. It differs from a real capture in one way: a
capture runs the unit's host code once more, after the step's eager run, and this does not. The GPU tests
in test_cuda_graphs.py replay real graphs.)
"""

import collections
import copy

import numpy as np
import pytest
import torch

from dllm.engines.engine_set import torch_engine_set
from dllm.runtime.executor import Executor, _bucketed, row_bucket
from dllm.runtime.graphs import GraphCache
from dllm.runtime.loop import decode, decode_batch
from tests.runtime.test_batch import _arriving, _config, _prompts, _same


class RerunGraphs(GraphCache):
    """A GraphCache whose replay reruns the captured unit, with the host state ``frozen()`` names as it was at
    capture, and returns the payload of its first replay. The unit may not make a device tensor from host
    data (``torch.tensor(..., device=...)``): under a CUDA capture that copy either fails or is replayed
    from a host buffer that is gone."""

    def __init__(self, monkeypatch, max_graphs: int = 2048, frozen=lambda: ()):
        super().__init__(max_graphs=max_graphs)
        self.replays = 0
        self.monkeypatch, self.frozen = monkeypatch, frozen

    def _record(self, unit):
        # like a CUDA capture, runs nothing now; what the unit reads from the host is what it holds now
        return _Rerun(unit, self.monkeypatch, _HostState(self.frozen())), None

    def replay(self, key):
        hit, _ = super().replay(key)
        if not hit:
            return False, None
        self.replays += 1
        return True, self._graphs[key][0].payload


class _HostState:
    """The attributes of some objects (the executor, its policies), to put back while a replay reruns its
    unit: host values (counts, flags, lists) as they were, device tensors the same objects (a graph reads
    their memory as it is now). Whatever the rerun writes to those objects is undone after it, as a replay
    runs no host code."""

    def __init__(self, objects):
        self.saved = [(o, {k: _host_copy(v) for k, v in vars(o).items()}) for o in objects]

    def __enter__(self):
        self.now = [(o, dict(vars(o))) for o, _ in self.saved]
        for o, attrs in self.saved:
            vars(o).update({k: _host_copy(v) for k, v in attrs.items()})    # a fresh copy each replay

    def __exit__(self, *exc):
        for o, attrs in self.now:
            vars(o).clear()
            vars(o).update(attrs)


def _host_copy(v):
    """Mutable host containers copied (one level); tensors and other objects shared."""
    return copy.copy(v) if isinstance(v, (list, dict, set, np.ndarray)) else v


class _Rerun:
    def __init__(self, unit, monkeypatch, host: _HostState):
        self.unit, self.monkeypatch, self.host, self.payload = unit, monkeypatch, host, None

    def replay(self):
        with self.monkeypatch.context() as m, self.host:
            for name in ("tensor", "as_tensor"):
                m.setattr(torch, name, _no_device(getattr(torch, name)))
            payload = self.unit()
        if self.payload is None:
            self.payload = payload


def _no_device(make):
    def checked(*args, **kwargs):
        if kwargs.get("device") is not None:
            raise AssertionError(f"torch.{make.__name__}(..., device=...) inside a captured unit: upload it "
                                 "before the step into a persistent buffer")
        return make(*args, **kwargs)
    return checked


def _graphed(es, row_buckets: bool, monkeypatch, max_graphs: int = 2048) -> Executor:
    ex = Executor(es)
    ex.cuda_graphs, ex.row_buckets = True, row_buckets

    # the host state a captured unit reads: the executor's, its policies' and the step's views (which the
    # loop changes in place: a unit replayed for a later step or sequence must see the capture's)
    live = []
    run_batch, step = ex.run_batch, ex.step

    def batch(steps):
        live[:] = [o for st in steps if st is not None for o in (st.view, st.cache, st.commit) if o is not None]
        return run_batch(steps)

    def guided(canvas, policy, view, lo, hi):
        live[:] = [policy, view]
        return step(canvas, policy, view, lo, hi)
    ex.run_batch, ex.step = batch, guided

    def frozen():
        objects = [ex, *live, *ex._policies.values(), *ex._commits.values()]
        return list({id(o): o for o in objects}.values())       # each once: restored in one piece
    ex.step_graphs, ex.layer_graphs = (RerunGraphs(monkeypatch, max_graphs, frozen),
                                       RerunGraphs(monkeypatch, max_graphs, frozen))
    return ex


def _dcu(method):
    return _config(method).replace(gen_length=24, steps=24, budget=3)


def _decodes_as_eager(es, cfg, prompts, ex: Executor, passes: int, batch_size: int | None = None) -> None:
    """``passes`` passes through ``ex`` (later ones replaying what earlier ones captured), each decoding every
    prompt exactly as eager decoding does: one at a time, and with ``batch_size`` also as a batch."""
    want = [decode(es, p, cfg) for p in prompts]
    for _ in range(passes):
        _same(want, [decode(es, p, cfg, executor=ex) for p in prompts])
        if batch_size is not None:
            _same(want, decode_batch(es, prompts, cfg, executor=ex, batch_size=batch_size))


def test_row_buckets():
    assert [row_bucket(k) for k in range(14)] == [0, 1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [row_bucket(k) for k in (17, 24, 25, 33, 48, 49, 65, 96, 97, 200, 223)] == \
        [24, 24, 32, 48, 48, 64, 96, 96, 128, 256, 256]
    for k in range(1, 600):
        assert k <= row_bucket(k) < 1.5 * k     # less than a third of a bucket is padding


def test_a_step_takes_one_bucket_where_it_costs_few_rows():
    w = 5
    flat = [(None, (w, 7), (w, 9), (w, 10))]                  # own buckets 8, 12, 12; one bucket: 12
    shared = (None, (w, 7, False), (w, 9, False), (w, 10, False))
    assert _bucketed(shared, flat) == (None, (w, 12, True), (w, 12, True), (w, 12, True))
    skewed = [(None, (w, 2), (w, 3), (w, 40)), (None, (w, 3), (w, 2), (w, 30))]
    shared = (None, (w, 3, True), (w, 3, True), (w, 40, True))
    assert _bucketed(shared, skewed) == (None, (w, 3, True), (w, 3, True), (w, 48, True))
    uniform = [(None, (w, 4), (w, 4), (w, 4))] * 2              # nothing to pad
    shared = (None, (w, 4, False), (w, 4, False), (w, 4, False))
    assert _bucketed(shared, uniform) is shared


def test_the_slack_sets_when_a_step_takes_one_bucket():
    """EngineSet.step_bucket_slack: inf always shares the step's largest bucket, 1 only where it adds no row."""
    w = 5
    skewed = [(None, (w, 2), (w, 3), (w, 40)), (None, (w, 3), (w, 2), (w, 30))]
    shared = (None, (w, 3, True), (w, 3, True), (w, 40, True))
    assert _bucketed(shared, skewed, float("inf")) == (None, (w, 48, True), (w, 48, True), (w, 48, True))
    assert _bucketed(shared, skewed, 1.0) == _bucketed(shared, skewed) == (None, (w, 3, True), (w, 3, True),
                                                                         (w, 48, True))
    same_bucket = [(None, (w, 7), (w, 8))]                   # both round up to 8: one bucket is free
    shared = (None, (w, 7, False), (w, 8, False))
    assert _bucketed(shared, same_bucket, 1.0) == (None, (w, 8, True), (w, 8, True))
    flat = [(None, (w, 7), (w, 9), (w, 10))]                  # own buckets 8, 12, 12; one bucket: 12
    shared = (None, (w, 7, False), (w, 9, False), (w, 10, False))
    assert _bucketed(shared, flat, 1.0) == (None, (w, 8, True), (w, 12, True), (w, 12, True))


@pytest.mark.parametrize("kernels,row_buckets", [("torch", True), ("torch", False), ("plain", False)])
@pytest.mark.parametrize("method", ["dcu", "dcu@proportional", "dcu@softmax", "dcu+apd@proportional",
                                    "dual+threshold", "dllm-cache"])
def test_replayed_graphs_decode_what_eager_decodes(method, kernels, row_buckets, deep_llada, monkeypatch):
    """Decoding the same prompts three times through one executor: the later passes replay what the first
    captured, and every pass equals eager decoding (ids, rows per layer and step, commit steps)."""
    es = torch_engine_set(deep_llada, "fp32", kernels=kernels)
    ex = _graphed(es, row_buckets, monkeypatch)
    _decodes_as_eager(es, _dcu(method), _prompts(es.spec.vocab_size, (5, 11)), ex, passes=3)
    assert ex.step_graphs.replays + ex.layer_graphs.replays > 0


@pytest.mark.parametrize("row_buckets", [True, False])
def test_uneven_schedule_counts_replay_what_eager_decodes(row_buckets, deep_llada, monkeypatch):
    """15 steps for 3 blocks of 8: a block commits 2, 2, 2, 1, 1 tokens, a host count each step's graph bakes
    (its commit key), so steps that differ only in it must not share a graph."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    ex = _graphed(es, row_buckets, monkeypatch)
    _decodes_as_eager(es, _dcu("dcu").replace(steps=15), _prompts(es.spec.vocab_size, (5, 11)), ex, passes=3)
    assert ex.step_graphs.replays > 0


@pytest.mark.parametrize("method", ["dcu@proportional", "dcu+apd@proportional"])
def test_one_bucket_per_step_decodes_what_eager_decodes(method, deep_llada, monkeypatch):
    """step_bucket_slack inf: every scored layer of a step runs the step's largest bucket. One sequence and a
    batch still decode exactly what they decode eagerly, and more whole steps replay than with slack 1 (a
    shared bucket only where it adds no row; here the default 1.25 shares every step's, as inf does)."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    replays = {}
    for slack in (1.0, float("inf")):
        ex = _graphed(es, True, monkeypatch)
        ex.step_bucket_slack = slack
        _decodes_as_eager(es, _dcu(method), _prompts(es.spec.vocab_size, (5, 11, 8)), ex, passes=2, batch_size=2)
        replays[slack] = ex.step_graphs.replays
    assert replays[float("inf")] > replays[1.0]


@pytest.mark.parametrize("method", ["dcu", "dcu+apd", "dual+threshold", "prefix"])
def test_replayed_dream_graphs_decode_what_eager_decodes(method, tiny_models, monkeypatch):
    """Dream reads position i's logits from hidden row i-1: the head's row table shifts by one, alone and in
    a batch."""
    es = torch_engine_set(tiny_models["dream"], "fp32", kernels="torch")
    ex = _graphed(es, True, monkeypatch)
    _decodes_as_eager(es, _dcu(method), _prompts(es.spec.vocab_size, (5, 11)), ex, passes=2, batch_size=2)
    assert ex.step_graphs.replays + ex.layer_graphs.replays > 0


def test_graphs_dropped_from_a_full_cache_are_captured_again(deep_llada, monkeypatch):
    """A small cache drops graphs all the time; the decode still equals eager decoding."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    ex = _graphed(es, True, monkeypatch, max_graphs=3)
    _decodes_as_eager(es, _dcu("dcu+apd@proportional"), _prompts(es.spec.vocab_size, (5, 11)), ex, passes=3)
    assert ex.layer_graphs.dropped > 0 and len(ex.layer_graphs) == 3
    assert ex.step_graphs.replays + ex.layer_graphs.replays > 0


@pytest.mark.parametrize("row_buckets", [True, False])
@pytest.mark.parametrize("method", ["dcu@proportional", "dcu+apd@proportional", "dcu@softmax", "dcu"])
def test_replayed_batches_decode_what_each_prompt_decodes_alone(method, row_buckets, deep_llada, monkeypatch):
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _dcu(method)
    prompts = _prompts(es.spec.vocab_size, (5, 11, 8, 6))
    want = [decode(es, p, cfg) for p in prompts]
    ex = _graphed(es, row_buckets, monkeypatch)
    for _ in range(2):
        _same(want, decode_batch(es, prompts, cfg, executor=ex, batch_size=3))
    assert ex.step_graphs.replays + ex.layer_graphs.replays > 0


def _select_calls(es, monkeypatch) -> list:
    """Records (k, [each sequence's k]) of every batched selection with per-sequence k."""
    calls = []
    many = es.ops.select_rows_batched

    def counted(d, win_start, w, k, gen_start, k_slot=None):
        if k_slot is not None:
            calls.append((k, k_slot.tolist()))
        return many(d, win_start, w, k, gen_start, k_slot)
    monkeypatch.setattr(es.ops, "select_rows_batched", counted)
    return calls


@pytest.mark.parametrize("method", ["dcu@proportional", "dcu@softmax", "dcu+apd@proportional"])
def test_bucketed_rows_decode_what_exact_rows_decode(method, deep_llada, monkeypatch):
    """With bucketed row counts (what the executor does with CUDA graphs), one sequence and a batch decode
    exactly what they decode without: the padding repeats each sequence's last row. And it pads: layers run
    more rows than some sequence's budget."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _dcu(method)
    prompts = _prompts(es.spec.vocab_size, (5, 11, 8, 6))
    want = [decode(es, p, cfg) for p in prompts]
    calls = _select_calls(es, monkeypatch)
    ex = Executor(es)
    ex.row_buckets = True
    _same(want, [decode(es, p, cfg, executor=ex) for p in prompts])
    _same(want, decode_batch(es, prompts, cfg, executor=ex, batch_size=3))
    assert calls and all(k == row_bucket(k) for k, _ in calls)
    assert any(k > min(own) for k, own in calls)


def _step_keys(es, cfg, prompts, row_buckets: bool, batch: int, monkeypatch) -> collections.Counter:
    ex = _graphed(es, row_buckets, monkeypatch)
    keys = collections.Counter()
    own = ex._step_key

    def counted(steps, commit_keys):
        key = own(steps, commit_keys)
        keys[key] += 1
        return key
    ex._step_key = counted
    if batch == 1:
        for p in prompts:
            decode(es, p, cfg, executor=ex)
    else:
        decode_batch(es, prompts, cfg, executor=ex, batch_size=batch)
    return keys


@pytest.mark.parametrize("batch", [1, 2])
def test_proportional_budgets_repeat_their_step_keys_with_bucketed_rows(batch, deep_llada, monkeypatch):
    """DCU's proportional budgets move every step, so with exact row counts almost every step has a key of
    its own and no whole-step graph replays; with bucketed rows the key follows the bucket and repeats."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _dcu("dcu@proportional").replace(gen_length=32, steps=32, block_length=32, budget=4)
    prompts = _prompts(es.spec.vocab_size, (5, 11, 8, 6))
    exact = _step_keys(es, cfg, prompts, False, batch, monkeypatch)
    bucketed = _step_keys(es, cfg, prompts, True, batch, monkeypatch)
    steps = sum(exact.values())
    assert sum(bucketed.values()) == steps
    assert len(bucketed) * 2 < len(exact)
    assert len(bucketed) <= steps // 4


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method,steps", [("dcu", 24), ("dcu", 15), ("dcu+apd", 24), ("dcu+factor", 24)])
def test_steps_replay_across_block_positions(method, steps, batch, deep_llada, monkeypatch):
    """With graphs the head and the commit find each sequence's rows in device tables, so one whole-step
    graph serves steps whose sequences sit in other blocks than at its capture, one sequence or a batch, and
    decodes what each prompt decodes alone. With 15 steps for 3 blocks of 8 a block commits 2, 2, 2, 1, 1
    tokens: a host count the commit bakes, so it must be in the step key."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _dcu(method).replace(steps=steps)
    prompts = _prompts(es.spec.vocab_size, (7, 7, 7))          # one canvas length: the commits go together
    want = [decode(es, p, cfg) for p in prompts]
    ex = _graphed(es, False, monkeypatch)
    ranges = collections.defaultdict(set)
    own = ex._step_key

    def counted(steps, commit_keys):
        key = own(steps, commit_keys)
        ranges[key].add(tuple(None if st is None else (st.lo, st.hi) for st in steps))
        return key
    ex._step_key = counted
    for _ in range(2):                  # the second pass replays the first pass's graphs for new sequences
        got = [decode(es, p, cfg, executor=ex) for p in prompts] if batch == 1 else \
            decode_batch(es, prompts, cfg, executor=ex, batch_size=batch)
        _same(want, got)
    assert ex._commit_tables, "the commits never went through the tables"
    assert ex.step_graphs.replays > 0
    # APD's logits run from the block to the canvas end: one sequence's row count, in the key, moves with
    # each block (a batch's is the longest of its sequences')
    if not (batch == 1 and method == "dcu+apd"):
        assert any(key is not None and len(where) > 1 for key, where in ranges.items())


def test_guided_steps_with_bucketed_rows_decode_what_exact_rows_decode(deep_llada, monkeypatch):
    """Classifier-free guidance runs ``Executor.step``, which must upload the bucketed rows' tables too."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _dcu("dcu@proportional").replace(cfg_scale=1.5)
    prompts = _prompts(es.spec.vocab_size, (5, 11))
    want = [decode(es, p, cfg) for p in prompts]
    for ex in (_graphed(es, True, monkeypatch), Executor(es)):
        ex.row_buckets = True
        _same(want, [decode(es, p, cfg, executor=ex) for p in prompts])


@pytest.mark.parametrize("method", ["dcu", "dcu+apd"])
def test_arrivals_one_at_a_time_with_a_small_cache_decode_what_each_prompt_decodes_alone(method, deep_llada,
                                                                                     monkeypatch):
    """Prompts of different lengths join a running batch one at a time (each arrival a new mix of canvas
    lengths, so new keys), replayed through a cache of 4 graphs that keeps dropping and capturing."""
    es = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _dcu(method)
    prompts = _prompts(es.spec.vocab_size, (5, 11, 3, 8, 6))
    want = [decode(es, p, cfg) for p in prompts]
    ex = _graphed(es, True, monkeypatch, max_graphs=4)
    for _ in range(2):
        _same(want, _arriving(es, cfg, prompts, 3, 11 + cfg.gen_length, 4, ex))
    assert ex.layer_graphs.dropped > 0 and ex.step_graphs.replays + ex.layer_graphs.replays > 0

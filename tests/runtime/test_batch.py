"""Batched decoding: every sequence of a batch gets exactly what it gets alone.

Prompts of different lengths share every step (right padding, ``kv_len`` per sequence), more prompts
than slots take a slot as one finishes (continuous batching), and each result equals ``decode`` of that
prompt alone: ids, rows recomputed per layer and step, and the step each position was committed at.
Several tokens commit per step in the threshold / APD / factor methods.
"""

import pytest
import torch

from dllm.errors import ConfigError
from dllm.kernels._triton import HAVE_TRITON
from dllm.runtime import reference as R
from dllm.runtime.config import DecodeConfig
from dllm.runtime.loop import BatchDecoder, canvas_length, decode, decode_batch
from dllm.runtime.methods import method_config

PROMPT_LENGTHS = (5, 11, 8, 17, 3)
METHODS = ["full", "full+threshold", "prefix", "dual+threshold", "dllm-cache", "dcu", "dcu+apd",
           "dcu@proportional", "dcu+factor", "prefix+apd"]


def _prompts(vocab, lengths=PROMPT_LENGTHS):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]


def _config(method, **changes):
    name, _, allocation = method.partition("@")
    base = DecodeConfig(gen_length=32, block_length=8, steps=32, budget=4, window=4, threshold=0.3, tau0=0.4,
                        beta=0.02, allocation=allocation or "uniform")
    return method_config(name, base) if not changes else method_config(name, base).replace(**changes)


def _counted(calls: dict, name: str, fn, when=lambda args: True):
    """``fn``, adding its calls (those whose arguments satisfy ``when``) to ``calls[name]``. Set on a class,
    it counts a method's calls on every instance."""
    def wrapped(*args, **kwargs):
        calls[name] += bool(when(args))
        return fn(*args, **kwargs)
    return wrapped


def _arriving(engines, cfg, prompts, batch: int, canvas_len: int, every: int, executor=None) -> list:
    """Each prompt's result when they join a running batch one at a time, one every ``every`` steps (as
    requests reach a server), instead of all at once."""
    run = BatchDecoder(engines, cfg, batch, canvas_len, executor=executor)
    waiting, n = list(prompts), 0
    while True:
        if waiting and n % every == 0:
            run.submit(waiting.pop(0))
        if not run.step() and not waiting:
            return [run.results[i] for i in range(len(prompts))]
        n += 1


def _same(solo, batch):
    assert len(solo) == len(batch)
    for i, (a, b) in enumerate(zip(solo, batch)):
        assert b.ids == a.ids, f"prompt {i}: ids differ"
        assert b.rows_per_step == a.rows_per_step, f"prompt {i}: rows recomputed differ"
        assert b.commit_step == a.commit_step, f"prompt {i}: commit steps differ"
        assert b.prompt_length == a.prompt_length and b.steps == a.steps
        assert torch.equal(b.canvas, a.canvas)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_solo_torch(arch, method, torch_engines):
    es = torch_engines[arch]
    prompts, cfg = _prompts(es.spec.vocab_size), _config(method)
    solo = [decode(es, p, cfg) for p in prompts]
    _same(solo, decode_batch(es, prompts, cfg, batch_size=3))
    if method in ("full", "dcu+apd"):
        assert sum(max(r.tokens_per_step) > 1 for r in solo) >= 1 or method == "full"


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["full", "dual+threshold", "dllm-cache", "dcu+apd"])
def test_batch_equals_solo_onnxruntime(arch, method, ort_engines):
    es = ort_engines[arch]
    prompts, cfg = _prompts(es.spec.vocab_size, (5, 11, 8)), _config(method)
    solo = [decode(es, p, cfg) for p in prompts]
    _same(solo, decode_batch(es, prompts, cfg, batch_size=2))


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("arch, method", [("llada", "dcu+apd"), ("dream", "dual+threshold")])
def test_batch_with_triton_kernels_equals_solo(arch, method, tiny_models):
    """The fused path (Triton's interpreter on the CPU) batches exactly as well: each sequence gets what it
    gets alone with the same kernels, and the tokens of the plain path."""
    from dllm.engines.engine_set import torch_engine_set

    model = tiny_models[arch]
    plain, tri = torch_engine_set(model, "fp32", kernels="plain"), torch_engine_set(model, "fp32", kernels="triton")
    prompts, cfg = _prompts(model.spec.vocab_size, (5, 11, 8)), _config(method).replace(gen_length=16, steps=16)
    batch = decode_batch(tri, prompts, cfg, batch_size=2)
    _same([decode(tri, p, cfg) for p in prompts], batch)
    assert [r.ids for r in batch] == [decode(plain, p, cfg).ids for p in prompts]
    assert tri.ops.launches > 0


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_batch_with_sampling_equals_solo(arch, torch_engines):
    """Each sequence draws from its own generator (seeded by the config), whatever shares its step."""
    es = torch_engines[arch]
    prompts = _prompts(es.spec.vocab_size, (4, 9, 6))
    cfg = _config("dcu+apd", temperature=0.8, seed=11)
    _same([decode(es, p, cfg) for p in prompts], decode_batch(es, prompts, cfg, batch_size=2))


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_full_schedule_in_a_batch_equals_the_reference(arch, tiny_models, torch_engines):
    es, model = torch_engines[arch], tiny_models[arch]
    prompts = _prompts(es.spec.vocab_size, (1, 13, 6, 20))
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=16, seed=4)
    for p, res in zip(prompts, decode_batch(es, prompts, cfg, batch_size=3)):
        prompt = torch.tensor([p])
        if arch == "llada":
            ref = R.llada_generate(model, prompt, R.LladaConfig(gen_length=16, block_length=8, steps=16, seed=4))
        else:
            ref = R.dream_generate(model, prompt, R.DreamConfig(gen_length=16, block_length=8, steps=16, seed=4))
        assert res.ids == ref.gen_ids[0].tolist()
        assert res.commit_step == ref.commit_step[0, len(p):].tolist()


def test_on_step_reports_every_step_of_every_sequence(torch_engines):
    es = torch_engines["llada"]
    prompts, cfg = _prompts(es.spec.vocab_size, (5, 9, 3)), _config("dcu+apd")
    seen = {i: [] for i in range(3)}

    def on_step(index, canvas, view, committed):
        assert canvas.shape == (1, len(prompts[index]) + cfg.gen_length)
        seen[index].append(list(committed))

    results = decode_batch(es, prompts, cfg, batch_size=2, on_step=on_step)
    for i, res in enumerate(results):
        assert len(seen[i]) == res.steps
        assert sorted(p for step in seen[i] for p in step) == list(range(len(prompts[i]), len(prompts[i]) + 32))


def test_canvas_lengths_come_in_buckets():
    assert canvas_length([5, 17], 32, 128) == 64             # 49 rounded up to a multiple of 32
    assert canvas_length([3, 3], 32, 128) == 35                # one prompt length: no padding
    assert canvas_length([100, 90], 20, 128) == 128
    assert canvas_length([100, 90], 25, 126) == 125           # the bucket would pass the limit: exact
    assert canvas_length([5, 17], 32, 128, bucket=1) == 49    # no CUDA graphs: exact


def test_bad_batch_input_names_the_prompt_and_the_fix(torch_engines):
    es = torch_engines["llada"]
    cfg = _config("dcu+apd")
    good = _prompts(es.spec.vocab_size, (5, 9))
    with pytest.raises(ConfigError, match=r"prompt 1: .*exceeds the canvas limit"):
        decode_batch(es, [good[0], list(range(6, 6 + 120)), good[1]], cfg)
    with pytest.raises(ConfigError, match=r"prompt 2: the prompt is empty"):
        decode_batch(es, [good[0], good[1], []], cfg)
    with pytest.raises(ConfigError, match=r"prompt 0: .*mask id"):
        decode_batch(es, [[es.spec.mask_id, 7], good[1]], cfg)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        decode_batch(es, good, cfg, batch_size=0)
    with pytest.raises(ConfigError, match="non-empty list of prompts"):
        decode_batch(es, [], cfg)
    with pytest.raises(ConfigError, match="guidance"):
        decode_batch(es, good, cfg.replace(cfg_scale=1.0))


def test_a_rejected_batch_leaves_the_executor_clean(torch_engines):
    """An error before or during a batch does not change what the same executor decodes next."""
    from dllm.runtime.executor import Executor

    es = torch_engines["dream"]
    cfg = _config("dcu+apd")
    prompts = _prompts(es.spec.vocab_size, (5, 9, 4))
    expected = decode_batch(es, prompts, cfg, batch_size=2)
    ex = Executor(es)
    with pytest.raises(ConfigError):
        decode_batch(es, prompts + [list(range(6, 200))], cfg, executor=ex)

    def stop(index, canvas, view, committed):
        if view.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_batch(es, prompts, cfg, executor=ex, batch_size=3, on_step=stop)
    _same(expected, decode_batch(es, prompts, cfg, executor=ex, batch_size=2))
    _same([decode(es, p, cfg) for p in prompts], [decode(es, p, cfg, executor=ex) for p in prompts])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_stopped_sequence_frees_its_slot_and_changes_no_other(batch_size, torch_engines):
    """stop(index) drops one prompt mid-decode and another before it starts; the rest decode as alone."""
    es = torch_engines["llada"]
    cfg = _config("dcu+apd")
    prompts = _prompts(es.spec.vocab_size, (5, 11, 8, 3))
    steps_seen = {i: 0 for i in range(len(prompts))}

    def on_step(index, canvas, view, committed):
        steps_seen[index] += 1

    def stop(index):
        return index == 3 or (index == 1 and steps_seen[1] >= 2)

    got = decode_batch(es, prompts, cfg, batch_size=batch_size, on_step=on_step, stop=stop)
    assert got[1] is None and got[3] is None
    assert steps_seen[1] == 2 and steps_seen[3] == 0
    _same([decode(es, prompts[i], cfg) for i in (0, 2)], [got[0], got[2]])


def test_more_slots_than_engines_take_is_refused(ort_engines):
    es = ort_engines["llada"]
    cfg = _config("full")
    limit = es.max_batch
    prompts = _prompts(es.spec.vocab_size, (3,) * (limit + 1))
    with pytest.raises(ConfigError, match=rf"batch size {limit + 1} exceeds .*batch_size={limit}.*--max-batch"):
        decode_batch(es, prompts, cfg)
    assert len(decode_batch(es, prompts, cfg, batch_size=limit)) == limit + 1


@pytest.mark.parametrize("method", ["dcu+apd", "dual+threshold"])
def test_prompts_submitted_while_a_batch_runs_get_what_they_get_alone(method, torch_engines):
    """BatchDecoder: prompts join a running batch between two steps (a server's late requests) and each still
    decodes exactly what it decodes alone; a joiner waits in order of submission when no slot is free."""
    es = torch_engines["llada"]
    prompts, cfg = _prompts(es.spec.vocab_size), _config(method)
    solo = [decode(es, p, cfg) for p in prompts]
    finished, steps = [], 0
    batch = BatchDecoder(es, cfg, 3, max(map(len, prompts)) + cfg.gen_length,
                         on_finish=lambda i, result: finished.append(i))
    joins = {0: [0, 1], 2: [2], 5: [3, 4]}               # step -> prompts submitted before it
    while True:
        for i in joins.get(steps, []):
            assert batch.submit(prompts[i]) == i
        events = batch.step()
        if not events and steps > max(joins):
            break
        steps += 1
        assert len(events) <= 3 and len({e[0] for e in events}) == len(events)
    _same(solo, [batch.results[i] for i in range(len(prompts))])
    assert sorted(finished) == list(range(len(prompts))) and batch.idle and batch.free_slots == 3
    assert steps < sum(r.steps for r in solo)             # the late prompts shared steps with the others


def test_batch_decoder_refuses_what_does_not_fit_and_drops_cancelled(torch_engines):
    es = torch_engines["llada"]
    prompts, cfg = _prompts(es.spec.vocab_size, (5, 11, 8)), _config("dcu")
    batch = BatchDecoder(es, cfg, 2, 11 + cfg.gen_length)
    assert batch.room == 11 and batch.free_slots == 2
    with pytest.raises(ConfigError, match="does not fit this batch's canvas .* up to 11 tokens"):
        batch.submit(prompts[1] + [7])
    with pytest.raises(ConfigError, match="mask id"):
        batch.submit([es.spec.mask_id])
    assert batch.idle and batch.prompts == []              # a refused prompt leaves no trace
    for p in prompts:
        batch.submit(p)
    batch.step()
    batch.cancel(0)                                        # running: dropped at the next step
    batch.cancel(2)                                        # waiting: never starts
    while batch.step():
        pass
    assert set(batch.results) == {1}
    _same([decode(es, prompts[1], cfg)], [batch.results[1]])
    for bad in (cfg.gen_length, es.spec.max_seq_len + 1):
        with pytest.raises(ConfigError, match="canvas_len"):
            BatchDecoder(es, cfg, 2, bad)


@pytest.mark.parametrize("method", ["dcu+apd", "dcu", "prefix+apd"])
def test_a_slot_counts_as_free_as_soon_as_its_sequence_committed_its_last_token(method, torch_engines):
    """``free_slots`` counts a sequence that has just finished, so a prompt submitted then (a server between
    two steps) decodes in the very next step instead of after an idle one; ``SequenceRun.finished`` says
    exactly what the next ``next_step`` finds."""
    es = torch_engines["llada"]
    prompts, cfg = _prompts(es.spec.vocab_size, (5, 11)), _config(method)
    solo = [decode(es, p, cfg) for p in prompts]
    batch = BatchDecoder(es, cfg, 1, 11 + cfg.gen_length)
    batch.submit(prompts[0])
    steps = 0
    while batch.free_slots == 0:
        assert batch.step()
        steps += 1
        assert batch.slots[0].finished == (steps == solo[0].steps)
    assert steps == solo[0].steps and batch.slots[0].finished      # free right after its last step
    assert batch.submit(prompts[1]) == 1
    events = batch.step()                                          # the finished one leaves, the new one runs
    assert [e[0] for e in events] == [1] and batch.results[0].ids == solo[0].ids
    while batch.step():
        steps += 1
    assert steps + 1 == solo[0].steps + solo[1].steps              # no idle step between the two
    _same(solo, [batch.results[0], batch.results[1]])


@pytest.mark.parametrize("method", ["dcu", "dcu+apd", "dllm-cache", "dcu-reference", "dcu@proportional"])
def test_a_batch_picks_each_layers_rows_in_one_launch(method, tiny_models, monkeypatch):
    """Where every sequence's rows are a window plus its k most-changed rows, one launch picks a layer's rows
    for the whole batch instead of one per sequence, and each sequence still gets what it gets alone."""
    from dllm.engines.engine_set import torch_engine_set

    es = torch_engine_set(tiny_models["llada"], "fp32", kernels="torch")
    prompts, cfg = _prompts(es.spec.vocab_size, (5, 11, 8)), _config(method)
    solo = [decode(es, p, cfg) for p in prompts]
    calls = {"alone": 0, "batched": 0}
    monkeypatch.setattr(es.ops, "select_rows", _counted(calls, "alone", es.ops.select_rows))
    monkeypatch.setattr(es.ops, "select_rows_batched", _counted(calls, "batched", es.ops.select_rows_batched))
    batch = decode_batch(es, prompts, cfg, batch_size=3)
    _same(solo, batch)
    # the sequences start together, so they agree on (window, k) in every layer that picks rows that way:
    # one launch each (dLLM-Cache's prompt-refresh steps add the prompt rows, so each sequence picks its own)
    picked = sum(n < len(prompts[0]) + cfg.gen_length for step in solo[0].rows_per_step for n in step)
    assert calls["batched"] > 0
    if method != "dllm-cache":
        assert calls == {"alone": 0, "batched": picked}
    else:
        assert calls["alone"] % len(prompts) == 0 and calls["batched"] + calls["alone"] // len(prompts) == picked


@pytest.mark.parametrize("allocation", ["proportional", "softmax"])
@pytest.mark.parametrize("kernels", ["plain", "torch"])
def test_proportional_budgets_are_each_sequences_own_in_a_batch(kernels, allocation, deep_llada, monkeypatch):
    """DCU's proportional (and softmax) budgets differ from sequence to sequence (4 layers, so they can):
    each sequence still gets exactly what it gets alone, rows per layer and step included. The executor
    computes every sequence's next budgets in one pass after the step (no policy reads its own back); with
    fused kernels the batch also picks a layer's rows in one launch, each sequence with its own k, and takes
    every sequence's layer means in one launch (the Triton kernel's per-sequence k is checked against this
    twin in tests/kernels/test_select.py)."""
    from dllm.engines.engine_set import torch_engine_set
    from dllm.runtime import cache_policy, executor

    es = torch_engine_set(deep_llada, "fp32", kernels=kernels)
    prompts = _prompts(es.spec.vocab_size, (5, 11, 8, 6))
    cfg = _config(f"dcu@{allocation}").replace(gen_length=24, steps=24, budget=3)
    solo = [decode(es, p, cfg) for p in prompts]
    # at some step, two sequences recompute different row counts in one layer: their budgets differ
    assert any(len({tuple(r.rows_per_step[t]) for r in solo}) > 1 for t in range(1, solo[0].steps))
    calls = {"alone": 0, "batched": 0, "per_slot": 0, "own budgets": 0, "batch budgets": 0}
    if es.ops is not None:
        monkeypatch.setattr(es.ops, "select_rows", _counted(calls, "alone", es.ops.select_rows))
        many = _counted(calls, "batched", es.ops.select_rows_batched)
        monkeypatch.setattr(es.ops, "select_rows_batched",
                            _counted(calls, "per_slot", many, when=lambda args: args[-1] is not None))
    monkeypatch.setattr(cache_policy, "allocate_budgets",
                        _counted(calls, "own budgets", cache_policy.allocate_budgets))
    monkeypatch.setattr(executor, "allocate_budgets", _counted(calls, "batch budgets", executor.allocate_budgets))
    _same(solo, decode_batch(es, prompts, cfg, batch_size=3))
    assert calls["own budgets"] == 0 and calls["batch budgets"] > 0
    if es.ops is not None:
        assert calls["alone"] == 0 and calls["per_slot"] > 0


@pytest.mark.parametrize("method", ["dcu+apd", "dcu+apd@global", "dcu", "dual+threshold", "dcu+factor"])
def test_a_batch_decides_its_commits_together(method, tiny_models, monkeypatch):
    """With fused kernels, the sequences of a batch decide each step's commit in one pass over all their
    logits (APD's tau and previous logits in the executor's tables), and each gets what it gets alone.
    Sequences that start together never decide alone (the schedule ranks canvas-wide rows as the reference
    does, so it batches sequences of one canvas length only); with more prompts than slots, an APD sequence
    that joins decides alone until it has a previous step, then joins in."""
    from dllm.engines.engine_set import torch_engine_set
    from dllm.runtime.commit import ApdCommit, FactorCommit, LladaSchedule, ThresholdCommit

    name, _, apd_mode = method.partition("@")
    es = torch_engine_set(tiny_models["llada"], "fp32", kernels="torch")
    cfg = _config(name, apd_mode=apd_mode or "per_token")
    lengths = (7, 7, 7, 9, 7) if name == "dcu" else PROMPT_LENGTHS
    prompts = _prompts(es.spec.vocab_size, lengths)
    solo = [decode(es, p, cfg) for p in prompts]
    assert any(max(r.tokens_per_step) > 1 for r in solo) or name == "dcu"
    policy = {"dcu+apd": ApdCommit, "dcu": LladaSchedule, "dual+threshold": ThresholdCommit,
              "dcu+factor": FactorCommit}[name]
    calls = {"alone": 0, "together": 0}
    monkeypatch.setattr(policy, "select", _counted(calls, "alone", policy.select))
    monkeypatch.setattr(policy, "select_batch", _counted(calls, "together", policy.select_batch))
    _same(solo[:3], decode_batch(es, prompts[:3], cfg, batch_size=3))
    assert calls == {"alone": 0, "together": max(r.steps for r in solo[:3])}
    calls.update(alone=0, together=0)
    _same(solo, decode_batch(es, prompts, cfg, batch_size=3))
    # APD: a joining sequence's first step; the schedule: a batch with the longer prompt; threshold and
    # factor: never
    assert calls["together"] > 0 and (calls["alone"] > 0) == (name not in ("dual+threshold", "dcu+factor"))

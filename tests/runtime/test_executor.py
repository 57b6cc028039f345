"""Executor: full policy equals the model, partial rows follow the policy's plan, proxies."""

import pytest
import torch

from dllm.errors import BackendError
from dllm.runtime.cache_policy import CachePolicy, FullPolicy, make_cache_policy
from dllm.runtime.config import DecodeConfig, Proxy
from dllm.runtime.executor import Executor
from dllm.runtime.loop import decode
from dllm.runtime.view import StepView


def _canvas(spec, P, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(6, spec.vocab_size, (1, P + G), generator=g)
    c[0, P + G // 2:] = spec.mask_id
    return c


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_full_policy_equals_the_reference_model_logits(arch, tiny_models, torch_engines):
    model, engines = tiny_models[arch], torch_engines[arch]
    P, G = 7, 24
    canvas = _canvas(model.spec, P, G)
    ex, pol = Executor(engines), FullPolicy()
    pol.reset(model.spec.n_layers, P, G, torch.device("cpu"))
    ex.reset(1, P, P + G, pol)
    view = StepView(prompt_len=P, canvas_len=P + G, step=1)
    pol.begin_step(view)
    logits, stats = ex.step(canvas, pol, view, P + 4, P + 20)
    with torch.no_grad():
        ref = model(canvas)                                            # [1, N, V], Dream shift applied
    # the head ran on 16 rows instead of N, so allow last-bit differences of the matmul
    torch.testing.assert_close(logits, ref[:, P + 4:P + 20], rtol=1e-5, atol=1e-5)
    assert stats.rows == [P + G] * model.spec.n_layers


class Recorder(CachePolicy):
    """Asks for fixed rows per layer and records the scores it was given."""

    def __init__(self, plan, proxy=None):
        self.plan, self.proxy, self.seen = plan, proxy, []

    def wants_scores(self, layer):
        return layer > 0

    def rows(self, layer, scores):
        self.seen.append(scores)
        r = self.plan[layer]
        return None if r is None else torch.tensor(r)


def test_rows_per_layer_follow_the_plan_and_unrecomputed_rows_keep_cached_deltas(tiny_models, torch_engines):
    model, engines = tiny_models["llada"], torch_engines["llada"]
    P, G = 5, 16
    N = P + G
    canvas = _canvas(model.spec, P, G, seed=1)
    ex = Executor(engines)
    full = FullPolicy()
    full.reset(2, P, G, torch.device("cpu"))
    ex.reset(1, P, N, full)
    view = StepView(prompt_len=P, canvas_len=N, step=1)
    ex.step(canvas, full, view, P, N)
    attn_before = [a.clone() for a in ex.attn_cache]
    canvas2 = canvas.clone()
    canvas2[0, P + 10] = 9
    plan = [None, [P + 10, P + 12, P + 15]]
    pol = Recorder(plan)
    view.step = 2
    logits, stats = ex.step(canvas2, pol, view, P, N)
    assert stats.rows == [N, 3]
    # layer 1: only planned rows changed their attention delta
    changed = (ex.attn_cache[1] != attn_before[1]).any(-1)[0].nonzero().flatten().tolist()
    assert set(changed) <= set(plan[1])
    # the recomputed rows equal the layer's own forward_rows against the caches
    layer = model.layers[1]
    with torch.no_grad():
        h1 = model.layers[0](model.embed(canvas2))
        rows = torch.tensor(plan[1])
        _, _, attn, _ = layer.forward_rows(h1[:, rows], rows[None].int(), torch.tensor([N], dtype=torch.int32),
                                           ex.k_cache[1], ex.v_cache[1])
    torch.testing.assert_close(ex.attn_cache[1][:, rows], attn, rtol=1e-5, atol=1e-6)


def test_input_proxy_scores_are_cosine_distances_of_the_layer_input(tiny_models, torch_engines):
    model, engines = tiny_models["llada"], torch_engines["llada"]
    P, G = 5, 16
    canvas = _canvas(model.spec, P, G, seed=2)
    ex = Executor(engines)
    pol = Recorder([None, None], proxy=Proxy.INPUT)
    pol.reset(2, P, G, torch.device("cpu"))                            # as the decode loop does
    ex.reset(1, P, P + G, pol)
    view = StepView(prompt_len=P, canvas_len=P + G, step=1)
    ex.step(canvas, pol, view, P, P + G)
    assert pol.seen == [None, None]                                    # step 1: nothing to compare with
    canvas2 = canvas.clone()
    canvas2[0, P + 3] = 11
    view.step = 2
    ex.step(canvas2, pol, view, P, P + G)
    d = pol.seen[-1]
    with torch.no_grad():
        a = model.layers[0](model.embed(canvas))[:, P:]
        b = model.layers[0](model.embed(canvas2))[:, P:]
    expect = 1 - torch.nn.functional.cosine_similarity(b, a, dim=-1)
    torch.testing.assert_close(d, expect, rtol=1e-4, atol=1e-5)
    assert d[0, 3] > 0.1


def test_value_proxy_refreshes_the_gen_value_cache(tiny_models, torch_engines):
    model, engines = tiny_models["dream"], torch_engines["dream"]
    P, G = 6, 16
    canvas = _canvas(model.spec, P, G, seed=3)
    ex = Executor(engines)
    pol = Recorder([None, [P + 1, P + 2]], proxy=Proxy.VALUE)
    pol.reset(2, P, G, torch.device("cpu"))
    ex.reset(1, P, P + G, pol)
    view = StepView(prompt_len=P, canvas_len=P + G, step=1)
    full = FullPolicy()
    full.reset(2, P, G, torch.device("cpu"))
    ex.step(canvas, full, view, P, P + G)
    canvas2 = canvas.clone()
    canvas2[0, P + 8] = 12
    view.step = 2
    ex.step(canvas2, pol, view, P, P + G)
    assert pol.seen[-1].shape == (1, G)
    with torch.no_grad():
        h1 = model.layers[0](model.embed(canvas2))
        v = model.layers[1].value_rows(h1)
    torch.testing.assert_close(ex.v_cache[1][:, P:], v[:, P:], rtol=1e-5, atol=1e-6)   # every gen row fresh


def test_value_proxy_needs_vproj_engines(tiny_models):
    from dllm.engines.engine_set import torch_engine_set

    engines = torch_engine_set(tiny_models["llada"], "fp32", with_vproj=False)
    pol = make_cache_policy(DecodeConfig(cache="dcu", proxy="value"))
    with pytest.raises(BackendError, match="vproj"):
        Executor(engines).reset(1, 4, 20, pol)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("proxy", ["input", "value"])
def test_dcu_budget_covering_every_row_reproduces_full(arch, proxy, torch_engines):
    engines = torch_engines[arch]
    base = DecodeConfig(gen_length=32, block_length=8, steps=32)
    cfg = base.replace(cache="dcu", budget=64, window=4, prompt_interval=1, proxy=proxy)
    prompt = list(range(6, 15))
    full, dcu = decode(engines, prompt, base), decode(engines, prompt, cfg)
    assert dcu.ids == full.ids
    assert all(r == [9 + 32] * 2 for r in dcu.rows_per_step)


class CheckedPlans(Executor):
    """Checks every remembered SlotPlan against the policy's answers asked afresh, the DCU window buffer
    (written only when it moves) against the window of the current key position, and in a batch the
    uploaded window starts against each sequence's own."""

    def __init__(self, engines):
        super().__init__(engines)
        self.asked = 0
        self.batched_steps = 0
        self.per_slot_k = 0

    def _plan(self, st):
        self.asked += 1
        plan = super()._plan(st)
        assert plan == self._make_plan(st), f"stale plan at step {st.view.step}"
        return plan

    def _prepare_rows(self, steps):
        super()._prepare_rows(steps)
        for st in steps:
            if st is not None and hasattr(st.cache, "window_rows"):
                assert torch.equal(st.cache.window, st.cache.window_rows(st.view.key_pos))
        if any(t is not None for t in self._batched_topk(steps)):     # the batch's own window starts
            self.batched_steps += 1
            for b, st in enumerate(steps):
                if st is not None:
                    assert int(self.win_start_t[b]) == st.cache.window_at
                    if hasattr(st.cache, "window_rows"):
                        assert st.cache.window_at == int(st.cache.window_rows(st.view.key_pos)[0])
            for l, t in enumerate(self._batched_topk(steps)):       # each sequence's own k, where they differ
                if t is not None and t[2]:
                    self.per_slot_k += 1
                    assert [int(k) for b, k in enumerate(self.k_slot_t[l]) if steps[b] is not None] == \
                        [st.cache.topk_rows(l)[1] for st in steps if st is not None]


PLAN_METHODS = {
    "full": {}, "prefix": {}, "dual": {},
    "dllm-cache": dict(prompt_interval=3, gen_interval=5),
    "dcu": dict(prompt_interval=3, gen_interval=7),
    "dcu@proportional": dict(allocation="proportional"),
    "dcu@refresh": dict(refresh_interval=4),
    "dcu+apd": {},
}


def _plan_config(method: str) -> DecodeConfig:
    from dllm.runtime import method_config

    base = DecodeConfig(gen_length=32, block_length=8, steps=16, budget=4, window=4, allocation="uniform",
                        tau0=0.4, beta=0.02)
    return method_config(method.split("@")[0], base).replace(**PLAN_METHODS[method])


@pytest.mark.parametrize("kernels", ["plain", "torch"])
@pytest.mark.parametrize("method", sorted(PLAN_METHODS))
def test_remembered_step_plans_equal_the_policies_answers(method, kernels, tiny_models):
    from dllm.engines.engine_set import torch_engine_set

    engines = torch_engine_set(tiny_models["llada"], "fp32", kernels=kernels)
    cfg = _plan_config(method)
    ex = CheckedPlans(engines)
    for prompt in (list(range(6, 17)), list(range(20, 27))):      # a second prompt length: plans re-made
        got = decode(engines, prompt, cfg, executor=ex)
        assert got.ids == decode(engines, prompt, cfg).ids
    assert ex.asked > 0
    if method != "dcu@proportional":                         # repeating plans are asked once, then reused
        assert len(ex._plans) < len(got.rows_per_step)


@pytest.mark.parametrize("method", ["dcu", "dcu+apd", "dllm-cache", "dcu@proportional"])
def test_remembered_plans_and_window_starts_in_a_batch(method, deep_llada):
    """In a batch (prompts of different lengths, more prompts than slots), every remembered plan equals the
    policy's fresh answers, the batch's window starts and (proportional budgets, 4 layers so that they
    differ) per-sequence k are each sequence's own, and every sequence decodes what it decodes alone."""
    from dllm.engines.engine_set import torch_engine_set
    from dllm.runtime.loop import decode_batch

    engines = torch_engine_set(deep_llada, "fp32", kernels="torch")
    cfg = _plan_config(method)
    prompts = [list(range(6, 17)), list(range(20, 27)), list(range(30, 39)), list(range(40, 45))]
    ex = CheckedPlans(engines)
    got = decode_batch(engines, prompts, cfg, executor=ex, batch_size=3)
    assert [r.ids for r in got] == [decode(engines, p, cfg).ids for p in prompts]
    assert ex.batched_steps > 0                  # the batch picks its rows together (proportional: each its k)
    assert (ex.per_slot_k > 0) == (method == "dcu@proportional")

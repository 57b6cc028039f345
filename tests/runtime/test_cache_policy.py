"""Cache policies as pure logic: rows per layer, the DCU window, allocation, refresh schedules."""

import pytest
import torch

from dllm.runtime.cache_policy import (DcuPolicy, DllmCachePolicy, DualPolicy, FullPolicy, PrefixPolicy,
                                       make_cache_policy, region_refresh)
from dllm.runtime.config import Allocation, DecodeConfig, Proxy
from dllm.runtime.methods import method_config
from dllm.runtime.view import StepView

P, G, L = 10, 64, 4
CPU = torch.device("cpu")


def _policy(cfg):
    pol = make_cache_policy(cfg)
    pol.reset(L, P, G, CPU)
    return pol


def _view(step=1, i=0, start=P, end=P + 16, key=None):
    return StepView(prompt_len=P, canvas_len=P + G, step=step, step_in_block=i, start=start, end=end,
                    key_pos=P - 1 if key is None else key)


def _rows(pol, view, scores=None):
    pol.begin_step(view)
    pol.prepare_step()
    out = []
    for l in range(L):
        d = scores[l] if (scores is not None and pol.wants_scores(l)) else None
        out.append(pol.rows(l, d))
    pol.end_step()
    pol.after_step()
    return out


def test_full_prefix_dual():
    assert _rows(_policy(DecodeConfig()), _view()) == [None] * L
    pre, dual = _policy(DecodeConfig(cache="prefix")), _policy(DecodeConfig(cache="dual"))
    assert isinstance(pre, PrefixPolicy) and isinstance(dual, DualPolicy)
    assert _rows(pre, _view(i=0, start=26, end=42)) == [None] * L      # block's first step: full
    for r in _rows(pre, _view(i=1, start=26, end=42)):
        assert r.tolist() == list(range(26, P + G))
    assert _rows(dual, _view(i=0, start=26, end=42)) == [None] * L
    for r in _rows(dual, _view(i=3, start=26, end=42)):
        assert r.tolist() == list(range(26, 42))


def test_region_refresh_counts_the_global_step():
    assert [region_refresh(t, 3) for t in range(1, 8)] == [True, False, False, True, False, False, True]


def test_dllm_cache_partial_update_and_refreshes():
    cfg = DecodeConfig(cache="dllm-cache", prompt_interval=4, gen_interval=3, rho=0.25)
    pol = _policy(cfg)
    assert isinstance(pol, DllmCachePolicy) and pol.proxy == Proxy.VALUE
    assert _rows(pol, _view(step=1)) == [None] * L                    # both refresh: full
    d = torch.rand(L, 1, G)
    rows = _rows(pol, _view(step=2), d)                               # neither: partial
    assert rows[0] is None
    k = int(G * 0.25)
    for l in range(1, L):
        expect = sorted((torch.topk(d[l, 0], k).indices + P).tolist())
        assert rows[l].tolist() == expect
    rows = _rows(pol, _view(step=4), d)                               # gen refresh only: all gen rows
    assert rows[1].tolist() == list(range(P, P + G))
    rows = _rows(pol, _view(step=5), d)                               # prompt refresh only: prompt + partial
    assert rows[1][:P].tolist() == list(range(P)) and rows[1].numel() == P + k


def _dcu(**kw):
    kw.setdefault("budget", 8)
    kw.setdefault("window", 8)
    return _policy(DecodeConfig(cache="dcu", **kw))


@pytest.mark.parametrize("key, expect_start", [(P - 1, 0), (P + 30, 26), (P + 2, 0), (P + G - 1, G - 9)])
def test_window_follows_the_last_committed_token_and_stays_inside(key, expect_start):
    pol = _dcu(window=8)
    win = pol.window_rows(key)
    assert win.numel() == 9                                           # 2*floor(W/2)+1
    assert win.tolist() == list(range(expect_start, expect_start + 9))
    assert win.min() >= 0 and win.max() < G


def test_window_as_wide_as_the_gen_region():
    pol = _dcu(window=200)
    assert pol.window_rows(P + 5).tolist() == list(range(G))


def test_dcu_rows_are_window_plus_most_changed():
    pol = _dcu(allocation="uniform", budget=6, window=8)
    assert _rows(pol, _view(step=1), None) == [None] * L               # step 1: full refresh
    d = torch.rand(L, 1, G)
    key = P + 30
    rows = _rows(pol, _view(step=2, key=key), d)
    assert rows[0] is None                                            # layer 0 always full
    win = set(range(26, 35))
    for l in range(1, L):
        vote = d[l, 0].clone()
        vote[list(win)] = -float("inf")
        top = set(torch.topk(vote, 6).indices.tolist())
        assert rows[l].tolist() == sorted(P + i for i in win | top)
        assert rows[l].numel() == 9 + 6


def test_dcu_refresh_interval_and_prompt_interval():
    pol = _dcu(refresh_interval=3, allocation="uniform")
    d = torch.rand(L, 1, G)
    assert _rows(pol, _view(step=4), d) == [None] * L                  # (4-1) % 3 == 0
    assert _rows(pol, _view(step=5), d)[1] is not None
    pol = _dcu(prompt_interval=1, allocation="uniform")
    rows = _rows(pol, _view(step=2), d)
    assert rows[1][:P].tolist() == list(range(P))                     # prompt recomputed every step


def test_allocation_uniform_proportional_softmax():
    d = torch.rand(L, 1, G)
    d[1] *= 0.1                                                       # layer 1 barely changes
    for alloc in ("uniform", "proportional", "softmax"):
        pol = _dcu(allocation=alloc, budget=8, window=8, softmax_temp=5.0)
        pol.begin_step(_view(step=2))
        assert pol.budgets == [8] * L                                 # no scores yet: uniform
        _rows(pol, _view(step=2), d)                                  # (begin_step inside) scores recorded
        pol.begin_step(_view(step=3))
        k = pol.budgets[1:]
        s = d[1:, 0].mean(-1).double()
        total = 8 * (L - 1)
        if alloc == "uniform":
            assert k == [8] * (L - 1)
        elif alloc == "proportional":
            assert k == torch.floor(total * s / s.sum()).long().tolist()
            assert sum(k) <= total and k[0] < k[1]
        else:
            assert k == torch.floor(total * torch.softmax(5.0 * s, 0)).long().tolist()
        assert all(0 <= x <= G - 9 for x in k)


@pytest.mark.parametrize("alloc", ["proportional", "softmax"])
def test_a_batch_of_budgets_equals_each_sequences_own(alloc):
    """allocate_budgets over a batch's layer scores gives each sequence the budgets it gets alone, and a policy
    handed them for its next step (set_next_budgets) uses them instead of reading its scores back."""
    from dllm.runtime.cache_policy import allocate_budgets

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, L, generator=g) * torch.rand(6, 1, generator=g)
    scores[2] = 0                                                     # no change anywhere: spread evenly
    scores[4, 1] = 0
    args = (8, G, G - 9, Allocation(alloc), 5.0)
    batch = allocate_budgets(scores, *args)
    assert batch == [allocate_budgets(scores[b:b + 1], *args)[0] for b in range(6)]
    assert batch[2][1:] == [8] * (L - 1) and len({tuple(r) for r in batch}) > 2
    pol = _dcu(allocation=alloc, budget=8, window=8, softmax_temp=5.0)
    _rows(pol, _view(step=2), torch.rand(L, 1, G, generator=g))   # (after_step inside) scores recorded
    assert pol.next_budgets_request()[0] == args
    own = allocate_budgets(pol.scores[None], *args)[0]
    pol.set_next_budgets(3, batch[0])
    pol.begin_step(_view(step=3))
    assert pol.budgets == batch[0] != own
    pol.begin_step(_view(step=4))                                     # handed for another step: its own
    assert pol.budgets == own


def test_allocation_is_clamped_to_the_gen_region():
    pol = _dcu(allocation="proportional", budget=60, window=8)
    d = torch.zeros(L, 1, G)
    d[2] = 1.0                                                        # all change in one layer
    _rows(pol, _view(step=2), d)
    pol.begin_step(_view(step=3))
    assert pol.budgets[2] == G - 9 and pol.budgets[1] == 0


def test_input_proxy_scores_even_at_full_steps_value_proxy_only_when_selecting():
    pol = _dcu(proxy="input", allocation="proportional")
    pol.begin_step(_view(step=1))
    assert pol.wants_scores(1) and not pol.wants_scores(0)
    pol = _dcu(proxy="value", allocation="proportional")
    pol.begin_step(_view(step=1))
    assert not pol.wants_scores(1)
    pol.begin_step(_view(step=2))
    assert pol.wants_scores(1)


def test_dcu_reference_preset():
    cfg = method_config("dcu-reference", DecodeConfig(budget=5, window=4, proxy="input", allocation="softmax"))
    pol = make_cache_policy(cfg)
    assert isinstance(pol, DcuPolicy)
    assert pol.proxy == Proxy.VALUE and pol.allocation == Allocation.UNIFORM
    assert (pol.prompt_interval, pol.gen_interval, pol.refresh_interval) == (5000, 5000, None)
    # the preset holds even if the config's own fields say otherwise
    pol = make_cache_policy(DecodeConfig(cache="dcu_reference", proxy="input"))
    assert pol.proxy == Proxy.VALUE and pol.allocation == Allocation.UNIFORM
    assert isinstance(make_cache_policy(DecodeConfig()), FullPolicy)


@pytest.mark.parametrize("cfg", [
    DecodeConfig(cache="dcu", budget=8, window=8, allocation="uniform", prompt_interval=3, gen_interval=5),
    DecodeConfig(cache="dcu", budget=8, window=8, allocation="proportional", refresh_interval=4),
    DecodeConfig(cache="dllm_cache", prompt_interval=3, gen_interval=5, rho=0.25),
], ids=["dcu", "dcu-proportional", "dllm-cache"])
def test_topk_rows_describes_exactly_the_rows_the_policy_picks(cfg):
    """Where a policy says (w, k) through topk_rows, its rows are the w gen rows from window_at plus the k
    other most-changed gen rows: what the executor picks for a whole batch in its place."""
    from dllm.kernels.select import select_rows_torch

    pol = _policy(cfg)
    described = 0
    for step in range(1, 12):
        view = _view(step=step, key=P + 3 * step)
        pol.begin_step(view)
        pol.prepare_step()
        for l in range(L):
            d = torch.rand(1, G, generator=torch.Generator().manual_seed(step * L + l))
            scores = d if pol.wants_scores(l) else None
            topk = pol.topk_rows(l)
            rows = pol.rows(l, scores)
            if topk is None:
                continue
            w, k = topk
            window = torch.arange(pol.window_at, pol.window_at + w) if w else None
            assert torch.equal(rows, select_rows_torch(d[0], window, k, P)), (step, l)
            described += 1
        pol.end_step()
        pol.after_step()
    assert described > 0

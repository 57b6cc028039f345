"""Commit policies as pure logic: counts, thresholds, the factor quirk, APD threshold dynamics."""

import math

import pytest
import torch
import torch.nn.functional as F

from dllm.runtime import reference as R
from dllm.runtime.commit import (ApdCommit, DreamSchedule, FactorCommit, FastDllmDreamSchedule,
                                 FastDllmDreamThreshold, LladaSchedule, ThresholdCommit, dream_count, even_split,
                                 factor_transfer, make_commit_policy)
from dllm.runtime.config import DecodeConfig
from dllm.runtime.view import StepView

MASK = 2


def _policy(cls, P=4, G=8, V=10, arch="llada", **cfg):
    cfg.setdefault("gen_length", G)
    cfg.setdefault("block_length", G)
    cfg.setdefault("steps", G)
    p = cls(DecodeConfig(**cfg), MASK, arch)
    p.reset(1, P, G, V, torch.device("cpu"), torch.Generator().manual_seed(0))
    return p


def _view(P=4, G=8, start=None, end=None, step=1, i=0, masks=None):
    start = P if start is None else start
    end = P + G if end is None else end
    return StepView(prompt_len=P, canvas_len=P + G, step=step, step_in_block=i, start=start, end=end,
                    block_masks=end - start if masks is None else masks)


def _logits_with_probs(probs):
    """Logits [1, R, V] whose softmax puts probs[r] on token 5 and spreads the rest evenly."""
    V = 10
    rows = []
    for p in probs:
        rest = (1 - p) / (V - 1)
        row = torch.full((V,), math.log(rest), dtype=torch.float64)
        row[5] = math.log(p)
        rows.append(row)
    return torch.stack(rows)[None]


def test_even_split_and_dream_count_match_the_reference():
    for n, steps in [(10, 4), (8, 8), (3, 5), (32, 7)]:
        assert even_split(n, steps) == R.transfer_counts(torch.tensor([n]), steps)[0].tolist()
        ts = torch.linspace(1, 1e-3, steps + 1)
        for i in range(steps):
            assert dream_count(float(n), i, steps, 1e-3) == R.dream_transfer_count(float(n), i, ts)


def test_schedule_commits_its_count_by_confidence_inside_the_block():
    p = _policy(LladaSchedule, G=8, steps=4, block_length=8)
    view = _view()
    p.begin_block(view)
    assert p.counts == [2, 2, 2, 2]
    logits = _logits_with_probs([0.3, 0.9, 0.2, 0.8, 0.5, 0.1, 0.95, 0.4])
    ids = torch.full((1, 8), MASK)
    ids[0, 6] = 7                                                     # already decoded: not a candidate
    transfer, x0 = p.select(logits.float(), ids, view)
    assert transfer[0].nonzero().flatten().tolist() == [1, 3]
    assert (x0[transfer] == 5).all()


def test_candidates_are_only_masks_of_the_current_block():
    p = _policy(ThresholdCommit, G=8, block_length=4, threshold=0.0)
    view = _view(start=8, end=12)                                     # second block
    ids = torch.full((1, 8), MASK)
    cand = p.candidates(ids, 4, view)
    assert cand[0].tolist() == [False] * 4 + [True] * 4


def test_threshold_commits_top1_plus_confident_ones():
    p = _policy(ThresholdCommit, threshold=0.85)
    ids = torch.full((1, 8), MASK)
    t, _ = p.select(_logits_with_probs([0.3, 0.9, 0.2, 0.86, 0.5, 0.1, 0.95, 0.4]), ids, _view())
    assert t[0].nonzero().flatten().tolist() == [1, 3, 6]
    t, _ = p.select(_logits_with_probs([0.3, 0.5, 0.2, 0.4, 0.5, 0.1, 0.6, 0.4]), ids, _view())
    assert t[0].nonzero().flatten().tolist() == [6]                  # nobody passes: still the top-1


@pytest.mark.parametrize("confs, expected", [
    ([0.9, 0.7, 0.5, 0.4], 2),       # 0.7 >= 1-1/3, 0.5 < 1-1/4: break at 2
    ([0.9, 0.5, 0.4], 1),            # break at 1
    ([0.9, 0.8, 0.76, 0.1], 4),      # quirk: break at the last index commits all, the failing one too
    ([0.99, 0.99, 0.99, 0.99], 4),   # scan runs through
    ([0.2], 1),                      # a single candidate always goes
])
def test_factor_rule_and_its_quirk(confs, expected):
    conf = torch.tensor([confs + [-math.inf]], dtype=torch.float64)
    cand = torch.tensor([[True] * len(confs) + [False]])
    t = factor_transfer(conf, cand, 1.0)
    assert int(t.sum()) == expected
    assert not t[0, -1]
    order = sorted(range(len(confs)), key=lambda i: -confs[i])[:expected]
    assert sorted(t[0].nonzero().flatten().tolist()) == sorted(order)


def test_factor_rule_ranks_equal_confidences_by_row_whatever_follows():
    """Three rows tie at 0.78 and the rule takes two of them: the first two rows, alone and with the rows a
    batch pads a shorter sequence with (never candidates)."""
    confs = [0.78, 0.1, 0.78, 0.95, 0.78]                 # sorted: 0.95, 0.78 x3 (the third fails 0.8), 0.1
    want = [True, False, True, True, False]
    for pad in (0, 1, 7):
        conf = torch.tensor([confs + [-math.inf] * pad], dtype=torch.float32)
        cand = torch.tensor([[True] * len(confs) + [False] * pad])
        assert factor_transfer(conf, cand, 1.0)[0].tolist() == want + [False] * pad


def test_factor_policy_uses_the_rule():
    p = _policy(FactorCommit, factor=1.0, G=4, block_length=4, steps=4)
    t, _ = p.select(_logits_with_probs([0.9, 0.7, 0.5, 0.4]), torch.full((1, 4), MASK), _view(G=4))
    assert t[0].tolist() == [True, True, False, False]


def _probs(logits):
    return F.softmax(logits.double(), -1)


def _c_and_H(p, prev):
    c = 1 - torch.topk(p, 2, dim=-1).values[..., 1]
    H = 1 - (p * prev).sum(-1) / (p.norm(dim=-1) * prev.norm(dim=-1))
    return c, H


def test_apd_per_token_thresholds_move_as_specified():
    G, P = 8, 4
    p = _policy(ApdCommit, P=P, G=G, block_length=4, apd_mode="per_token", tau0=0.9, alpha=0.01, beta=0.15)
    view = _view(P=P, G=G, start=P, end=P + 4)
    p.begin_block(view)
    assert p.logit_range(view) == (P, P + G)                          # per token: every position from the block on
    ids = torch.full((1, G), MASK)
    g = torch.Generator().manual_seed(1)
    l1, l2 = torch.randn(1, G, 10, generator=g), torch.randn(1, G, 10, generator=g)
    p.select(l1, ids, view)
    assert torch.equal(p.tau, torch.full((1, G), 0.9, dtype=torch.float64))   # no update at step 1
    p.after_step(view)
    view.step = 2
    p.select(l2, ids, view)
    c, H = _c_and_H(_probs(l2), _probs(l1))
    assert torch.allclose(p.tau, 0.9 - 0.01 * c + 0.15 * H)          # every position, future block included
    assert (c >= 0.5 - 1e-12).all()


def test_apd_global_uses_means_over_block_masks():
    G, P = 8, 4
    p = _policy(ApdCommit, P=P, G=G, block_length=4, apd_mode="global", tau0=0.9)
    view = _view(P=P, G=G, start=P, end=P + 4)
    assert p.logit_range(view) == (P, P + 8)                          # block + next block
    ids = torch.full((1, G), MASK)
    ids[0, 0] = 7                                                     # decoded: outside M_t
    g = torch.Generator().manual_seed(2)
    l1, l2 = torch.randn(1, G, 10, generator=g), torch.randn(1, G, 10, generator=g)
    p.select(l1, ids, view)
    p.after_step(view)
    view.step = 2
    p.select(l2, ids, view)
    c, H = _c_and_H(_probs(l2), _probs(l1))
    m = slice(1, 4)
    expected = 0.9 - 0.01 * c[0, m].mean() + 0.15 * H[0, m].mean()
    assert p.tau.dim() == 0 and torch.allclose(p.tau, expected)


def test_apd_commits_at_least_one_token_and_all_above_tau():
    p = _policy(ApdCommit, G=8, tau0=1.0)
    ids = torch.full((1, 8), MASK)
    t, _ = p.select(_logits_with_probs([0.3, 0.9, 0.2, 0.99, 0.5, 0.1, 0.95, 0.4]), ids, _view())
    assert t[0].nonzero().flatten().tolist() == [3]
    p = _policy(ApdCommit, G=8, tau0=0.9)
    t, _ = p.select(_logits_with_probs([0.3, 0.91, 0.2, 0.99, 0.5, 0.1, 0.95, 0.4]), ids, _view())
    assert t[0].nonzero().flatten().tolist() == [1, 3, 6]


def test_apd_clamp_and_block_reset_are_optional():
    p = _policy(ApdCommit, G=8, block_length=4, tau0=0.9, beta=10.0, tau_max=0.95, apd_block_reset=True)
    view = _view(start=4, end=8)
    ids = torch.full((1, 8), MASK)
    g = torch.Generator().manual_seed(3)
    p.select(torch.randn(1, 8, 10, generator=g), ids, view)
    p.after_step(view)
    view.step = 2
    p.select(torch.randn(1, 8, 10, generator=g), ids, view)
    assert (p.tau <= 0.95).all() and (p.tau > 0.9).any()              # moved up, clamped
    p.begin_block(_view(start=8, end=12))
    assert (p.tau == 0.9).all()                                       # reset at the block start


def test_dream_schedule_and_factory():
    assert isinstance(make_commit_policy(DecodeConfig(), "dream", MASK), DreamSchedule)
    assert isinstance(make_commit_policy(DecodeConfig(), "llada", MASK), LladaSchedule)
    assert isinstance(make_commit_policy(DecodeConfig(commit="apd"), "dream", MASK), ApdCommit)
    p = _policy(DreamSchedule, G=8, steps=4, block_length=8)
    logits = _logits_with_probs([0.3, 0.9, 0.2, 0.8, 0.5, 0.1, 0.95, 0.4]).float()
    t, x0 = p.select(logits, torch.full((1, 8), MASK), _view(masks=8))
    assert int(t.sum()) == dream_count(8.0, 0, 4, 1e-3)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("cls,cfg", [(ApdCommit, dict(apd_mode="per_token", tau0=0.5, beta=0.02)),
                                     (ApdCommit, dict(apd_mode="global", tau0=0.5, beta=0.02)),
                                     (ThresholdCommit, dict(threshold=0.3)), (FactorCommit, dict(factor=2.0)),
                                     (LladaSchedule, dict(steps=4))])
def test_fused_statistics_commit_what_the_plain_path_commits(path, cls, cfg):
    """Several steps with several commits each: the KernelOps path (Triton interpreted on the CPU, or the
    torch twins) picks the same tokens and moves APD's thresholds like the float64 softmax path."""
    from dllm.kernels import make_ops
    from dllm.kernels._triton import HAVE_TRITON

    if path == "triton" and not HAVE_TRITON:
        pytest.skip("needs triton")
    G, P, V = 8, 4, 50
    plain, fused = _policy(cls, P=P, G=G, V=V, **cfg), _policy(cls, P=P, G=G, V=V, **cfg)
    fused.ops = make_ops(path, "cpu")
    ids = torch.full((1, G), MASK)
    g = torch.Generator().manual_seed(5)
    view = _view(P=P, G=G, start=P, end=P + G, masks=G)
    for p in (plain, fused):
        p.begin_block(view)
    for step in range(1, 4):
        view.step, view.step_in_block = step, step - 1
        lo, hi = plain.logit_range(view)
        logits = (torch.randn(1, hi - lo, V, generator=g) * 3).to(torch.bfloat16)
        t1, x1 = plain.select(logits, ids[:, lo - P:hi - P], view)
        t2, x2 = fused.select(logits, ids[:, lo - P:hi - P], view)
        assert torch.equal(t1, t2) and torch.equal(x1, x2)
        if cls is ApdCommit:
            torch.testing.assert_close(fused.tau, plain.tau, rtol=1e-12, atol=1e-12)
        for p in (plain, fused):
            p.after_step(view)
        ids[:, lo - P:hi - P] = torch.where(t1, x1, ids[:, lo - P:hi - P])
    assert fused.ops.launches > 0


def test_apd_global_ignores_rows_without_a_previous_distribution(monkeypatch):
    """Global mode reads logits of the block and the next one. At a block's first step the next block's rows
    have no previous distribution yet (never computed), so their H is whatever the buffer held: here NaN,
    as uninitialised memory may be (and large fresh allocations are zeros: H = 1 - 0/0 = NaN too). Only the
    block's masks may enter the means; tau must stay the reference's value and several tokens must go."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(math.nan))
    G, P, bl = 12, 4, 4
    p = _policy(ApdCommit, P=P, G=G, block_length=bl, apd_mode="global", tau0=0.5, alpha=0.01, beta=0.02)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, G, 10, generator=g) * 4                   # one step's logits of every gen row
    ids = torch.full((1, G), MASK)
    view = _view(P=P, G=G, start=P, end=P + bl)
    lo, hi = p.logit_range(view)
    p.select(logits[:, lo - P:hi - P], ids[:, lo - P:hi - P], view)  # step 1 stores rows [0, 8)
    p.after_step(view)
    ids[:, :bl] = 7                                                   # block 0 done
    view = _view(P=P, G=G, start=P + bl, end=P + 2 * bl, step=2)
    lo, hi = p.logit_range(view)                                      # rows [4, 12): 8..11 never seen
    logits2 = torch.randn(1, G, 10, generator=g) * 4
    t, _ = p.select(logits2[:, lo - P:hi - P], ids[:, lo - P:hi - P], view)
    c, H = _c_and_H(_probs(logits2[:, bl:2 * bl]), _probs(logits[:, bl:2 * bl]))
    expected = 0.5 - 0.01 * c.mean() + 0.02 * H.mean()
    assert torch.isfinite(p.tau) and torch.allclose(p.tau, expected)
    conf, x0 = _probs(logits2[:, bl:2 * bl]).max(-1)
    want = ((conf >= expected) | (conf == conf.max())) & (x0 != MASK)   # a drawn mask token stays a mask
    assert t[0, :bl].tolist() == want[0].tolist() and int(t.sum()) > 1


# -- Fast-dLLM's Dream port ---------------------------------------------------------------------------------
def _port(cls, cache="prefix", **cfg):
    commit = "threshold" if cls is FastDllmDreamThreshold else "schedule"
    cfg.setdefault("steps", 8)
    return _policy(cls, P=4, G=16, arch="dream", block_length=8, cache=cache, commit=commit, fastdllm_dream=True,
                   **cfg)


@pytest.mark.parametrize("cls", [FastDllmDreamSchedule, FastDllmDreamThreshold])
def test_port_logit_ranges_stopping_and_capture(cls):
    """The opening step needs one row; cached steps the block, or in prefix threshold mode at temperature > 0
    every fed row [start, N) (its draws cover the later blocks' masks). A block stops once a cached step left
    it empty, never before its first cached step. Nothing is captured in a CUDA graph."""
    for cache, T in [("prefix", 0.0), ("prefix", 0.5), ("dual", 0.0), ("dual", 0.5)]:
        p = _port(cls, cache=cache, temperature=T)
        view = _view(P=4, G=16, start=4, end=12)
        p.begin_block(view)
        assert p.logit_range(view) == (4, 5) and p.step_key(view) is None and not p.until_empty
        p.after_step(view)
        assert not p.until_empty                                       # the first cached step always runs
        view.step_in_block = 1
        wide = cls is FastDllmDreamThreshold and cache == "prefix" and T > 0
        assert p.logit_range(view) == (4, 20 if wide else 12) and p.step_key(view) is None
        p.after_step(view)
        assert p.until_empty
        p.begin_block(view)
        assert not p.until_empty
    assert _port(FastDllmDreamSchedule).block_steps(view) == 4         # S = steps / num_blocks
    assert _port(FastDllmDreamThreshold).block_steps(view) == 9        # until empty: at most block_length + 1
    assert isinstance(make_commit_policy(DecodeConfig(cache="dual", fastdllm_dream=True, gen_length=16, block_length=8,
                                                      steps=8), "dream", MASK), FastDllmDreamSchedule)
    assert isinstance(make_commit_policy(DecodeConfig(cache="dual", commit="threshold", fastdllm_dream=True),
                                         "dream", MASK), FastDllmDreamThreshold)


def test_port_threshold_is_uncapped_and_ranks_the_block_only():
    """Every block mask at or above the threshold goes in one cached step, however many; masks of later blocks
    (fed in prefix mode) are drawn but never committed, however confident."""
    p = _port(FastDllmDreamThreshold, threshold=0.5)
    view = _view(P=4, G=16, start=4, end=12, i=1, masks=7)
    ids = torch.full((1, 16), MASK)
    ids[0, 0] = 9                                                      # the block's first position: decided
    probs = [0.9, 0.6, 0.55, 0.7, 0.3, 0.2, 0.51, 0.8] + [0.99] * 8
    logits = _logits_with_probs(probs).float()                         # rows [4, 20)
    t, x0 = p.select(logits, ids, view)
    want = [False, True, True, True, False, False, True, True] + [False] * 8
    assert t[0].tolist() == want and (x0[0, t[0]] == 5).all()          # 5 commits; the schedule's count would be 2
    p = _port(FastDllmDreamThreshold, threshold=0.95)
    t, _ = p.select(logits, ids, view)
    assert t[0].tolist() == [False] * 7 + [True] + [False] * 8         # none reaches it: the top one alone


def test_port_schedule_ranks_by_negative_entropy_whatever_alg_says():
    """A peaked row beats a flatter one with a higher top probability: the entropy ranking, not maskgit_plus."""
    V = 10
    flat_top = torch.full((V,), 0.4 / (V - 1))                         # top 0.6, the rest spread: high entropy
    flat_top[5] = 0.6
    peaked = torch.tensor([0.45, 0.54] + [0.01 / (V - 2)] * (V - 2))   # top 0.54 but two tokens only: low entropy
    logits = torch.stack([r.log() for r in [peaked] * 3 + [flat_top] * 5])[None].float()   # rows [4, 12)
    ids = torch.full((1, 8), MASK)
    ids[0, 0] = 9
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        p = _port(FastDllmDreamSchedule, cache="dual", alg=alg)                 # S = 4
        view = _view(P=4, G=16, start=4, end=12, i=1, masks=7)
        assert dream_count(7.0, 1, 4, 1e-3) == 2
        t, x0 = p.select(logits, ids, view)
        assert t[0].tolist() == [False, True, True] + [False] * 5 and x0[0, 1:3].tolist() == [1, 1]

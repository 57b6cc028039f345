"""Reference decoders: LLaDA equals a literal transcription of its published algorithm; invariants of both.

Tiny random models (2 layers, d_model 64). Random models can rank the mask token first; the published
algorithms then "commit" a mask, which stays a mask. Invariant tests therefore use ``NoMaskToken``
(mask logit at -inf, as for any trained model); the transcription test uses the raw model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dllm.errors import ConfigError
from dllm.exporter.models import DiffusionLM, tiny_spec
from dllm.exporter.models.writer import init_weights
from dllm.runtime.reference import (ApdConfig, BlockCache, DreamAlg, DreamConfig, FastDllmDreamConfig,
                                    LladaConfig, ReferenceResult, Remasking, apd_generate, dream_generate,
                                    dream_transfer_count, fastdllm_dream_generate, generate, llada_generate,
                                    transfer_counts)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llada():
    return init_weights(DiffusionLM(tiny_spec("llada")), seed=3, std=0.5).eval()


@pytest.fixture(scope="module")
def dream():
    return init_weights(DiffusionLM(tiny_spec("dream")), seed=4, std=0.5).eval()


class NoMaskToken:
    """The model with the mask token's logit at -inf; records every canvas it is called on."""

    def __init__(self, model):
        self.model, self.spec, self.inputs = model, model.spec, []

    def __call__(self, ids):
        self.inputs.append(ids.clone())
        logits = self.model(ids)
        logits[..., self.spec.mask_id] = -math.inf
        return logits


def prompt(spec, B=2, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, spec.vocab_size, (B, P), generator=g)   # ids >= 6: no special tokens


# -- LLaDA: a literal transcription of the published `generate` ---------------
def published_llada_generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale,
                             remasking, mask_id, gen):
    def add_gumbel_noise(logits, temperature):
        if temperature == 0:
            return logits
        logits = logits.to(torch.float64)
        noise = torch.rand(logits.shape, dtype=torch.float64, generator=gen)
        gumbel_noise = (-torch.log(noise)) ** temperature
        return logits.exp() / gumbel_noise

    def get_num_transfer_tokens(mask_index, steps):
        mask_num = mask_index.sum(dim=1, keepdim=True)
        base = mask_num // steps
        remainder = mask_num % steps
        num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            num[i, :remainder[i]] += 1
        return num

    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo:lo + block_length] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            logits_with_noise = add_gumbel_noise(logits, temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=gen)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


SHAPES = [  # gen_length, block_length, steps
    (16, 16, 16),   # one block, one token per step
    (16, 8, 6),     # 2 blocks x 3 steps: 8 -> 3, 3, 2 (remainder first)
    (12, 4, 9),     # 3 blocks x 3 steps: 4 -> 2, 1, 1
    (10, 5, 4),     # 2 blocks x 2 steps: 5 -> 3, 2
    (8, 4, 10),     # 2 blocks x 5 steps: 4 -> 1, 1, 1, 1, 0 (more steps than tokens)
]


@torch.no_grad()
@pytest.mark.parametrize("P", [1, 6])
@pytest.mark.parametrize("gen_length,block_length,steps", SHAPES)
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_llada_matches_published_algorithm(llada, P, gen_length, block_length, steps, remasking, temperature):
    p = prompt(llada.spec, B=2, P=P, seed=P + steps)
    cfg = LladaConfig(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                      remasking=remasking, seed=11)
    got = llada_generate(llada, p, cfg)
    want = published_llada_generate(llada, p, steps, gen_length, block_length, temperature, 0.0, remasking,
                                    llada.spec.mask_id, torch.Generator().manual_seed(11))
    assert torch.equal(got.ids, want)
    assert got.steps == got.nfe == steps


@torch.no_grad()
@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (0.5, "random")])
def test_llada_cfg_matches_published_algorithm(llada, temperature, remasking):
    p = prompt(llada.spec, B=2, P=4, seed=9)
    cfg = LladaConfig(gen_length=12, block_length=6, steps=6, temperature=temperature, remasking=remasking,
                      cfg_scale=1.5, seed=5)
    got = llada_generate(llada, p, cfg)
    want = published_llada_generate(llada, p, 6, 12, 6, temperature, 1.5, remasking, llada.spec.mask_id,
                                    torch.Generator().manual_seed(5))
    assert torch.equal(got.ids, want)
    assert got.nfe == 6


def test_transcription_is_sensitive_to_the_details(llada):
    """Guard: the check above would notice a different split, seed or block rule."""
    p = prompt(llada.spec, P=3)
    base = published_llada_generate(llada, p, 8, 16, 8, 0.8, 0.0, "low_confidence", llada.spec.mask_id,
                                    torch.Generator().manual_seed(1))
    other_seed = published_llada_generate(llada, p, 8, 16, 8, 0.8, 0.0, "low_confidence", llada.spec.mask_id,
                                          torch.Generator().manual_seed(2))
    one_block = published_llada_generate(llada, p, 8, 16, 16, 0.8, 0.0, "low_confidence", llada.spec.mask_id,
                                         torch.Generator().manual_seed(1))
    assert not torch.equal(base, other_seed) and not torch.equal(base, one_block)


# -- LLaDA invariants ---------------------------------------------------------------------------------
def test_transfer_counts_remainder_first():
    assert transfer_counts(torch.tensor([10, 8, 3, 0]), 4).tolist() == [
        [3, 3, 2, 2], [2, 2, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def _check_invariants(result: ReferenceResult, inputs: list[torch.Tensor], p: torch.Tensor, mask_id: int):
    ids = result.ids
    P = p.shape[1]
    assert torch.equal(ids[:, :P], p), "prompt changed"
    assert not (ids == mask_id).any(), "masks left at the end"
    assert result.gen_ids.shape == (p.shape[0], ids.shape[1] - P)
    assert len(inputs) == result.nfe == result.steps == len(result.history)
    canvases = inputs + [ids]
    for t in range(result.steps):
        before, after = canvases[t], canvases[t + 1]
        decided = before != mask_id
        assert torch.equal(after[decided], before[decided]), f"step {t} changed a committed token"
        new = decided.logical_not() & (after != mask_id)
        assert torch.equal(new.nonzero(), result.history[t]), f"step {t} history disagrees with the canvas"
    steps_of = result.commit_step
    assert (steps_of[:, :P] == -1).all() and (steps_of[:, P:] >= 0).all()


@pytest.mark.parametrize("remasking", list(Remasking))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_llada_invariants(llada, remasking, temperature):
    model = NoMaskToken(llada)
    p = prompt(llada.spec, B=3, P=4)
    cfg = LladaConfig(gen_length=20, block_length=10, steps=8, temperature=temperature, remasking=remasking)
    r = llada_generate(model, p, cfg)
    _check_invariants(r, model.inputs, p, llada.spec.mask_id)
    per_step = [[int((h[:, 0] == b).sum()) for b in range(3)] for h in r.history]
    assert per_step == [[3] * 3, [3] * 3, [2] * 3, [2] * 3] * 2       # 10 over 4 steps: 3, 3, 2, 2
    for t, h in enumerate(r.history):                                  # commits stay inside the block
        block = t // cfg.steps_per_block
        assert ((h[:, 1] >= 4 + 10 * block) & (h[:, 1] < 4 + 10 * (block + 1))).all()


def test_llada_low_confidence_commits_the_most_probable(llada):
    model = NoMaskToken(llada)
    p = prompt(llada.spec, B=1, P=3)
    r = llada_generate(model, p, LladaConfig(gen_length=8, block_length=8, steps=4))
    logits = model.model(model.inputs[0])[0].double()
    logits[:, llada.spec.mask_id] = -math.inf
    conf = logits.softmax(-1).max(-1).values[3:]                      # gen rows only
    assert set(r.history[0][:, 1].tolist()) == set((conf.topk(2).indices + 3).tolist())
    assert torch.equal(r.ids[0, r.history[0][:, 1]], logits.argmax(-1)[r.history[0][:, 1]])


def test_llada_commits_mask_token_like_the_published_code(llada):
    """Published behaviour, kept on purpose: if the argmax is the mask id it is 'committed' and stays a mask."""
    class AlwaysMask:
        spec = llada.spec

        def __call__(self, ids):
            out = torch.zeros(*ids.shape, llada.spec.vocab_size)
            out[..., llada.spec.mask_id] = 1.0
            return out
    r = llada_generate(AlwaysMask(), prompt(llada.spec, P=2), LladaConfig(gen_length=4, steps=4))
    assert (r.gen_ids == llada.spec.mask_id).all() and r.steps == 4


def test_llada_seeded_reproducibility(llada):
    p = prompt(llada.spec, P=4)
    cfg = LladaConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, remasking="random", seed=7)
    a, b = llada_generate(llada, p, cfg), llada_generate(llada, p, cfg)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
    c = llada_generate(llada, p, LladaConfig(gen_length=16, block_length=8, steps=8, temperature=1.0,
                                             remasking="random", seed=8))
    assert not torch.equal(a.commit_step, c.commit_step)
    assert torch.equal(generate(llada, p, cfg).ids, a.ids)


# -- Dream --------------------------------------------------------------------------------------------
def expected_dream_counts(G: int, steps: int, eps: float) -> list[int]:
    ts = torch.linspace(1, eps, steps + 1)
    left, out = G, []
    for i in range(steps):
        k = left if i == steps - 1 else int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i]))
        out.append(k)
        left -= k
    return out


def test_dream_transfer_count():
    ts = torch.linspace(1, 1e-3, 5)
    assert dream_transfer_count(16, 0, ts) == int(16 * (1 - ts[1] / ts[0]))
    assert dream_transfer_count(5, 3, ts) == 5                                 # last step: everything left
    assert expected_dream_counts(16, 4, 1e-3) == [3, 4, 4, 5]              # eps: 16 * 0.2498 -> 3
    assert sum(expected_dream_counts(37, 7, 1e-3)) == 37


@pytest.mark.parametrize("alg", [DreamAlg.MASKGIT_PLUS, DreamAlg.TOPK_MARGIN, DreamAlg.ENTROPY])
@pytest.mark.parametrize("steps", [5, 16])
def test_dream_counts_and_invariants(dream, alg, steps):
    model = NoMaskToken(dream)
    p = prompt(dream.spec, B=2, P=6)
    r = dream_generate(model, p, DreamConfig(gen_length=16, steps=steps, alg=alg))
    _check_invariants(r, model.inputs, p, dream.spec.mask_id)
    counts = [[int((h[:, 0] == b).sum()) for b in range(2)] for h in r.history]
    assert counts == [[k, k] for k in expected_dream_counts(16, steps, 1e-3)]


def _alg_confidence(alg: DreamAlg, logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    if alg == DreamAlg.MASKGIT_PLUS:
        return probs.max(-1).values
    if alg == DreamAlg.TOPK_MARGIN:
        top = probs.topk(2, -1).values
        return top[..., 0] - top[..., 1]
    return (probs * torch.log(probs + 1e-10)).sum(-1)      # negative entropy: peaked = higher


@pytest.mark.parametrize("alg", [DreamAlg.MASKGIT_PLUS, DreamAlg.TOPK_MARGIN, DreamAlg.ENTROPY])
def test_dream_alg_ranks_masks_as_described(dream, alg):
    """Every step (temperature 0) commits argmax tokens at the top-k masked positions by the alg's confidence."""
    model = NoMaskToken(dream)
    p = prompt(dream.spec, B=1, P=4)
    r = dream_generate(model, p, DreamConfig(gen_length=12, steps=4, alg=alg))
    for t, h in enumerate(r.history):
        x = model.inputs[t][0]
        logits = model.model(model.inputs[t])[0]
        logits[:, dream.spec.mask_id] = -math.inf
        masked = (x == dream.spec.mask_id).nonzero().squeeze(-1)
        conf = _alg_confidence(alg, logits[masked])
        want = masked[conf.topk(h.shape[0]).indices]
        assert set(h[:, 1].tolist()) == set(want.tolist())
        assert torch.equal(r.ids[0, h[:, 1]], logits[h[:, 1]].argmax(-1))


def test_dream_algs_differ(dream):
    p = prompt(dream.spec, B=1, P=4)
    orders = {alg: dream_generate(dream, p, DreamConfig(gen_length=16, steps=16, alg=alg)).commit_step
              for alg in (DreamAlg.MASKGIT_PLUS, DreamAlg.TOPK_MARGIN, DreamAlg.ENTROPY)}
    assert len({tuple(o.flatten().tolist()) for o in orders.values()}) > 1


def test_dream_origin(dream):
    model = NoMaskToken(dream)
    p = prompt(dream.spec, B=2, P=3)
    cfg = DreamConfig(gen_length=24, steps=6, alg="origin", seed=3)
    r = dream_generate(model, p, cfg)
    _check_invariants(r, model.inputs, p, dream.spec.mask_id)
    per_step = [[int((h[:, 0] == b).sum()) for b in range(2)] for h in r.history]
    assert sum(map(sum, per_step)) == 48
    assert torch.equal(dream_generate(dream, p, cfg).ids, dream_generate(dream, p, cfg).ids)
    # temperature 0: every committed token is the argmax of its step
    for t, h in enumerate(r.history):
        logits = model.model(model.inputs[t])
        logits[..., dream.spec.mask_id] = -math.inf
        assert torch.equal(r.ids[h[:, 0], h[:, 1]], logits.argmax(-1)[h[:, 0], h[:, 1]])


def test_dream_origin_transfer_probability(dream):
    """Each mask moves with probability 1 - s/t: over many rows the first step moves about that share."""
    p = prompt(dream.spec, B=16, P=2)
    r = dream_generate(NoMaskToken(dream), p, DreamConfig(gen_length=32, steps=4, alg="origin", seed=0))
    ts = torch.linspace(1, 1e-3, 5)
    share = r.history[0].shape[0] / (16 * 32)
    assert abs(share - float(1 - ts[1] / ts[0])) < 0.06


@pytest.mark.parametrize("alg", list(DreamAlg))
def test_dream_blockwise(dream, alg):
    model = NoMaskToken(dream)
    p = prompt(dream.spec, B=2, P=5)
    cfg = DreamConfig(gen_length=16, block_length=4, steps=12, alg=alg, temperature=0.5, seed=1)
    r = dream_generate(model, p, cfg)
    _check_invariants(r, model.inputs, p, dream.spec.mask_id)
    for t, h in enumerate(r.history):
        block = t // 3
        assert ((h[:, 1] >= 5 + 4 * block) & (h[:, 1] < 5 + 4 * (block + 1))).all()
    for b in range(3):   # a block has no masks left once its steps are done
        assert not (model.inputs[3 * (b + 1)][:, 5 + 4 * b:9 + 4 * b] == dream.spec.mask_id).any()
    if alg != DreamAlg.ORIGIN:
        counts = [[int((h[:, 0] == j).sum()) for j in range(2)] for h in r.history]
        assert counts == [[k, k] for k in expected_dream_counts(4, 3, 1e-3)] * 4


def test_dream_one_block_equals_original_loop(dream):
    p = prompt(dream.spec, P=3)
    a = dream_generate(dream, p, DreamConfig(gen_length=12, steps=6, temperature=0.7, top_p=0.9, seed=2))
    b = dream_generate(dream, p, DreamConfig(gen_length=12, block_length=12, steps=6, temperature=0.7, top_p=0.9,
                                             seed=2))
    assert torch.equal(a.ids, b.ids)


def test_dream_sampling_options(dream):
    p = prompt(dream.spec, B=1, P=4)
    # top_k = 1 and a tiny top_p leave only the argmax token: same tokens as greedy, whatever the temperature
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        model = NoMaskToken(dream)
        r = dream_generate(model, p, DreamConfig(gen_length=12, steps=12, temperature=1.5, seed=4, **kw))
        for t, h in enumerate(r.history):
            logits = model.model(model.inputs[t])
            logits[..., dream.spec.mask_id] = -math.inf
            assert torch.equal(r.ids[h[:, 0], h[:, 1]], logits.argmax(-1)[h[:, 0], h[:, 1]])
    sampled = [dream_generate(NoMaskToken(dream), p, DreamConfig(gen_length=12, steps=12, temperature=2.0, seed=s))
               for s in (0, 0, 1)]
    assert torch.equal(sampled[0].ids, sampled[1].ids)
    assert not torch.equal(sampled[0].ids, sampled[2].ids)
    # alg_temp > 0 samples the positions: same counts, reproducible, usually another order
    model = NoMaskToken(dream)
    at = dream_generate(model, p, DreamConfig(gen_length=12, steps=4, alg_temp=0.5, seed=3))
    _check_invariants(at, model.inputs, p, dream.spec.mask_id)
    assert [h.shape[0] for h in at.history] == expected_dream_counts(12, 4, 1e-3)
    assert torch.equal(at.ids, dream_generate(dream, p, DreamConfig(gen_length=12, steps=4, alg_temp=0.5, seed=3)).ids)


# -- LLaDA top-p / top-k (our extension) ---------------------------------------------------------------
def test_llada_top_k_one_and_tiny_top_p_are_greedy(llada):
    """They restrict the draw only: with one token left, any temperature gives the greedy run."""
    p = prompt(llada.spec, P=4)
    greedy = llada_generate(llada, p, LladaConfig(gen_length=16, block_length=8, steps=8))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        hot = llada_generate(llada, p, LladaConfig(gen_length=16, block_length=8, steps=8, temperature=2.0, **kw))
        assert torch.equal(hot.ids, greedy.ids) and torch.equal(hot.commit_step, greedy.commit_step)
    free = llada_generate(llada, p, LladaConfig(gen_length=16, block_length=8, steps=8, temperature=2.0))
    assert not torch.equal(free.ids, greedy.ids)


# -- APD: generate_pd ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["global", "per_token"])
@pytest.mark.parametrize("tau0,beta", [(0.5, 0.02), (0.9, 0.15)])
def test_apd_reference_follows_its_rule(llada, mode, tau0, beta):
    """Replays every step from the recorded canvases with the APD rule (docs/algorithms.md) written out again:
    tau moves from the second step on (global: means over the block's masks; per token: every position),
    is never reset at a block start, and a step commits the block masks at or above tau plus the top one."""
    model = NoMaskToken(llada)
    p = prompt(llada.spec, B=1, P=5, seed=1)
    cfg = ApdConfig(gen_length=24, block_length=8, steps=24, mode=mode, tau0=tau0, alpha=0.01, beta=beta)
    r = apd_generate(model, p, cfg)
    _check_invariants(r, model.inputs, p, llada.spec.mask_id)
    P, tau, prev, blocks_seen = 5, None, None, []
    for t, x in enumerate(model.inputs):
        probs = F.softmax(model.model(x).double().masked_fill(
            torch.arange(llada.spec.vocab_size) == llada.spec.mask_id, -math.inf), -1)[0, P:]   # [G, V]
        masked = (x[0, P:] == llada.spec.mask_id)
        block = int(masked.nonzero()[0]) // 8                          # the first block with masks
        blocks_seen.append(block)
        in_block = masked & (torch.arange(24) // 8 == block)
        if tau is None:
            tau = torch.full(() if mode == "global" else (24,), tau0, dtype=torch.float64)
        else:
            c = 1 - probs.topk(2, -1).values[:, 1]
            H = 1 - F.cosine_similarity(probs, prev, dim=-1)
            if mode == "global":
                tau = tau - 0.01 * c[in_block].mean() + beta * H[in_block].mean()
            else:
                tau = tau - 0.01 * c + beta * H
        prev = probs
        conf = probs.max(-1).values.masked_fill(~in_block, -math.inf)
        close = (conf - tau).abs() < 1e-9
        want = (conf >= tau) & in_block
        want[conf.argmax()] = True
        got = torch.zeros(24, dtype=torch.bool)
        got[r.history[t][:, 1] - P] = True
        assert torch.equal(got | close, want | close), f"step {t}"
    assert blocks_seen == sorted(blocks_seen) and set(blocks_seen) == {0, 1, 2}
    assert all(len(h) >= 1 for h in r.history)
    if tau0 == 0.5:
        assert max(len(h) for h in r.history) > 1                      # several tokens per step


def test_apd_reference_errors(llada):
    with pytest.raises(ConfigError, match="mode 'both' is unknown"):
        ApdConfig(mode="both")
    with pytest.raises(ConfigError, match="alpha"):
        ApdConfig(alpha=float("nan"))
    with pytest.raises(ConfigError, match="one prompt at a time"):
        apd_generate(llada, prompt(llada.spec, B=2), ApdConfig(gen_length=8, steps=8))
    with pytest.raises(ConfigError, match="needs an ApdConfig"):
        apd_generate(llada, prompt(llada.spec, B=1), LladaConfig())
    r = generate(llada, prompt(llada.spec, B=1), ApdConfig(gen_length=8, block_length=4, steps=8, tau0=0.5))
    assert r.steps <= 8 and r.gen_ids.shape == (1, 8)


# -- Fast-dLLM's Dream port ---------------------------------------------------------------------------
class _NoMaskHead(torch.nn.Module):
    """An LM head whose mask-token logit is -inf (a trained model never predicts it)."""

    def __init__(self, head, mask_id):
        super().__init__()
        self.head, self.mask_id = head, mask_id

    def forward(self, h):
        out = self.head(h)
        out[..., self.mask_id] = -math.inf
        return out


@pytest.fixture(scope="module")
def dream_no_mask():
    m = init_weights(DiffusionLM(tiny_spec("dream")), seed=4, std=0.5).eval()
    m.lm_head = _NoMaskHead(m.lm_head, m.spec.mask_id)
    return m


def test_block_cache_full_and_all_rows_equal_the_model(dream):
    p = prompt(dream.spec, B=1, P=6)
    x = torch.cat([p, torch.full((1, 10), dream.spec.mask_id)], dim=1)
    cache = BlockCache(dream)
    with torch.no_grad():
        full = cache.full(x)
        assert torch.allclose(full, dream(x), atol=1e-6)
        assert torch.allclose(cache.rows(x, 0, 16), full, atol=1e-6)   # every row fresh: no reuse at all
        x2 = x.clone()
        x2[0, 6:9] = 7                                                 # the canvas moves on
        dual = cache.rows(x2, 6, 10)                                   # block [6, 10) against the cache
        assert dual.shape == (1, 4, dream.spec.vocab_size)
        assert not torch.allclose(dual[:, 1:], dream(x2)[:, 7:10], atol=1e-4)   # stale suffix and prefix


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fastdllm_dream_schedule_counts(dream_no_mask, cache):
    """Per block: the first step commits just the block's first position; the others follow Dream's
    schedule from timestep index 1 over the remaining masks, and each block ends empty after S steps."""
    p = prompt(dream_no_mask.spec, B=1, P=5)
    r = fastdllm_dream_generate(dream_no_mask, p, FastDllmDreamConfig(gen_length=24, block_length=8, steps=12,
                                                                       cache=cache))
    assert r.steps == 12 and not (r.ids == dream_no_mask.spec.mask_id).any()
    ts = torch.linspace(1, 1e-3, 5)
    left, counts = 7, []
    for i in range(1, 4):
        k = left if i == 3 else int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i]))
        counts.append(k)
        left -= k
    for b in range(3):
        steps = r.history[4 * b:4 * b + 4]
        assert steps[0][:, 1].tolist() == [5 + 8 * b]
        assert [len(h) for h in steps[1:]] == counts
        assert all(((h[:, 1] >= 5 + 8 * b) & (h[:, 1] < 13 + 8 * b)).all() for h in steps)


def _opening(model, p, bl):
    """The canvas after block 0's opening step at temperature 0, and the block cache it refreshed."""
    P = p.shape[1]
    x = torch.cat([p, torch.full((1, 2 * bl), model.spec.mask_id)], dim=1)
    cache = BlockCache(model)
    with torch.no_grad():
        x[0, P] = cache.full(x)[0, P].softmax(-1).argmax()
    return x, cache


def test_fastdllm_dream_schedule_ranks_by_negative_entropy_whatever_alg_says(dream_no_mask):
    """As published, the schedule mode ranks the block's masks by sum p log p; alg is not consulted."""
    p = prompt(dream_no_mask.spec, B=1, P=5, seed=2)
    runs = [fastdllm_dream_generate(dream_no_mask, p, FastDllmDreamConfig(gen_length=16, block_length=8, steps=8,
                                                                          cache="dual", alg=alg))
            for alg in ("maskgit_plus", "topk_margin", "entropy")]
    assert all(torch.equal(r.ids, runs[0].ids) and torch.equal(r.commit_step, runs[0].commit_step) for r in runs)
    x, cache = _opening(dream_no_mask, p, 8)
    with torch.no_grad():
        probs = cache.rows(x, 5, 13)[0, 1:].softmax(-1)                  # [7, V] positions 6..12 (shifted inside)
    neg_entropy = (probs * torch.log(probs + 1e-10)).sum(-1)
    k = dream_transfer_count(7.0, 1, torch.linspace(1, 1e-3, 5))
    by_entropy = sorted((6 + torch.topk(neg_entropy, k).indices).tolist())
    by_prob = sorted((6 + torch.topk(probs.max(-1).values, k).indices).tolist())
    assert runs[0].history[1][:, 1].tolist() == by_entropy != by_prob


def test_fastdllm_dream_threshold_is_uncapped(dream_no_mask):
    """alg='confidence_threshold' as published: a cached step commits every block mask whose probability
    reaches the threshold (plus the most confident), however many; steps only need to divide into blocks."""
    p = prompt(dream_no_mask.spec, B=1, P=5, seed=2)
    cfg = dict(gen_length=16, block_length=8, cache="dual")
    zero = fastdllm_dream_generate(dream_no_mask, p, FastDllmDreamConfig(steps=8, threshold=0.0, **cfg))
    assert zero.steps == 4 and [len(h) for h in zero.history] == [1, 7, 1, 7]
    strict = fastdllm_dream_generate(dream_no_mask, p, FastDllmDreamConfig(steps=8, threshold=1.0, **cfg))
    assert all(len(h) == 1 for h in strict.history) and strict.steps == 16   # only the forced one each step
    assert not (strict.ids == dream_no_mask.spec.mask_id).any()
    x, cache = _opening(dream_no_mask, p, 8)
    with torch.no_grad():
        conf = cache.rows(x, 5, 13)[0, 1:].softmax(-1).max(-1).values     # [7] positions 6..12
    thr = float(conf.sort(descending=True).values[3])                    # the 4 most confident pass
    mid = [fastdllm_dream_generate(dream_no_mask, p, FastDllmDreamConfig(steps=steps, threshold=thr, **cfg))
           for steps in (2, 16)]
    want = sorted((6 + (conf >= thr).nonzero().flatten()).tolist())
    schedule_count = dream_transfer_count(7.0, 1, torch.linspace(1, 1e-3, 5))
    assert mid[0].history[1][:, 1].tolist() == want and len(want) == 4 > schedule_count
    assert torch.equal(mid[0].ids, mid[1].ids) and mid[0].steps == mid[1].steps  # no schedule in this mode


def test_fastdllm_dream_draws_as_published(dream_no_mask):
    """At temperature > 0 the opening step draws one token per canvas row and keeps the block's first; the
    prefix threshold mode's cached steps draw for every mask of [start, N), later blocks included. (How far
    a draw extends shows in the tokens of later draws: it moves the generator on.)"""
    m, p, T = dream_no_mask, prompt(dream_no_mask.spec, B=1, P=5, seed=2), 1.0
    cfg = FastDllmDreamConfig(gen_length=16, block_length=8, steps=8, cache="prefix", threshold=0.0,
                              temperature=T, seed=9)
    r = fastdllm_dream_generate(m, p, cfg)
    assert [h[:, 1].tolist() for h in r.history] == [[5], list(range(6, 13)), [13], list(range(14, 21))]

    def by_hand(opening_all_rows: bool, cached_all_masks: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(9)
        x = torch.cat([p, torch.full((1, 16), m.spec.mask_id)], dim=1)
        cache = BlockCache(m)
        with torch.no_grad():
            for start in (5, 13):
                rows = slice(0, 21) if opening_all_rows else slice(start, start + 8)
                probs = (cache.full(x)[0, rows] / T).softmax(-1)
                x[0, start] = torch.multinomial(probs, 1, generator=gen)[start - rows.start, 0]
                probs = (cache.rows(x, start, 21)[0, 1:] / T).softmax(-1)   # positions start+1..20: all masks
                n = 20 - start if cached_all_masks else 7
                x[0, start + 1:start + 8] = torch.multinomial(probs[:n], 1, generator=gen)[:7, 0]
        return x

    assert torch.equal(r.ids, by_hand(True, True))
    assert not torch.equal(r.ids, by_hand(False, True)) and not torch.equal(r.ids, by_hand(True, False))


def test_fastdllm_dream_errors(dream):
    with pytest.raises(ConfigError, match="cache 'none' is unknown"):
        FastDllmDreamConfig(cache="none")
    with pytest.raises(ConfigError, match="at least 2 steps per block"):
        FastDllmDreamConfig(gen_length=16, block_length=8, steps=2)
    with pytest.raises(ConfigError, match="origin"):
        FastDllmDreamConfig(alg="origin")
    with pytest.raises(ConfigError, match="needs a DiffusionLM"):
        fastdllm_dream_generate(lambda ids: dream(ids), prompt(dream.spec, B=1), FastDllmDreamConfig(),
                                mask_id=dream.spec.mask_id)


# -- config and input errors --------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=0), "gen_length must be positive"),
    (dict(gen_length=10, block_length=4), "not a multiple of block_length 4"),
    (dict(gen_length=16, block_length=4, steps=6), "not a multiple of the number of blocks 4"),
    (dict(steps=0), "steps must be positive"),
    (dict(block_length=-2), "block_length must be positive"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(remasking="lowest"), "remasking 'lowest' is unknown"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
])
def test_llada_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        LladaConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(alg="greedy"), "alg 'greedy' is unknown"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1.0), "eps"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(alg_temp=-1.0), "alg_temp"),
    (dict(gen_length=12, block_length=5), "not a multiple of block_length"),
])
def test_dream_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        DreamConfig(**kw)


def test_configs_are_frozen_and_normalised():
    c = LladaConfig(gen_length=32, steps=32, remasking="random")
    assert c.remasking is Remasking.RANDOM and c.block_length == 32 and c.num_blocks == 1
    d = DreamConfig(gen_length=32, block_length=8, steps=8, alg="entropy")
    assert d.alg is DreamAlg.ENTROPY and d.steps_per_block == 2
    with pytest.raises(Exception):
        c.steps = 4   # frozen


def test_input_errors(llada, dream):
    p = prompt(llada.spec)
    with pytest.raises(ConfigError, match="needs a LladaConfig"):
        llada_generate(llada, p, DreamConfig())
    with pytest.raises(ConfigError, match="needs a DreamConfig"):
        dream_generate(dream, p, LladaConfig())
    with pytest.raises(ConfigError, match="LongTensor"):
        llada_generate(llada, p[0], LladaConfig(gen_length=4, steps=4))
    with pytest.raises(ConfigError, match="LongTensor"):
        llada_generate(llada, p.float(), LladaConfig(gen_length=4, steps=4))
    bad = p.clone()
    bad[0, 1] = llada.spec.mask_id
    with pytest.raises(ConfigError, match="mask id"):
        llada_generate(llada, bad, LladaConfig(gen_length=4, steps=4))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        dream_generate(dream, p + 1000, DreamConfig(gen_length=4, steps=4))
    with pytest.raises(ConfigError, match="mask_id is unknown"):
        llada_generate(lambda ids: llada(ids), p, LladaConfig(gen_length=4, steps=4))
    # a bare callable works with an explicit mask id
    r = llada_generate(lambda ids: llada(ids), p, LladaConfig(gen_length=4, steps=4), mask_id=llada.spec.mask_id)
    assert torch.equal(r.ids, llada_generate(llada, p, LladaConfig(gen_length=4, steps=4)).ids)

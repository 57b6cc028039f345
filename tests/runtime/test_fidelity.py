"""Public decoders in the fast loop: a seeded run equals the reference decoder token for token.

For APD (both modes), Dream's sampling (origin, alg_temp, top-p, top-k, temperature), LLaDA's top-p/top-k,
Fast-dLLM's Dream port and classifier-free guidance, on tiny LLaDA and Dream models (fp32, CPU), with the
torch and ONNX Runtime engines, where several tokens commit per step as well as one.
"""

from __future__ import annotations

import pytest
import torch

from dllm.errors import ConfigError
from dllm.runtime import reference as R
from dllm.runtime.config import DecodeConfig
from dllm.runtime.loop import decode
from dllm.runtime.methods import method_config


def _prompt(spec, P=7, seed=0):
    return torch.randint(6, spec.vocab_size, (1, P), generator=torch.Generator().manual_seed(seed))


def _assert_same(res, ref, mask_id=2):
    """Same canvas, same number of steps, every real token committed at the same step. (A reference step
    that draws the mask token itself "commits" it and the position stays masked; the fast loop leaves such
    a position out of the step, so only real tokens carry a commit step.) The tiny specs' mask id is 2."""
    assert torch.equal(res.canvas, ref.ids)
    assert res.steps == ref.steps
    P = ref.prompt_length
    real = (ref.ids[0, P:] != mask_id).tolist()
    want = [s if ok else None for s, ok in zip(ref.commit_step[0, P:].tolist(), real)]
    got = [s if ok else None for s, ok in zip(res.commit_step, real)]
    assert got == want


# -- APD: generate_pd, both modes ------------------------------------------------------------------
APD_CASES = [  # mode, tau0, beta, temperature, remasking, several tokens per step?
    ("global", 0.5, 0.02, 0.0, "low_confidence", True),
    ("per_token", 0.5, 0.02, 0.0, "low_confidence", True),
    ("global", 0.3, 0.01, 0.8, "low_confidence", True),
    ("per_token", 0.4, 0.02, 0.7, "random", True),
    ("global", 0.9, 0.15, 0.0, "low_confidence", False),
    ("per_token", 0.9, 0.15, 0.0, "low_confidence", False),
]


# prompts on which no reference step draws the mask token itself (random models do; a block's loop then
# outlasts block_length steps, which the fast loop does not follow, see docs/algorithms.md)
APD_PROMPTS = {"llada": (5, 3), "dream": (7, 0)}


def _apd(arch, model, engines, case, P=None, seed=None, **sampling):
    mode, tau0, beta, T, remasking, multi = case
    prompt = _prompt(model.spec, *((P, seed) if P is not None else APD_PROMPTS[arch]))
    ref = R.apd_generate(model, prompt, R.ApdConfig(gen_length=32, block_length=8, steps=32, mode=mode, tau0=tau0,
                                                    beta=beta, temperature=T, remasking=remasking, seed=3, **sampling))
    res = decode(engines, prompt, DecodeConfig(gen_length=32, block_length=8, commit="apd", apd_mode=mode, tau0=tau0,
                                               beta=beta, temperature=T, remasking=remasking, seed=3, **sampling))
    _assert_same(res, ref)
    if multi:
        assert max(res.tokens_per_step) > 1
    else:
        assert res.steps >= 30                                          # (nearly) one token per step
    return res


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("case", APD_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_apd_equals_generate_pd_torch(arch, case, tiny_models, torch_engines):
    _apd(arch, tiny_models[arch], torch_engines[arch], case)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("case", [APD_CASES[0], APD_CASES[3]], ids=lambda c: "-".join(map(str, c[:5])))
def test_apd_equals_generate_pd_onnxruntime(arch, case, tiny_models, ort_engines):
    _apd(arch, tiny_models[arch], ort_engines[arch], case)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_apd_with_top_p_top_k_equals_generate_pd(arch, tiny_models, torch_engines):
    _apd(arch, tiny_models[arch], torch_engines[arch], ("global", 0.3, 0.01, 0.9, "low_confidence", True),
         top_p=0.9, top_k=10)


def test_apd_global_threshold_carries_across_blocks(tiny_models, torch_engines):
    """Several blocks with several commits per step: the scalar threshold and the previous step's
    distributions carry over every block boundary (no reset), for several prompts."""
    for seed in range(4):
        res = _apd("llada", tiny_models["llada"], torch_engines["llada"], APD_CASES[0], P=6 + seed, seed=seed)
        assert sum(1 for s in res.commit_step if s >= 0) == 32


# -- Dream's sampling in the schedule ----------------------------------------------------------------
DREAM_CASES = [  # block_length, steps, sampling
    (32, 8, dict(alg="origin")),
    (16, 8, dict(alg="origin", temperature=0.7, top_p=0.9)),
    (16, 8, dict(alg_temp=0.5)),
    (32, 8, dict(alg="entropy", alg_temp=0.3, temperature=0.6)),
    (16, 8, dict(temperature=0.8, top_p=0.9)),
    (16, 16, dict(temperature=1.0, top_k=5, alg="topk_margin")),
    (32, 8, dict(top_k=3, alg="entropy")),                     # greedy, but top-k changes the ranking
    (8, 32, dict(temperature=0.5, top_k=50, top_p=0.95)),      # one token per step
]


def _dream(model, engines, case):
    bl, steps, kw = case
    prompt = _prompt(model.spec, 6, seed=steps)
    ref = R.dream_generate(model, prompt, R.DreamConfig(gen_length=32, block_length=bl, steps=steps, seed=5, **kw))
    res = decode(engines, prompt, DecodeConfig(gen_length=32, block_length=bl, steps=steps, seed=5, **kw))
    _assert_same(res, ref)


@pytest.mark.parametrize("case", DREAM_CASES, ids=lambda c: f"bl{c[0]}-s{c[1]}-" + "-".join(f"{k}{v}" for k, v in c[2].items()))
def test_dream_sampling_equals_dream_generate_torch(case, tiny_models, torch_engines):
    _dream(tiny_models["dream"], torch_engines["dream"], case)


@pytest.mark.parametrize("case", [DREAM_CASES[1], DREAM_CASES[3]], ids=["origin", "alg_temp"])
def test_dream_sampling_equals_dream_generate_onnxruntime(case, tiny_models, ort_engines):
    _dream(tiny_models["dream"], ort_engines["dream"], case)


def test_dream_top_k_matters_at_temperature_zero(tiny_models, torch_engines):
    """Dream ranks by the restricted distribution, so top_k (Dream's own code silently uses 50) changes a
    greedy run: the default here is off, and top_k=50 is how to replay Dream's default call."""
    prompt = _prompt(tiny_models["dream"].spec)
    runs = [decode(torch_engines["dream"], prompt, DecodeConfig(gen_length=32, block_length=32, steps=8,
                                                                alg="entropy", top_k=k)).commit_step
            for k in (None, 3)]
    assert runs[0] != runs[1]
    assert DecodeConfig().top_k is None and R.DreamConfig().top_k is None


# -- LLaDA's top-p / top-k -----------------------------------------------------------------------------
def _llada_sampling(model, engines, steps, kw):
    prompt = _prompt(model.spec)
    ref = R.llada_generate(model, prompt, R.LladaConfig(gen_length=32, block_length=8, steps=steps, seed=5, **kw))
    res = decode(engines, prompt, DecodeConfig(gen_length=32, block_length=8, steps=steps, seed=5, **kw))
    _assert_same(res, ref)
    assert max(res.tokens_per_step) == 32 // steps


@pytest.mark.parametrize("steps,kw", [(8, dict(temperature=0.9, top_k=3)),
                                      (8, dict(temperature=1.0, top_p=0.8, remasking="random")),
                                      (32, dict(temperature=0.7, top_p=0.9, top_k=10))],
                         ids=["top_k", "top_p-random", "both-one-per-step"])
def test_llada_top_p_top_k_equal_the_reference(steps, kw, tiny_models, torch_engines):
    _llada_sampling(tiny_models["llada"], torch_engines["llada"], steps, kw)


def test_llada_top_p_top_k_equal_the_reference_onnxruntime(tiny_models, ort_engines):
    _llada_sampling(tiny_models["llada"], ort_engines["llada"], 8, dict(temperature=0.8, top_p=0.9, top_k=20))


def test_top_k_one_is_greedy(tiny_models, torch_engines):
    prompt = _prompt(tiny_models["llada"].spec)
    greedy = decode(torch_engines["llada"], prompt, DecodeConfig(gen_length=16, block_length=8, steps=8))
    for commit in ("schedule", "threshold", "apd"):
        hot = decode(torch_engines["llada"], prompt, DecodeConfig(gen_length=16, block_length=8, steps=8, commit=commit,
                                                                  temperature=2.0, top_k=1, threshold=0.0, tau0=0.0))
        ref = decode(torch_engines["llada"], prompt, DecodeConfig(gen_length=16, block_length=8, steps=8, commit=commit,
                                                                  threshold=0.0, tau0=0.0))
        assert hot.ids == ref.ids
    assert greedy.ids == decode(torch_engines["llada"], prompt, DecodeConfig(gen_length=16, block_length=8, steps=8,
                                                                             temperature=3.0, top_k=1)).ids


# -- Fast-dLLM's Dream port --------------------------------------------------------------------------------
PORT_CASES = [  # cache, threshold (None = schedule), sampling
    ("dual", None, dict()),
    ("prefix", None, dict(steps=32)),                         # S = 8 steps for 8 positions: one per step
    ("prefix", None, dict(alg="topk_margin")),                # ranked by negative entropy all the same
    ("dual", None, dict(alg_temp=0.3, temperature=0.5)),
    ("prefix", None, dict(alg_temp=0.3, temperature=0.5)),    # alg_temp's draw over the fed rows [start, N)
    ("prefix", None, dict(temperature=0.7, top_p=0.9)),
    ("prefix", 0.9, dict()),
    ("dual", 0.9, dict()),
    ("prefix", 0.3, dict()),
    ("dual", 0.2, dict(temperature=0.6)),
    ("prefix", 0.3, dict(top_k=5, temperature=0.8)),          # draws over every mask of [start, N)
    ("prefix", 0.5, dict(temperature=0.7, steps=4)),          # threshold mode: steps only divide into blocks
]


def _port(model, engines, case, gen_length=32, block_length=8):
    cache, thr, kw = case
    kw = dict(kw)
    steps = kw.pop("steps", 16)
    prompt = _prompt(model.spec)
    ref = R.fastdllm_dream_generate(model, prompt, R.FastDllmDreamConfig(
        gen_length=gen_length, block_length=block_length, steps=steps, seed=5, cache=cache, threshold=thr, **kw))
    base = DecodeConfig(gen_length=gen_length, block_length=block_length, steps=steps, seed=5,
                        threshold=0.9 if thr is None else thr, **kw)
    name = f"fastdllm-dream-{cache}" + ("+threshold" if thr is not None else "")
    cfg = method_config(name, base)
    res = decode(engines, prompt, cfg)
    _assert_same(res, ref)
    assert res.tokens_per_step[0] <= 1                                  # the first step: the first position only
    return res


def _case_id(c):
    return f"{c[0]}-thr{c[1]}-" + "-".join(f"{k}{v}" for k, v in c[2].items())


@pytest.mark.parametrize("case", PORT_CASES, ids=_case_id)
def test_fastdllm_dream_port_equals_its_reference_torch(case, tiny_models, torch_engines):
    res = _port(tiny_models["dream"], torch_engines["dream"], case)
    steps = case[2].get("steps", 16)
    if case[1] is None:
        assert res.steps == steps                                         # S steps per block, the first included
    if steps != 32:
        assert max(res.tokens_per_step) > 1                               # steps == 32: 32 steps for 32 tokens


@pytest.mark.parametrize("case", [PORT_CASES[0], PORT_CASES[4], PORT_CASES[7], PORT_CASES[10]], ids=_case_id)
def test_fastdllm_dream_port_equals_its_reference_onnxruntime(case, tiny_models, ort_engines):
    res = _port(tiny_models["dream"], ort_engines["dream"], case)
    assert max(res.tokens_per_step) > 1


@pytest.mark.parametrize("case", [("dual", None, dict(steps=24)), ("prefix", None, dict(steps=12)),
                                  ("dual", 0.9, dict(steps=6)), ("prefix", 0.3, dict(temperature=0.8, steps=6))],
                         ids=_case_id)
def test_fastdllm_dream_port_blocks_of_one(case, tiny_models, torch_engines):
    """A block of one position is decided by its opening step; the port still runs one cached step (which
    commits nothing, but in prefix threshold mode at temperature > 0 draws for the later masks), then stops."""
    res = _port(tiny_models["dream"], torch_engines["dream"], case, gen_length=6, block_length=1)
    assert res.steps == 12 and res.tokens_per_step[1::2] == [0] * 6


@pytest.mark.parametrize("top", [dict(), dict(top_k=5), dict(top_p=0.8)], ids=["plain", "top_k", "top_p"])
def test_fastdllm_dream_opening_draw_stands_in_for_every_row(top, tiny_models):
    """The opening step draws one token per canvas row and keeps one. The policy draws over one real row and
    one-hot stand-ins for the others: on a tiny model's real logits, the same token as the draw over every
    real row, and the same generator state after (the draw's consumption does not depend on the values)."""
    from dllm.runtime.commit import FastDllmDreamSchedule
    from dllm.runtime.sampling import dream_probs
    from dllm.runtime.view import StepView

    model = tiny_models["dream"]
    P, G, V, T = 7, 24, model.spec.vocab_size, 1.5
    canvas = torch.cat([_prompt(model.spec), torch.full((1, G), model.spec.mask_id)], dim=1)
    with torch.no_grad():
        logits = model(canvas)                                             # [1, N, V]
    cfg = DecodeConfig(gen_length=G, block_length=8, steps=G, cache="prefix", fastdllm_dream=True, temperature=T,
                       **top)
    policy = FastDllmDreamSchedule(cfg, model.spec.mask_id, "dream")
    for seed, start in [(0, P), (1, P + 8), (2, P + 16), (3, P + 8)]:
        real = torch.Generator().manual_seed(seed)
        want = torch.multinomial(dream_probs(logits[0], T, cfg.top_p, cfg.top_k), 1, generator=real)[start, 0]
        ours = torch.Generator().manual_seed(seed)
        policy.reset(1, P, G, V, torch.device("cpu"), ours)
        view = StepView(prompt_len=P, canvas_len=P + G, step_in_block=0, start=start, end=start + 8, block_masks=8)
        transfer, x0 = policy.select(logits[:, start:start + 1], canvas[:, start:start + 1], view)
        assert x0[0, 0] == want and transfer[0, 0] == (want != model.spec.mask_id)
        assert torch.equal(ours.get_state(), real.get_state())


def test_fastdllm_dream_port_differs_from_our_defaults(tiny_models, torch_engines):
    prompt = _prompt(tiny_models["dream"].spec)
    base = DecodeConfig(gen_length=32, block_length=8, steps=16)
    port = decode(torch_engines["dream"], prompt, method_config("fastdllm-dream-dual", base))
    ours = decode(torch_engines["dream"], prompt, method_config("dual", base))
    assert port.commit_step != ours.commit_step
    assert port.commit_step[0] == 0 and port.tokens_per_step[0] == 1
    assert method_config("dual", base).fastdllm_dream is False


def test_fastdllm_dream_port_errors(torch_engines):
    with pytest.raises(ConfigError, match="--cache prefix or --cache dual"):
        DecodeConfig(fastdllm_dream=True)
    with pytest.raises(ConfigError, match="at least 2 steps per block"):
        DecodeConfig(cache="dual", fastdllm_dream=True, gen_length=32, block_length=8, steps=4)
    with pytest.raises(ConfigError, match="needs a Dream model"):
        decode(torch_engines["llada"], [6, 7, 8], DecodeConfig(cache="dual", fastdllm_dream=True, gen_length=16,
                                                               block_length=8, steps=8))


# -- classifier-free guidance -----------------------------------------------------------------------------
@pytest.mark.parametrize("steps,kw", [(16, dict(cfg_scale=1.5)),
                                      (16, dict(cfg_scale=1.0, temperature=0.5, remasking="random")),
                                      (32, dict(cfg_scale=0.5, temperature=0.8, top_k=5))],
                         ids=["greedy", "sampled", "one-per-step"])
def test_guidance_equals_the_reference_torch(steps, kw, tiny_models, torch_engines):
    prompt = _prompt(tiny_models["llada"].spec)
    ref = R.llada_generate(tiny_models["llada"], prompt, R.LladaConfig(gen_length=32, block_length=8, steps=steps,
                                                                         seed=5, **kw))
    res = decode(torch_engines["llada"], prompt, DecodeConfig(gen_length=32, block_length=8, steps=steps, seed=5,
                                                              **kw))
    _assert_same(res, ref)
    assert res.nfe == steps and max(res.tokens_per_step) == 32 // steps
    assert res.rows_per_step[0] == [2 * (7 + 32)] * 2                    # both canvases, every row


def test_guidance_equals_the_reference_onnxruntime(tiny_models, ort_engines):
    prompt = _prompt(tiny_models["llada"].spec)
    ref = R.llada_generate(tiny_models["llada"], prompt, R.LladaConfig(gen_length=16, block_length=8, steps=8,
                                                                         cfg_scale=2.0))
    res = decode(ort_engines["llada"], prompt, DecodeConfig(gen_length=16, block_length=8, steps=8, cfg_scale=2.0))
    _assert_same(res, ref)


@pytest.mark.parametrize("method", ["prefix", "dual", "dllm-cache", "dcu", "dcu-reference", "dual+threshold",
                                    "dcu+apd"])
def test_guidance_with_every_cache_method(method, torch_engines):
    """Each canvas keeps its own caches: the guided run recomputes twice the rows of the plain one, and
    changes what gets decoded."""
    base = DecodeConfig(gen_length=32, block_length=8, steps=32, budget=4, window=4, prompt_interval=3, gen_interval=5)
    plain = decode(torch_engines["llada"], list(range(6, 16)), method_config(method, base))
    guided = decode(torch_engines["llada"], list(range(6, 16)), method_config(method, base.replace(cfg_scale=2.0)))
    assert torch_engines["llada"].spec.mask_id not in guided.ids
    assert sum(guided.tokens_per_step) == 32
    if method_config(method, base).commit.value == "schedule":
        assert guided.rows_per_step == [[2 * r for r in rows] for rows in plain.rows_per_step]
    assert guided.ids != plain.ids


def test_guidance_with_scale_zero_is_plain(torch_engines):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8)
    assert decode(torch_engines["llada"], [6, 7], cfg).ids == decode(torch_engines["llada"], [6, 7],
                                                                     cfg.replace(cfg_scale=0.0)).ids

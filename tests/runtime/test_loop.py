"""The decode loop: `full`+`schedule` equals the reference decoders token for token (torch and ONNX
Runtime backends); every method decodes every position with its commit policy's guarantees."""

import pytest
import torch

from dllm.errors import ConfigError
from dllm.runtime import reference as R
from dllm.runtime.config import DecodeConfig
from dllm.runtime.loop import decode
from dllm.runtime.methods import method_config

# (prompt length, gen length, block length, steps, temperature, remasking / alg)
CASES = [
    (1, 16, 16, 16, 0.0, None),
    (5, 32, 8, 16, 0.0, None),
    (13, 24, 24, 12, 0.0, None),
    (7, 32, 16, 32, 0.8, "random"),
    (9, 16, 4, 8, 0.5, None),
    (20, 32, 8, 64, 0.0, None),          # more steps than tokens: zero-commit steps still run
]


def _reference(arch, model, prompt, G, bl, steps, T, extra):
    if arch == "llada":
        cfg = R.LladaConfig(gen_length=G, block_length=bl, steps=steps, temperature=T, seed=4,
                            remasking=extra or "low_confidence")
        return R.llada_generate(model, prompt, cfg)
    alg = {"random": "topk_margin"}.get(extra, "maskgit_plus")
    return R.dream_generate(model, prompt, R.DreamConfig(gen_length=G, block_length=bl, steps=steps,
                                                         temperature=T, seed=4, alg=alg))


def _config(arch, G, bl, steps, T, extra):
    kw = dict(gen_length=G, block_length=bl, steps=steps, temperature=T, seed=4)
    if extra == "random":
        kw["remasking" if arch == "llada" else "alg"] = "random" if arch == "llada" else "topk_margin"
    return DecodeConfig(**kw)


def _check_parity(arch, model, engines, case):
    P, G, bl, steps, T, extra = case
    prompt = torch.randint(6, model.spec.vocab_size, (1, P), generator=torch.Generator().manual_seed(P))
    ref = _reference(arch, model, prompt, G, bl, steps, T, extra)
    res = decode(engines, prompt, _config(arch, G, bl, steps, T, extra))
    assert res.ids == ref.gen_ids[0].tolist()
    assert torch.equal(res.canvas, ref.ids)
    assert res.steps == res.nfe == ref.steps == steps
    assert res.commit_step == ref.commit_step[0, P:].tolist()


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "P{}-G{}-bl{}-s{}-T{}-{}".format(*c))
def test_full_schedule_equals_the_reference_torch(arch, case, tiny_models, torch_engines):
    _check_parity(arch, tiny_models[arch], torch_engines[arch], case)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "P{}-G{}-bl{}-s{}-T{}-{}".format(*c))
def test_full_schedule_equals_the_reference_onnxruntime(arch, case, tiny_models, ort_engines):
    _check_parity(arch, tiny_models[arch], ort_engines[arch], case)


METHODS = ["prefix", "dual", "dllm-cache", "dcu", "dcu-reference", "full+threshold", "dual+threshold",
           "full+factor", "dcu+factor", "full+apd", "dcu+apd", "prefix+apd"]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_decodes_every_position(arch, method, torch_engines):
    base = DecodeConfig(gen_length=32, block_length=8, steps=32, budget=4, window=4, prompt_interval=3,
                        gen_interval=5)
    cfg = method_config(method, base)
    if "apd" in method and arch == "dream":
        cfg = cfg.replace(apd_mode="global")
    res = decode(torch_engines[arch], list(range(6, 16)), cfg)
    spec = torch_engines[arch].spec
    assert spec.mask_id not in res.ids and len(res.ids) == 32
    assert sum(res.tokens_per_step) == 32 and res.nfe == res.steps == len(res.tokens_per_step)
    assert all(-1 < s < res.steps for s in res.commit_step)
    if cfg.commit.value == "schedule":
        assert res.steps == 32
    else:
        assert min(res.tokens_per_step) >= 1                          # at least one token per step
        per_block = [sum(1 for s in res.commit_step[b * 8:(b + 1) * 8]) for b in range(4)]
        assert per_block == [8] * 4 and res.steps <= 32               # at most block_length steps per block
    assert len(res.rows_per_step[0]) == spec.n_layers and res.rows_per_step[0] == [42, 42]   # step 1 is full


def test_dual_and_prefix_rows_after_the_first_step_of_a_block(torch_engines):
    base = DecodeConfig(gen_length=32, block_length=8, steps=8)
    P = 10
    dual = decode(torch_engines["llada"], list(range(6, 6 + P)), method_config("dual", base))
    prefix = decode(torch_engines["llada"], list(range(6, 6 + P)), method_config("prefix", base))
    for b in range(4):
        first, second = 2 * b, 2 * b + 1                              # 2 steps per block
        assert dual.rows_per_step[first] == [P + 32] * 2
        assert dual.rows_per_step[second] == [8] * 2
        assert prefix.rows_per_step[second] == [32 - 8 * b] * 2


def test_dcu_window_follows_the_last_committed_token(torch_engines):
    from dllm.runtime import cache_policy

    seen = []
    orig = cache_policy.DcuPolicy.prepare_step

    def spy(self):
        orig(self)
        seen.append((self.view.key_pos, self.window.tolist()))

    cache_policy.DcuPolicy.prepare_step = spy
    try:
        res = decode(torch_engines["llada"], list(range(6, 14)),
                     DecodeConfig(gen_length=32, block_length=8, steps=32, cache="dcu", window=4))
    finally:
        cache_policy.DcuPolicy.prepare_step = orig
    P = 8
    assert seen[0][0] == P - 1 and seen[0][1] == [0, 1, 2, 3, 4]
    pos_by_step = {s: P + i for i, s in enumerate(res.commit_step)}
    for t in range(1, res.steps):
        key = pos_by_step[t - 1]                                      # one token per step: the previous one
        assert seen[t][0] == key
        c = key - P
        start = max(0, min(c - 2, 32 - 5))
        assert seen[t][1] == list(range(start, start + 5))


def test_bad_inputs(torch_engines):
    engines = torch_engines["llada"]
    cfg = DecodeConfig(gen_length=32, block_length=8, steps=32)
    with pytest.raises(ConfigError, match="max_seq_len"):
        decode(engines, list(range(6, 106)), cfg)                     # 100 + 32 > 128
    with pytest.raises(ConfigError, match="empty"):
        decode(engines, [], cfg)
    with pytest.raises(ConfigError, match="mask id"):
        decode(engines, [6, engines.spec.mask_id], cfg)
    with pytest.raises(ConfigError, match="one sequence"):
        decode(engines, torch.ones(2, 3, dtype=torch.long), cfg)
    with pytest.raises(ConfigError, match="DecodeConfig"):
        decode(engines, [6, 7], {"gen_length": 32})
    with pytest.raises(ConfigError, match="block-length"):
        DecodeConfig(gen_length=30, block_length=8)
    with pytest.raises(ConfigError, match="budget"):
        DecodeConfig(budget=-1)
    with pytest.raises(ConfigError, match="unknown"):
        DecodeConfig.from_dict({"gen_lenght": 3})
    with pytest.raises(ConfigError, match="cache"):
        method_config("foo+apd")

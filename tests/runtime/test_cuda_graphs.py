"""CUDA graphs and fused kernels on the GPU: replaying captured steps gives exactly the eager tokens, and
the Triton path decodes what the plain path decodes."""

import pytest
import torch

from dllm.engines.engine_set import torch_engine_set
from dllm.exporter.models import DiffusionLM, tiny_spec
from dllm.exporter.models.writer import init_weights
from dllm.runtime import DecodeConfig, decode, method_config
from dllm.runtime.executor import Executor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = ["full", "dcu", "dcu-reference", "dcu+apd", "dual+threshold", "dllm-cache", "prefix", "full+apd",
           "dcu@proportional"]


def _cfg(method):
    name, _, variant = method.partition("@")
    base = DecodeConfig(gen_length=32, block_length=8, steps=32, budget=4, window=4, tau0=0.5, beta=0.02,
                        threshold=0.5, allocation=variant or "uniform")
    return method_config(name, base)


def _model(arch):
    return init_weights(DiffusionLM(tiny_spec(arch, n_layers=3)), seed=3, std=0.5).cuda()


@pytest.mark.parametrize("kernels", ["triton", "plain"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", METHODS)
def test_graph_replay_equals_eager(arch, method, kernels):
    model = _model(arch)
    eager = torch_engine_set(model, "fp32", "cuda", kernels=kernels)
    graphed = torch_engine_set(model, "fp32", "cuda", cuda_graphs=True, kernels=kernels)
    cfg = _cfg(method)
    prompt = torch.randint(10, 90, (1, 11), generator=torch.Generator().manual_seed(0))
    ex = Executor(graphed)
    # eager with the graphed executor's bucketed row counts: this compares replay with eager, not row counts
    # (a product of more rows may round a row differently; tests/runtime/test_graph_keys.py checks buckets)
    eager_ex = Executor(eager)
    eager_ex.row_buckets = True
    want = decode(eager, prompt, cfg, executor=eager_ex)
    for _ in range(3):                       # later calls replay the graphs of the first
        got = decode(graphed, prompt, cfg, executor=ex)
        assert got.ids == want.ids
        assert got.rows_per_step == want.rows_per_step
    assert ex.graphs_captured > 0
    if method != "dcu@proportional":
        assert len(ex.step_graphs) > 0      # whole steps, not only layers


@pytest.mark.parametrize("method", ["dcu@proportional", "dcu+apd@proportional"])
def test_one_bucket_per_step_replays_what_eager_decodes(method):
    """step_bucket_slack inf: every DCU layer of a step runs the step's largest bucket, so proportional steps
    replay as whole-step graphs, and give the tokens and rows of eager decoding at the same row counts."""
    model = _model("llada")
    eager = torch_engine_set(model, "fp32", "cuda", kernels="triton")
    graphed = torch_engine_set(model, "fp32", "cuda", cuda_graphs=True, kernels="triton")
    graphed.step_bucket_slack = float("inf")
    cfg = _cfg(method)
    prompt = torch.randint(10, 90, (1, 11), generator=torch.Generator().manual_seed(4))
    eager_ex = Executor(eager)
    eager_ex.row_buckets, eager_ex.step_bucket_slack = True, float("inf")
    want = decode(eager, prompt, cfg, executor=eager_ex)
    ex = Executor(graphed)
    for _ in range(3):
        got = decode(graphed, prompt, cfg, executor=ex)
        assert got.ids == want.ids and got.rows_per_step == want.rows_per_step
    assert len(ex.step_graphs) > 0


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["full", "dual+threshold", "full+apd", "prefix"])
def test_triton_path_decodes_what_the_plain_path_decodes(arch, method):
    model = _model(arch)
    plain = torch_engine_set(model, "fp32", "cuda", kernels="plain")
    fused = torch_engine_set(model, "fp32", "cuda", kernels="triton", cuda_graphs=True)
    cfg = _cfg(method)
    prompt = torch.randint(10, 90, (1, 13), generator=torch.Generator().manual_seed(1))
    want, got = decode(plain, prompt, cfg), decode(fused, prompt, cfg)
    assert got.ids == want.ids and got.rows_per_step == want.rows_per_step


def _recording(executor, cfg, rows_log, replay: bool):
    """Make the executor's cache policy for ``cfg`` record the rows it picks, or replay recorded ones."""
    policy = executor.cache_policy(cfg, executor.spec)
    own = policy.rows
    replayed = iter(rows_log)

    def rows(layer, scores):
        picked = own(layer, scores)              # the policy's own device work runs either way
        if replay:
            return next(replayed)
        rows_log.append(None if picked is None else picked.clone())
        return picked

    policy.rows = rows


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["dcu", "dcu+apd", "dcu-reference", "dllm-cache", "dcu+apd@split-kv"])
def test_triton_path_given_the_same_rows_decodes_what_the_plain_path_decodes(arch, method):
    """Change scores drive a top-k, so a last-bit difference between two float reduction orders (Triton's
    and torch's cosine, RMSNorm, joined products) can pick another row at a near-tie and the answers
    part from there. So: the rows the plain path picks are handed to the Triton path, which then must
    decode the same tokens; the scores themselves are compared against their twin in tests/kernels; and
    on its own choice the Triton path recomputes the same number of rows every step."""
    model = _model(arch)
    method, _, attention = method.partition("@")
    cfg = _cfg(method)
    prompt = torch.randint(10, 90, (1, 13), generator=torch.Generator().manual_seed(1))
    plain, fused = (Executor(torch_engine_set(model, "fp32", "cuda", kernels=k)) for k in ("plain", "triton"))
    own_engines = torch_engine_set(model, "fp32", "cuda", kernels="triton", cuda_graphs=True)
    fused.engines.ops.split_kv = own_engines.ops.split_kv = attention == "split-kv"
    rows_log: list = []
    _recording(plain, cfg, rows_log, replay=False)
    _recording(fused, cfg, rows_log, replay=True)
    want = decode(plain.engines, prompt, cfg, executor=plain)
    got = decode(fused.engines, prompt, cfg, executor=fused)
    assert got.ids == want.ids and got.rows_per_step == want.rows_per_step
    own = decode(own_engines, prompt, cfg)
    assert own.rows_per_step == want.rows_per_step and sum(own.tokens_per_step) == cfg.gen_length


@pytest.mark.parametrize("method", ["full", "dcu+apd"])
def test_bf16_fused_decodes_every_position(method):
    model = _model("llada").to(torch.bfloat16)
    fused = torch_engine_set(model, "bf16", "cuda", kernels="triton", cuda_graphs=True)
    res = decode(fused, torch.randint(10, 90, (1, 9)), _cfg(method))
    # a random model may predict the mask id itself, so count commits rather than look for masks
    assert sum(res.tokens_per_step) == 32 and all(s >= 0 for s in res.commit_step)


def test_graphs_need_torch_cuda():
    model = DiffusionLM(tiny_spec("llada"))
    es = torch_engine_set(model, "fp32", "cpu", cuda_graphs=True)
    assert es.cuda_graphs is False          # silently eager on CPU: graphs are a CUDA feature


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["full", "dual+threshold", "dllm-cache", "dcu", "dcu+apd", "dcu+apd@split-kv",
                                    "dcu@proportional"])
def test_batch_with_graphs_and_triton_equals_solo(arch, method):
    """A batch of prompts of different lengths, captured and replayed, gives every sequence exactly the tokens
    and rows it gets alone (same kernels, eager, one sequence at a time): batched commits and, with
    proportional budgets, each sequence's own k included."""
    from dllm.runtime.loop import decode_batch

    model = _model(arch)
    eager = torch_engine_set(model, "fp32", "cuda", kernels="triton")
    fused = torch_engine_set(model, "fp32", "cuda", kernels="triton", cuda_graphs=True)
    name, _, variant = method.partition("@")
    eager.ops.split_kv = fused.ops.split_kv = variant == "split-kv"
    cfg = _cfg(method if variant == "proportional" else name)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 90, (n,), generator=g).tolist() for n in (5, 13, 9, 2)]
    solo = [decode(eager, p, cfg) for p in prompts]
    ex = Executor(fused)
    for _ in range(2):                       # the second pass replays the first's graphs
        got = decode_batch(fused, prompts, cfg, executor=ex, batch_size=3)
        for i, (a, b) in enumerate(zip(solo, got)):
            assert b.ids == a.ids, f"prompt {i}"
            assert b.rows_per_step == a.rows_per_step, f"prompt {i}"
    assert ex.graphs_captured > 0


@pytest.mark.parametrize("method", ["dcu", "dcu+apd"])
def test_batched_whole_steps_replay_across_block_positions(method):
    """Prompts of one length commit together, so a whole-step graph serves the batch wherever its sequences
    are (the head's and the commit's rows come from device tables): replayed across blocks, every sequence
    still gets exactly its tokens alone."""
    from dllm.runtime.loop import decode_batch

    model = _model("llada")
    eager = torch_engine_set(model, "fp32", "cuda", kernels="triton")
    fused = torch_engine_set(model, "fp32", "cuda", kernels="triton", cuda_graphs=True)
    cfg = _cfg(method)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(10, 90, (7,), generator=g).tolist() for _ in range(3)]
    solo = [decode(eager, p, cfg) for p in prompts]
    ex = Executor(fused)
    got = decode_batch(fused, prompts, cfg, executor=ex, batch_size=2)
    for i, (a, b) in enumerate(zip(solo, got)):
        assert b.ids == a.ids and b.rows_per_step == a.rows_per_step, f"prompt {i}"
    assert len(ex.step_graphs) > 0


@pytest.mark.parametrize("method", ["dcu", "dcu+apd"])
def test_arrivals_of_mixed_lengths_with_a_small_graph_cache_equal_solo(method):
    """What a server with --cuda-graphs does: prompts of different lengths join a running batch one at a time
    (each arrival a new mix of canvas lengths, hence new keys), and a cache of 4 graphs drops and captures
    again all the time; every sequence still gets exactly its tokens alone, eagerly. (Not with proportional
    budgets: there, on the CPU, these prompts already differ eagerly, because a matrix product's row can
    round differently with the number of rows in the product; see docs/benchmarks.md.)"""
    from tests.runtime.test_batch import _arriving

    model = _model("llada")
    eager = torch_engine_set(model, "fp32", "cuda", kernels="triton")
    fused = torch_engine_set(model, "fp32", "cuda", kernels="triton", cuda_graphs=True)
    cfg = _cfg(method)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(10, 90, (1, n), generator=g) for n in (5, 12, 3, 9, 7, 5)]
    solo = [decode(eager, p, cfg) for p in prompts]
    ex = Executor(fused)
    ex.step_graphs.max_graphs = ex.layer_graphs.max_graphs = 4
    for _ in range(2):
        got = _arriving(fused, cfg, prompts, 3, 12 + cfg.gen_length, 5, ex)
        for i, (want, b) in enumerate(zip(solo, got)):
            assert b.ids == want.ids and b.rows_per_step == want.rows_per_step, f"prompt {i}"
    assert ex.layer_graphs.dropped > 0

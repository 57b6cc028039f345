"""CUDA graphs in the executor: replaying captured layer graphs gives exactly the eager tokens."""

import pytest
import torch

from dllm.engines.engine_set import torch_engine_set
from dllm.exporter.models import DiffusionLM, tiny_spec
from dllm.exporter.models.writer import init_weights
from dllm.runtime import DecodeConfig, decode, method_config
from dllm.runtime.executor import Executor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["full", "dcu", "dcu-reference", "dcu+apd", "dual+threshold", "dllm-cache",
                                    "prefix"])
def test_graph_replay_equals_eager(arch, method):
    model = init_weights(DiffusionLM(tiny_spec(arch, n_layers=3)), seed=3, std=0.5).cuda()
    eager = torch_engine_set(model, "fp32", "cuda")
    graphed = torch_engine_set(model, "fp32", "cuda", cuda_graphs=True)
    cfg = method_config(method, DecodeConfig(gen_length=32, block_length=8, steps=32, budget=4, window=4,
                                             allocation="uniform"))
    prompt = torch.randint(10, 90, (1, 11), generator=torch.Generator().manual_seed(0))
    ex = Executor(graphed)
    want = decode(eager, prompt, cfg)
    for _ in range(2):                       # the second call reuses the graphs of the first
        got = decode(graphed, prompt, cfg, executor=ex)
        assert got.ids == want.ids
        assert got.rows_per_step == want.rows_per_step
    assert ex.graphs_captured > 0


def test_graphs_need_torch_cuda():
    model = DiffusionLM(tiny_spec("llada"))
    es = torch_engine_set(model, "fp32", "cpu", cuda_graphs=True)
    assert es.cuda_graphs is False          # silently eager on CPU: graphs are a CUDA feature

"""Host time of a CUDA-graph decode step, measured on the CPU: the Python a GPU waits through per step.

    python3 scripts/host-overhead.py [--layers 32] [--methods full,dual+threshold,dcu,dcu+apd] [--batch 1]
                                     [--json F]

(methods as dllm-bench names them, overrides included: ``dcu@allocation=proportional``)

With CUDA graphs a step's device work is one replay, and what is left between two replays is host work:
the policies' bookkeeping, the graph keys, reading back the committed positions, the loop. This script
runs the executor's graph path on the CPU with "graphs" that record nothing: a replay returns what the
step returned when it ran eagerly and runs no kernel. So every replayed step costs exactly its host work.
The tokens are meaningless (no layer runs after capture); the timing is what the GPU's idle gap between
steps is made of, apart from the readback's own latency and the graph launch. A tiny model (d_model 32)
with the real layer count keeps the eager steps short; a replayed step does not depend on the width.
``--batch B`` runs B prompts at once through ``BatchDecoder`` (host work per batched step).

Methods whose host decisions depend on device values (DCU's proportional and softmax budgets come from the
layers' change scores) do not follow a GPU run here: a replay that runs nothing leaves the scores as the
last eager step wrote them, so the budgets, the step keys and the replayed fraction are this script's
own. Read their rows as the host work of the steps they happen to take, not as a GPU's replay rate
(scripts/graph-keys.py measures that, with real change scores).
"""

import argparse
import json
import statistics
import time

import torch

from dllm.engines.engine_set import torch_engine_set
from dllm.exporter.models.writer import tiny_spec
from dllm.runtime import BatchDecoder, DecodeConfig, decode
from dllm.runtime.executor import Executor
from dllm.runtime.graphs import GraphCache
from dllm.tools.bench import parse_method, split_methods
from dllm.tools.random_model import random_model


class HostOnlyGraphs(GraphCache):
    """A GraphCache whose graphs run nothing: ``capture`` keeps the unit's payload, ``replay`` returns it."""

    def __init__(self):
        super().__init__()
        self.replays = 0

    def capture(self, key, unit):
        self._graphs[key] = (None, unit())

    def replay(self, key):
        hit = self._graphs.get(key)
        if hit is None:
            return False, None
        self.replays += 1
        return True, hit[1]


def host_executor(engines) -> Executor:
    ex = Executor(engines)
    ex.cuda_graphs = True                # the graph path's host logic; HostOnlyGraphs never touch CUDA
    ex.row_buckets = True                # and its bucketed row counts, as with graphs on a GPU
    ex.step_graphs, ex.layer_graphs = HostOnlyGraphs(), HostOnlyGraphs()
    return ex


def timed_decode(engines, ex, prompt, cfg, batch: int) -> tuple[float, int]:
    """(seconds, steps) of one decode of ``prompt``; with batch > 1, of ``batch`` copies of it at once."""
    t0 = time.perf_counter()
    if batch == 1:
        steps = len(decode(engines, prompt, cfg, executor=ex).rows_per_step)
        return time.perf_counter() - t0, steps
    run = BatchDecoder(engines, cfg, batch, prompt.shape[1] + cfg.gen_length, executor=ex)
    for _ in range(batch):
        run.submit(prompt)
    steps = 0
    while run.step():
        steps += 1
    return time.perf_counter() - t0, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", default="full,dual+threshold,dcu,dcu+apd")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded at once (BatchDecoder when > 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed decodes per method (median reported)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    torch.set_num_threads(1)
    spec = tiny_spec("llada", n_layers=a.layers, d_model=32, n_heads=2)
    engines = torch_engine_set(random_model(spec, torch.float32, "cpu"), "fp32", kernels="torch")
    base = DecodeConfig(gen_length=a.gen_length, block_length=a.block_length, steps=a.gen_length, budget=32,
                        window=32, allocation="uniform")
    prompt = torch.randint(6, 90, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    results = {}
    width = max(len(m) for m in split_methods(a.methods))
    print(f"{'method':>{width}} | host us/step | replayed steps")
    for method in split_methods(a.methods):
        cfg = parse_method(method, base)
        ex = host_executor(engines)
        for _ in range(2):                       # eager, then captured: every step key seen twice
            timed_decode(engines, ex, prompt, cfg, a.batch)
        times, replayed = [], []
        for _ in range(a.repeat):
            before = ex.step_graphs.replays
            seconds, steps = timed_decode(engines, ex, prompt, cfg, a.batch)
            times.append(seconds / steps * 1e6)
            replayed.append((ex.step_graphs.replays - before) / steps)
        us = statistics.median(times)
        results[method] = {"host_us_per_step": round(us, 1), "replayed_fraction": min(replayed), "steps": steps}
        print(f"{method:>{width}} | {us:12.1f} | {min(replayed):.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layers": a.layers, "prompt": a.prompt, "gen_length": a.gen_length,
                       "block_length": a.block_length, "batch": a.batch, "methods": results}, f, indent=1)


if __name__ == "__main__":
    main()

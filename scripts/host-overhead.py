"""Host time of a CUDA-graph decode step, measured on the CPU: the Python a GPU waits through per step.

    python3 scripts/host-overhead.py [--layers 32] [--methods full,dual+threshold,dcu,dcu+apd] [--json F]

(methods as dllm-bench names them, overrides included: ``dcu@allocation=proportional``)

With CUDA graphs a step's device work is one replay, and what is left between two replays is host work:
the policies' bookkeeping, the graph keys, reading back the committed positions, the loop. This script
runs the executor's graph path on the CPU with "graphs" that record nothing: a replay returns what the
step returned when it ran eagerly and runs no kernel. So every replayed step costs exactly its host work.
The tokens are meaningless (no layer runs after capture); the timing is what the GPU's idle gap between
steps is made of, apart from the readback's own latency and the graph launch. A tiny model (d_model 32)
with the real layer count keeps the eager steps short; a replayed step does not depend on the width.
"""

import argparse
import json
import statistics
import time

import torch

from dllm.engines.engine_set import torch_engine_set
from dllm.exporter.models.writer import tiny_spec
from dllm.runtime import DecodeConfig, decode
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
    ex.step_graphs, ex.layer_graphs = HostOnlyGraphs(), HostOnlyGraphs()
    return ex


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", default="full,dual+threshold,dcu,dcu+apd")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
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
            decode(engines, prompt, cfg, executor=ex)
        times, replayed = [], []
        for _ in range(a.repeat):
            before = ex.step_graphs.replays
            t0 = time.perf_counter()
            res = decode(engines, prompt, cfg, executor=ex)
            times.append((time.perf_counter() - t0) / len(res.rows_per_step) * 1e6)
            replayed.append((ex.step_graphs.replays - before) / len(res.rows_per_step))
        us = statistics.median(times)
        results[method] = {"host_us_per_step": round(us, 1), "replayed_fraction": min(replayed),
                           "steps": len(res.rows_per_step)}
        print(f"{method:>{width}} | {us:12.1f} | {min(replayed):.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layers": a.layers, "prompt": a.prompt, "gen_length": a.gen_length,
                       "block_length": a.block_length, "methods": results}, f, indent=1)


if __name__ == "__main__":
    main()

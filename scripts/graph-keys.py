"""How often CUDA graphs would replay, measured on the CPU: graph keys over several different prompts.

    python3 scripts/graph-keys.py [--layers 32] [--methods dcu,dcu@allocation=softmax,dcu+apd]
                                  [--prompts 4] [--batch 1] [--arrive-every S] [--prompt-len-max M]
                                  [--rows exact,bucketed,one-bucket] [--json F]

(methods as dllm-bench names them, overrides included.) With CUDA graphs the executor replays a whole step
when its key has been seen twice, else single layers (runtime/executor.py). DCU's proportional and
softmax budgets come from the layers' change scores, so they move from step to step, and a key that holds
them rarely repeats. This script decodes every prompt eagerly through one executor (real change scores,
so real budgets) and counts, for each step and each layer unit, whether its key had been seen twice
before: the fraction a GPU would replay once the graphs of earlier prompts exist. Each method runs three
times: with exact row counts, with the bucketed row counts the executor uses with graphs (``row_buckets``),
and with one bucket for every layer of a step (``step_bucket_slack`` inf, ``dllm-bench --step-bucket-slack
inf``); it reports the rows the buckets add (the padding repeats a sequence's last row: more rows, same
tokens).
A random-weight model of the real layer count and a narrow width keeps it quick.

With ``--batch B`` the prompts share B slots. By default they are all submitted at once; ``--arrive-every S``
submits one every S steps instead, as requests reach a server, and ``--prompt-len-max M`` draws each
prompt's length from [--prompt-len, M]. A slot's canvas length is part of a step's and a layer's key, so
each new mix of lengths starts new keys.
"""

import argparse
import collections
import json

import torch

from dllm.engines.engine_set import EngineSet, torch_engine_set
from dllm.exporter.models.writer import tiny_spec
from dllm.runtime import DecodeConfig, decode
from dllm.runtime.loop import BatchDecoder, batch_canvas_length, decode_batch
from dllm.runtime.executor import Executor
from dllm.runtime.graphs import GraphCache
from dllm.tools.bench import parse_method, split_methods
from dllm.tools.random_model import random_model


class KeyCounter(GraphCache):
    """A GraphCache that never captures: it counts the keys asked for and how many had been seen twice since
    the executor last dropped its graphs (``clear``: a new canvas shape or prompt length)."""

    def __init__(self):
        super().__init__()
        self.keys: set = set()
        self.live: collections.Counter = collections.Counter()
        self.asked = self.would_replay = 0

    def replay(self, key):
        self.asked += 1
        self.would_replay += self.live[key] >= self.capture_after
        self.live[key] += 1
        self.keys.add(key)
        return False, None

    def clear(self):
        super().clear()
        self.live.clear()

    def seen(self, key):
        return False


class RowCounter:
    """Wraps the ops' batched row selection: rows run against rows each sequence asked for."""

    def __init__(self, ops):
        self.select = ops.select_rows_batched
        self.run = self.asked = 0

    def __call__(self, d, win_start, w, k, gen_start, k_slot=None):
        rows = self.select(d, win_start, w, k, gen_start, k_slot)
        own = [rows.shape[1]] * rows.shape[0] if k_slot is None else \
            [w + min(int(x), rows.shape[1] - w) for x in k_slot.tolist()]
        self.run += rows.numel()
        self.asked += sum(own)
        return rows


def staggered(engines, cfg, prompts, batch: int, every: int, ex: Executor) -> None:
    """The prompts through ``batch`` slots, one submitted every ``every`` steps (a server's arrivals)."""
    lens = [len(p) for p in prompts]
    N = batch_canvas_length(ex, lens, cfg.gen_length, engines.spec.max_seq_len)
    run = BatchDecoder(engines, cfg, batch, N, executor=ex)
    waiting, step = list(prompts), 0
    while True:
        if waiting and step % every == 0:
            run.submit(torch.tensor(waiting.pop(0))[None])
        if not run.step() and not waiting:
            return
        step += 1


# how each method's rows are counted: (row_buckets, step_bucket_slack)
DEFAULT_SLACK = EngineSet.step_bucket_slack
ROWS = {"exact": (False, DEFAULT_SLACK), "bucketed": (True, DEFAULT_SLACK), "one-bucket": (True, float("inf"))}


def measure(engines, cfg, prompts, batch: int, rows_kind: str, arrive_every: int | None = None) -> dict:
    ex = Executor(engines)
    ex.cuda_graphs = True                                     # the graph path's keys; nothing is captured
    ex.row_buckets, ex.step_bucket_slack = ROWS[rows_kind]
    ex.step_graphs, ex.layer_graphs = KeyCounter(), KeyCounter()
    rows = RowCounter(engines.ops)
    engines.ops.select_rows_batched = rows
    try:
        if batch == 1:
            for p in prompts:
                decode(engines, p, cfg, executor=ex)
        elif arrive_every:
            staggered(engines, cfg, prompts, batch, arrive_every, ex)
        else:
            decode_batch(engines, prompts, cfg, executor=ex, batch_size=batch)
    finally:
        engines.ops.select_rows_batched = rows.select
    s, layer = ex.step_graphs, ex.layer_graphs
    return {"steps": s.asked, "step_replay": round(s.would_replay / max(s.asked, 1), 3), "step_keys": len(s.keys),
            "layer_units": layer.asked, "layer_replay": round(layer.would_replay / max(layer.asked, 1), 3),
            "layer_keys": len(layer.keys),
            "padding": round(rows.run / rows.asked, 3) if rows.asked else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", default="dcu,dcu@allocation=softmax,dcu+apd")
    p.add_argument("--prompts", type=int, default=4, help="different prompts, decoded one after the other")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--prompt-len-max", type=int, help="draw each prompt's length from [--prompt-len, this]")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded at once (decode_batch when > 1)")
    p.add_argument("--arrive-every", type=int, help="with --batch: submit one prompt every this many steps")
    p.add_argument("--rows", default=",".join(ROWS), help=f"which row counts to measure, of {','.join(ROWS)}")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    if not rows or any(r not in ROWS for r in rows):
        p.error(f"--rows {a.rows!r}: give some of {','.join(ROWS)}")
    if a.prompt_len_max is not None and a.prompt_len_max < a.prompt_len:
        p.error(f"--prompt-len-max {a.prompt_len_max} is below --prompt-len {a.prompt_len}; give a maximum >= it")
    if a.arrive_every is not None and (a.arrive_every < 1 or a.batch < 2):
        p.error("--arrive-every needs a positive step count and --batch 2 or more")
    torch.set_num_threads(2)
    spec = tiny_spec("llada", n_layers=a.layers, d_model=64, n_heads=2)
    engines = torch_engine_set(random_model(spec, torch.float32, "cpu"), "fp32", kernels="torch")
    base = DecodeConfig(gen_length=a.gen_length, block_length=a.block_length, steps=a.gen_length,
                        budget=a.budget, window=a.window)
    g = torch.Generator().manual_seed(0)
    lens = [a.prompt_len] * a.prompts if a.prompt_len_max is None else \
        torch.randint(a.prompt_len, a.prompt_len_max + 1, (a.prompts,), generator=g).tolist()
    prompts = [torch.randint(6, 90, (n,), generator=g).tolist() for n in lens]
    results = {}
    print(f"{'method':>24} {'rows':>10} | steps | step replay (keys) | layer replay (keys) | rows run / asked")
    for method in split_methods(a.methods):
        cfg = parse_method(method, base)
        for kind in rows:
            r = measure(engines, cfg, prompts, a.batch, kind, a.arrive_every)
            results.setdefault(method, {})[kind] = r
            pad = "-" if r["padding"] is None else f"{r['padding']:.3f}"
            print(f"{method:>24} {kind:>10} | {r['steps']:5d} | "
                  f"{r['step_replay']:6.1%} ({r['step_keys']:4d})     | {r['layer_replay']:6.1%} ({r['layer_keys']:5d})"
                  f"      | {pad}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layers": a.layers, "prompts": a.prompts, "prompt_len": a.prompt_len,
                       "prompt_len_max": a.prompt_len_max, "arrive_every": a.arrive_every, "batch": a.batch,
                       "gen_length": a.gen_length, "block_length": a.block_length, "budget": a.budget,
                       "window": a.window, "methods": results}, f, indent=1)


if __name__ == "__main__":
    main()

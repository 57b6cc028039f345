"""dllm-bench --batch 1,4,16: the same prompts decoded at several batch sizes, side by side in one run.

Every batch size decodes the same prompts (``decode_batch`` with that many slots; batch 1 decodes them
one after another), so tokens/s compare directly: the ratio to batch 1 is what batching buys. Rounds
alternate the order of the batch sizes, as the method comparison alternates methods. Each batch size
has its own executor (its own caches and captured CUDA graphs, so sizes do not evict each other's), and
the warm-up decodes one batch's worth of prompts per size (enough to see every shape). A batched step
runs every occupied slot at once, so ``step_ms`` is the time of one batched step (wall over the steps
the executor ran), and ``identical_to_batch1`` checks that batching changed no token.
"""

from __future__ import annotations

import dataclasses
import time

from dllm.errors import ConfigError


@dataclasses.dataclass
class BatchRun:
    """One timed pass of a method over every prompt at one batch size."""
    repeat: int
    wall_s: float
    steps: int                       # batched steps the executor ran
    ids: list[list[int]]             # per prompt
    answer_tokens: int               # over all prompts (before each first EOS)
    latency_s: list[float]           # per prompt: its own start (slot taken) to its end


def parse_batch_sizes(text: str, max_batch: int | None = None) -> tuple[int, ...]:
    """``"1,4,16"`` -> (1, 4, 16); each a positive integer the engines take (``max_batch``). Batch 1 is always
    measured: every ratio is taken against it."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"--batch {text!r}: {part!r} is not a positive integer; pass sizes like --batch 1,4,16")
        sizes.append(int(part))
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"--batch {text!r} lists a size twice; pass each batch size once")
    check_batch_limit(sizes, max_batch)
    return tuple(sorted(set(sizes) | {1}))


def check_batch_limit(sizes, max_batch: int | None) -> None:
    """Every batch size is one the engines take (``max_batch``: their export limit; None: no limit)."""
    if max_batch is not None and max(sizes) > max_batch:
        raise ConfigError(f"--batch {max(sizes)} exceeds the {max_batch} sequences these engines take at once; "
                          f"re-export with dllm-export --max-batch {max(sizes)} or pass sizes up to {max_batch}")


def decode_pass(engines, executor, prompts, cfg, batch: int, max_seq_len: int | None):
    """Every prompt at ``batch`` slots; returns (results, wall seconds, batched steps)."""
    import torch

    from dllm.runtime.loop import decode_batch

    before = executor.steps_run
    t0 = time.perf_counter()
    results = decode_batch(engines, [list(p) for p in prompts], cfg, executor=executor, batch_size=batch,
                           max_seq_len=max_seq_len)
    if engines.device.type == "cuda":
        torch.cuda.synchronize(engines.device)
    return results, time.perf_counter() - t0, executor.steps_run - before


def run_batch_bench(pipe, prompts, bench_cfg, batch_sizes: tuple[int, ...], max_seq_len: int | None = None,
                    log=print) -> tuple[dict[str, dict[int, list[BatchRun]]], dict]:
    """Warm up, then ``repeat`` rounds of every method at every batch size (size order reversed on odd rounds).
    Returns the runs and each batch size's executor (warm: a profile after the timed rounds reuses it)."""
    from dllm.runtime.executor import Executor

    configs = bench_cfg.method_configs()
    engines = pipe.engines
    executors = {b: pipe.executor if b == 1 else Executor(engines) for b in batch_sizes}
    for w in range(bench_cfg.warmup):
        for c in configs.values():
            for b in batch_sizes:
                decode_pass(engines, executors[b], prompts.ids[:b], c, b, max_seq_len)
        log(f"[bench] warm-up {w + 1}/{bench_cfg.warmup} done")
    runs: dict[str, dict[int, list[BatchRun]]] = {m: {b: [] for b in batch_sizes} for m in configs}
    for r in range(bench_cfg.repeat):
        order = list(batch_sizes) if r % 2 == 0 else list(reversed(batch_sizes))
        for m, c in configs.items():
            for b in order:
                results, wall, steps = decode_pass(engines, executors[b], prompts.ids, c, b, max_seq_len)
                runs[m][b].append(BatchRun(r, wall, steps, [x.ids for x in results],
                                           sum(x.answer_length for x in results), [x.wall_s for x in results]))
        log(f"[bench] round {r + 1}/{bench_cfg.repeat} done")
    return runs, executors


def summarize_batches(runs: dict[str, dict[int, list[BatchRun]]], gen_length: int) -> dict[str, dict[str, dict]]:
    """Per method and batch size: tokens/s, step time, latency per sequence, and the ratio to batch 1."""
    out = {}
    for m, by_batch in runs.items():
        base = by_batch[1]
        stats = {}
        for b, rs in by_batch.items():
            wall = sum(x.wall_s for x in rs)
            steps = sum(x.steps for x in rs)
            prompts = len(rs[0].ids)
            latency = [s for x in rs for s in x.latency_s]
            stats[str(b)] = {
                "batch": b,
                "sequences": prompts,
                "tokens_per_s": sum(x.answer_tokens for x in rs) / wall,
                "canvas_tokens_per_s": len(rs) * prompts * gen_length / wall,
                "wall_ms_per_pass": wall / len(rs) * 1e3,
                "wall_ms_per_round": [round(x.wall_s * 1e3, 3) for x in rs],
                "batched_steps_per_pass": steps / len(rs),
                "step_ms_mean": wall / steps * 1e3,
                "latency_ms_mean": sum(latency) / len(latency) * 1e3,
                "identical_to_batch1": all(x.ids == base[0].ids for x in rs),
            }
        ref = stats["1"]
        for s in stats.values():
            s["throughput_vs_batch1"] = s["tokens_per_s"] / ref["tokens_per_s"] if ref["tokens_per_s"] else None
            s["canvas_throughput_vs_batch1"] = s["canvas_tokens_per_s"] / ref["canvas_tokens_per_s"]
        out[m] = stats
    return out


_COLUMNS = [("method", "{}", "method"), ("batch", "{}", "batch"), ("tok/s", "{:.1f}", "tokens_per_s"),
            ("canvas tok/s", "{:.1f}", "canvas_tokens_per_s"),
            ("x batch 1", "{:.2f}x", "canvas_throughput_vs_batch1"),
            ("step ms", "{:.2f}", "step_ms_mean"), ("steps/pass", "{:.1f}", "batched_steps_per_pass"),
            ("latency ms", "{:.1f}", "latency_ms_mean"), ("same tokens", "{}", "identical_to_batch1")]


def format_batch_table(batches: dict[str, dict[str, dict]]) -> str:
    """A plain-text table (markdown-compatible): one row per method and batch size. ``x batch 1`` is the
    canvas rate over batch 1's (the answer-token ratio is in the JSON)."""
    rows = []
    for m, by_batch in batches.items():
        for s in by_batch.values():
            rows.append([m if key == "method" else ("-" if s.get(key) is None else fmt.format(s[key]))
                         for _, fmt, key in _COLUMNS])
    head = [c[0] for c in _COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"   # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])

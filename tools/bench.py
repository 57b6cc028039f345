"""dllm-bench: every decoding method on the same prompts in one run, side by side.

    dllm-bench ENGINE_DIR --methods full,dual+threshold,dcu,dcu+apd --gen-length 64 --json out.json --plot out.png
    dllm-bench --random-weights llada-8b --dtype bf16 --backend torch --device cuda \
        --prompt-len 1024 --gen-length 256 --methods full,dcu,dcu+apd --json gpu.json

How it measures (``run_bench``):

1. warm-up: every method decodes every prompt ``warmup`` times (sessions, allocators, CUDA graphs);
2. ``repeat`` rounds; each round runs every method over every prompt, the method order reversed on odd
   rounds so that drift on a shared machine hits all methods alike;
3. per step, a hook on the decode loop takes the time between steps (synchronizing CUDA first, which
   costs nothing extra: the loop already syncs once per step to read the committed positions);
4. ``full`` (the reference ``full`` + ``schedule``) is always measured, and every method is compared
   against it: speedup (``full``'s mean latency over the method's), agreement of the generated tokens,
   and, for task prompts, exact-match accuracy of the answers.

Per method, as serving benchmarks report: latency per request (one generation), time to the first
answer token (until the answer's first position is committed, what a stream shows first), tokens/s
counting only answer tokens (before the first EOS), and, named as such, the canvas rate (every
generated position, EOS padding included, over wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import typing

from dllm.cli import add_choice, add_common
from dllm.cli_common import Parser, check_output_file, run_cli, write_text
from dllm.errors import ConfigError
from dllm.runtime.config import CachePolicyKind, DecodeConfig, Proxy
from dllm.runtime.methods import method_config
from dllm.tools.bench_batch import (check_batch_limit, format_batch_table, parse_batch_sizes, run_batch_bench,
                                    summarize_batches)
from dllm.tools.bench_report import command_line, format_table, median, percentile

REFERENCE = "full"
KERNEL_PATHS = ("auto", "triton", "torch", "plain")   # = dllm.kernels.KernelPath, spelled here for a torch-free --help
DEFAULT_METHODS = ("full", "dual+threshold", "dcu", "dcu+apd")
SCHEMA = "dllm-bench/1"


def split_methods(text: str) -> tuple[str, ...]:
    """``"full,dcu+apd@budget=8,window=8"`` -> ``("full", "dcu+apd@budget=8,window=8")``: an item with ``=``
    and no ``@`` continues the previous method's overrides (method names never contain ``=``)."""
    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if "=" in item and "@" not in item and out and "@" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return tuple(out)


def parse_method(spec: str, base: DecodeConfig) -> DecodeConfig:
    """``CACHE[+COMMIT][@field=value,...]`` -> DecodeConfig: a method name (``method_config``) with optional
    per-method overrides of DecodeConfig fields, e.g. ``dcu+apd@budget=8,window=8``."""
    name, _, overrides = spec.partition("@")
    cfg = method_config(name, base)
    if not overrides:
        return cfg
    types = {f: t for f, t, _ in _decode_fields() if f != "gen_length"}   # every method fills the same canvas
    changes = {}
    for item in overrides.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            raise ConfigError(f"method {spec!r}: override {item!r} is not FIELD=VALUE with FIELD one of "
                              f"{sorted(types)} (e.g. dcu+apd@budget=8,window=8)")
        value = value.strip()
        try:
            if types[key] is bool:
                changes[key] = value.lower() in ("1", "true", "yes", "on")
            elif value.lower() == "none":
                changes[key] = None
            else:
                changes[key] = types[key](value)
        except ValueError:
            raise ConfigError(f"method {spec!r}: {key}={value!r} is not a valid {types[key].__name__}") from None
    return cfg.replace(**changes)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures; ``decode`` is the base every method name is applied to."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    decode: DecodeConfig = DecodeConfig(gen_length=64, block_length=32, steps=64)
    num_prompts: int = 4
    prompt_len: int | None = None        # None: task prompts at natural length, random prompts of 64
    repeat: int = 3
    warmup: int = 1
    seed: int = 0
    step_times: bool = True              # per-step timing hook (else step latency = wall / steps)
    tasks: tuple[str, ...] = ("arithmetic", "sorting")
    batch_sizes: tuple[int, ...] = ()    # --batch: measure these batch sizes instead of comparing methods

    def __post_init__(self):
        methods = tuple(m.strip() for m in self.methods if m.strip())
        methods = tuple(REFERENCE if m.lower() == REFERENCE else m for m in methods)
        if not methods:
            raise ConfigError("--methods is empty; pass e.g. --methods full,dcu,dcu+apd")
        normal = [m.lower().replace("_", "-") for m in methods]
        if len(set(normal)) != len(normal):
            raise ConfigError(f"--methods lists a method twice: {list(methods)}")
        for m in methods:
            parse_method(m, self.decode)           # raises ConfigError naming the bad part
        if REFERENCE not in normal and not self.batch_sizes:
            methods = (REFERENCE,) + methods       # the reference every ratio is taken against (--batch: batch 1)
        object.__setattr__(self, "methods", methods)
        for name in ("num_prompts", "repeat"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be at least 0, got {self.warmup}")
        if self.prompt_len is not None and self.prompt_len < 1:
            raise ConfigError(f"--prompt-len must be at least 1, got {self.prompt_len}")
        generated = ("arithmetic", "sorting")
        unknown = [t for t in self.tasks if t not in generated]
        if not self.tasks or unknown:
            raise ConfigError(f"--tasks {','.join(self.tasks)!r}: task prompts come from {list(generated)}; "
                              f"pass a comma-separated subset, e.g. --tasks arithmetic")

    def method_configs(self) -> dict[str, DecodeConfig]:
        return {m: parse_method(m, self.decode) for m in self.methods}

    def needs_vproj(self) -> bool:
        """Whether any method reads the value-proxy probes (the engines must include them)."""
        return any(c.proxy == Proxy.VALUE and c.cache in (CachePolicyKind.DCU, CachePolicyKind.DCU_REFERENCE)
                   or c.cache in (CachePolicyKind.DLLM_CACHE, CachePolicyKind.DCU_REFERENCE)
                   for c in self.method_configs().values())


@dataclasses.dataclass
class Run:
    """One timed generation."""
    repeat: int
    prompt: int
    ids: list[int]
    wall_s: float
    engine_s: float
    steps: int
    nfe: int
    step_s: list[float]
    rows_per_step: list[list[int]]
    canvas_len: int
    first_token_s: float = 0.0       # until the answer's first position was committed
    answer_len: int = 0              # generated tokens before the first EOS


# -- measuring --------------------------------------------------------------------------------------
def decode_once(pipe: Pipeline, prompt: tuple[int, ...], cfg: DecodeConfig, step_times: bool,
                max_seq_len: int | None) -> tuple:
    """One generation; returns (DecodeResult, seconds of each step)."""
    import torch

    from dllm.runtime.loop import decode

    cuda = pipe.engines.device.type == "cuda"
    stamps: list[float] = []

    def on_step(canvas, view, committed):
        if cuda:
            torch.cuda.synchronize(pipe.engines.device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    res = decode(pipe.engines, list(prompt), cfg, executor=pipe.executor,
                 on_step=on_step if step_times else None, max_seq_len=max_seq_len)
    step_s = [b - a for a, b in zip([t0] + stamps[:-1], stamps)] if step_times else []
    return res, step_s


@dataclasses.dataclass
class Measured:
    runs: dict[str, list[Run]]       # method -> its timed generations
    peaks: dict[str, dict]           # method -> peak memory over its spans


def run_bench(pipe: Pipeline, prompts: Prompts, cfg: BenchConfig, max_seq_len: int | None = None,
              log=print) -> Measured:
    """Warm up, then ``cfg.repeat`` rounds of every method over every prompt (order reversed on odd rounds)."""
    from dllm.tools.bench_report import PeakMemory

    configs = cfg.method_configs()
    memory = PeakMemory(pipe.engines.device)
    for w in range(cfg.warmup):
        for m, c in configs.items():
            for p in prompts.ids:
                decode_once(pipe, p, c, False, max_seq_len)
        log(f"[bench] warm-up {w + 1}/{cfg.warmup} done")
    runs: dict[str, list[Run]] = {m: [] for m in configs}
    peaks: dict[str, dict] = {}
    for r in range(cfg.repeat):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for m in order:
            memory.reset()
            for i, p in enumerate(prompts.ids):
                res, step_s = decode_once(pipe, p, configs[m], cfg.step_times, max_seq_len)
                runs[m].append(Run(r, i, res.ids, res.wall_s, res.engine_s, res.steps, res.nfe, step_s,
                                   res.rows_per_step, res.prompt_length + len(res.ids), res.first_token_s,
                                   res.answer_length))
            peak = memory.read()
            peaks[m] = {k: max(v, peaks[m][k]) if m in peaks and isinstance(v, float) else v
                        for k, v in peak.items()}
        walls = ", ".join(f"{m} {sum(x.wall_s for x in runs[m] if x.repeat == r):.2f}s" for m in configs)
        log(f"[bench] round {r + 1}/{cfg.repeat}: {walls}")
    return Measured(runs, peaks)


def summarize(measured: Measured, prompts: Prompts, cfg: BenchConfig, pipe: Pipeline,
              floor_ms: float | None = None) -> dict:
    """Per-method statistics from the runs (see the module docstring for definitions)."""
    from dllm.tools.bench_sources import PromptKind

    runs, peaks = measured.runs, measured.peaks
    ref_runs = runs[REFERENCE]
    ref_ids = {x.prompt: x.ids for x in ref_runs if x.repeat == cfg.repeat - 1}
    ref_wall = {r: sum(x.wall_s for x in ref_runs if x.repeat == r) for r in range(cfg.repeat)}
    out = {}
    for m in cfg.methods:
        rs = runs[m]
        G = cfg.decode.gen_length
        wall, engine = sum(x.wall_s for x in rs), sum(x.engine_s for x in rs)
        steps = sum(x.steps for x in rs)
        step_s = [s for x in rs for s in x.step_s] or [x.wall_s / x.steps for x in rs for _ in range(x.steps)]
        all_rows = [row for x in rs for row in x.rows_per_step]
        n_layers = len(all_rows[0]) if all_rows else 0
        per_layer = [sum(row[l] for row in all_rows) / len(all_rows) for l in range(n_layers)]
        canvas = sum(x.canvas_len for x in rs) / len(rs)
        last = {x.prompt: x.ids for x in rs if x.repeat == cfg.repeat - 1}
        agree = [sum(a == b for a, b in zip(last[i], ref_ids[i])) / G for i in last]
        walls = {r: sum(x.wall_s for x in rs if x.repeat == r) for r in range(cfg.repeat)}
        latency = [x.wall_s for x in rs]
        per_round = [walls[r] / sum(1 for x in rs if x.repeat == r) for r in range(cfg.repeat)]
        stats = {
            "config": cfg.method_configs()[m].to_dict(),
            "generations": len(rs),
            "latency_ms_mean": wall / len(rs) * 1e3,
            "latency_ms_p50": percentile(latency, 50) * 1e3,
            "latency_ms_p90": percentile(latency, 90) * 1e3,
            "latency_ms_per_round": [round(x * 1e3, 3) for x in per_round],
            "latency_ms_round_std": statistics.pstdev(per_round) * 1e3 if len(per_round) > 1 else 0.0,
            "first_token_ms_mean": sum(x.first_token_s for x in rs) / len(rs) * 1e3,
            "answer_tokens_mean": sum(x.answer_len for x in rs) / len(rs),
            "tokens_per_s": sum(x.answer_len for x in rs) / wall,
            "canvas_tokens_per_s": len(rs) * G / wall,
            "wall_ms_per_generation": wall / len(rs) * 1e3,
            "steps_mean": steps / len(rs),
            "nfe_mean": sum(x.nfe for x in rs) / len(rs),
            "tokens_per_step": len(rs) * G / steps,
            "step_ms_mean": sum(step_s) / len(step_s) * 1e3,
            "step_ms_p50": percentile(step_s, 50) * 1e3,
            "step_ms_p90": percentile(step_s, 90) * 1e3,
            "step_timing": "per-step hook" if cfg.step_times else "wall / steps",
            "engine_ms_per_step": engine / steps * 1e3,
            "orchestration_ms_per_step": (wall - engine) / steps * 1e3,
            "engine_share": engine / wall,
            "rows_per_layer": [round(v, 2) for v in per_layer],
            "rows_per_layer_mean": sum(per_layer) / max(1, n_layers),
            "rows_fraction": sum(per_layer) / max(1, n_layers) / canvas,
            "canvas_len_mean": canvas,
            "token_agreement": sum(agree) / len(agree),
            "deterministic": all(x.ids == last[x.prompt] for x in rs),
            "speedup_median_per_round": median([ref_wall[r] / walls[r] for r in range(cfg.repeat)]),
            "speedup_per_round": [ref_wall[r] / walls[r] for r in range(cfg.repeat)],
            **peaks.get(m, {}),
        }
        if floor_ms is not None:
            stats["step_over_floor"] = stats["step_ms_mean"] / floor_ms
        if prompts.kind == PromptKind.TASK:
            from dllm.tools.tasks import is_correct

            texts = {i: pipe.decode_text(ids) for i, ids in last.items()}
            stats["exact_match"] = sum(is_correct(prompts.problems[i].task, t, prompts.problems[i].answer)
                                       for i, t in texts.items()) / len(texts)
            stats["answers"] = [texts[i] for i in sorted(texts)]
        out[m] = stats
    ref_latency = out[REFERENCE]["latency_ms_mean"]
    for stats in out.values():
        stats["speedup"] = ref_latency / stats["latency_ms_mean"]     # same prompts and gen length: the canvas rate ratio
    return out


# -- CLI --------------------------------------------------------------------------------------------
def _decode_fields() -> list[tuple[str, type, tuple | None]]:
    """(field, type, choices) of every DecodeConfig knob a method does not set itself."""
    hints = typing.get_type_hints(DecodeConfig)
    out = []
    for f in dataclasses.fields(DecodeConfig):
        if f.name in ("cache", "commit"):
            continue
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if args else t
        choices = tuple(e.value for e in t) if isinstance(t, type) and issubclass(t, str) and t is not str else None
        out.append((f.name, str if choices else t, choices))
    return out


def build_parser() -> argparse.ArgumentParser:
    from dllm.runtime.cli import add_decode_flags

    p = Parser(prog="dllm-bench", description="Benchmark decoding methods side by side (latency, time to the "
               "first answer token, tokens/s, steps, rows recomputed, accuracy against full).")
    p.add_argument("engine_dir", nargs="?", help="engine directory from dllm-export (omit with --random-weights)")
    p.add_argument("--random-weights", metavar="SHAPE", help="llada-8b, dream-7b or SPEC.json: that model shape "
                   "with random weights")
    p.add_argument("--layers", type=int, metavar="N", help="random weights: override the number of layers")
    add_choice(p, "--dtype", ("bf16", "fp16", "fp32"), help="random weights: dtype (default bf16 on cuda, fp32 "
               "on cpu)")
    add_choice(p, "--backend", ("onnxruntime", "torch", "tensorrt"), default="onnxruntime",
               help="what runs the subgraphs (as in dllm-run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    add_common(p)
    p.add_argument("--no-cuda-graphs", action="store_true", help="torch on CUDA: no CUDA graph capture")
    p.add_argument("--no-row-buckets", action="store_true",
                   help="torch on CUDA with graphs: DCU's layers run their exact row counts instead of bucketed "
                        "ones (bucketed rows keep graph shapes when proportional budgets move; for comparison)")
    p.add_argument("--step-bucket-slack", type=float, metavar="X",
                   help="torch on CUDA with row buckets: every DCU layer of a step runs the step's largest bucket "
                        "(so the whole step replays as one graph) when that costs at most X times the rows of each "
                        "layer's own bucket; inf: always, 1: only when free (default 1.25)")
    add_choice(p, "--kernels", KERNEL_PATHS, default="auto",
               help="the work around the engines (and inside torch layers): auto = Triton kernels on CUDA, "
                    "their torch twins on the CPU; plain = the unfused torch path")
    add_choice(p, "--attention", ("torch", "split-kv"), default="torch",
               help="the torch layers' attention of a few rows over the caches: torch's (default) or the split-KV "
                    "Triton kernel (--kernels triton, or auto on CUDA)")
    p.add_argument("--verify", action="store_true",
                   help="hash every file of the engine directory against its manifest before loading (by default "
                        "files unchanged since they were last verified are trusted; sizes are always checked)")
    p.add_argument("--share-layer-onnx", action="store_true", default=None,
                   help="random weights on onnxruntime: export one layer and load its file for every layer "
                        "(default: only when the layers exceed 1 GiB)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated CACHE[+COMMIT][@field=value,...] names (default "
                        f"{','.join(DEFAULT_METHODS)}); full is always added; per-method DecodeConfig "
                        "overrides e.g. full,dcu+apd,dcu+apd@budget=8,window=8")
    p.add_argument("--prompt-len", type=int, metavar="N", help="prompt tokens (task prompts: pad/cut; default "
                                                               "natural; random prompts: default 64)")
    p.add_argument("--num-prompts", type=int, metavar="N", help="prompts per method per round (default 4; with "
                                                                "--batch the largest batch size)")
    p.add_argument("--tasks", default="arithmetic,sorting", help="task families for task prompts "
                                                                 "(default arithmetic,sorting)")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="warm-up rounds (default 1)")
    p.add_argument("--no-step-times", action="store_true", help="no per-step hook: step latency = wall / steps")
    p.add_argument("--batch", metavar="SIZES",
                   help="comma-separated batch sizes, e.g. 1,4,16: decode the same prompts at each size (batch 1 is "
                        "always measured) and report tokens/s and step time per size instead of the method table")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, decode the first prompt once more per method under the torch "
                        "profiler and report where a step's milliseconds go (JSON methods.<name>.profile); with "
                        "--batch, one batch of prompts per method and size (JSON batch.<method>.<size>.profile)")
    g = p.add_argument_group("decoding (DecodeConfig fields; methods set --cache/--commit)")
    add_decode_flags(g, canvas={"--gen-length": "default 64", "--block-length": "default 32",
                                "--steps": "default: the gen length, one token per step"},
                     exclude=("--cache", "--commit"))
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw latency, accuracy, steps per generation and rows per "
                                                     "layer (needs matplotlib: pip install -e '.[plot]')")
    return p


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before any engine loads: the device, output paths, matplotlib for --plot."""
    from dllm.device import parse_device

    parse_device(args.device, "--device", check_available=args.backend != "tensorrt")
    if args.json:
        check_output_file(args.json, "--json")
    slack = args.step_bucket_slack
    if slack is not None and not slack >= 1:                # also refuses nan
        raise ConfigError(f"--step-bucket-slack must be at least 1 (a ratio of rows; inf for always), got {slack}")
    if args.no_row_buckets and slack is not None:
        raise ConfigError("--step-bucket-slack sets how row buckets are shared across a step; drop it with "
                          "--no-row-buckets (exact row counts have no buckets)")
    if args.batch is not None and args.plot:
        raise ConfigError("--plot draws the method comparison; drop it with --batch (its JSON holds every number)")
    if args.plot:
        check_output_file(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib, which is not installed; pip install 'dllm-deploy[plot]' "
                              "(or drop --plot)") from None


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = {name: getattr(args, name, None) for name, _, _ in _decode_fields()}   # flags bench has
    values = {name: v for name, v in values.items() if v is not None}
    values.setdefault("gen_length", 64)
    values.setdefault("block_length", 32)
    decode_cfg = DecodeConfig(**values)
    batch_sizes = parse_batch_sizes(args.batch) if args.batch is not None else ()
    num_prompts = args.num_prompts if args.num_prompts is not None else max(batch_sizes, default=4)
    return BenchConfig(methods=split_methods(args.methods), decode=decode_cfg, num_prompts=num_prompts,
                       prompt_len=args.prompt_len, repeat=args.repeat, warmup=args.warmup, seed=decode_cfg.seed,
                       step_times=not args.no_step_times,
                       tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), batch_sizes=batch_sizes)


def open_source(args: argparse.Namespace, cfg: BenchConfig) -> EngineSource:
    from dllm.tools.bench_sources import open_engine_dir_source, open_random_source

    if (args.engine_dir is None) == (args.random_weights is None):
        raise ConfigError("pass either ENGINE_DIR or --random-weights SHAPE (exactly one)")
    cuda_graphs = not args.no_cuda_graphs and args.device.startswith("cuda")
    if args.random_weights is not None:
        dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
        return open_random_source(args.random_weights, args.layers, dtype, args.backend, args.device,
                                  args.threads, cuda_graphs, cfg.needs_vproj(), share_layers=args.share_layer_onnx,
                                  seed=cfg.seed, kernels=args.kernels)
    if args.layers is not None or args.dtype is not None:
        raise ConfigError("--layers and --dtype apply to --random-weights only; an engine directory has its "
                          "own (re-export with dllm-export --dtype to change it)")
    return open_engine_dir_source(args.engine_dir, args.backend, args.device, args.threads, cuda_graphs,
                                  args.kernels, verify=args.verify)


def bench(args: argparse.Namespace, argv: list[str] | None, log=print) -> dict:
    """Run the benchmark the parsed flags describe and return the report (also written/plotted if asked)."""
    from dllm.threads import torch_threads

    check_args(args)
    cfg = config_from_args(args)
    source = open_source(args, cfg)
    try:
        engines = source.engines
        if args.attention == "split-kv":
            if args.backend != "torch" or engines.ops is None or not engines.ops.triton:
                raise ConfigError("--attention split-kv is a Triton kernel of the torch backend: add --backend torch "
                                  "--kernels triton (the default --kernels auto picks Triton on CUDA)")
            engines.ops.split_kv = True
        source.description["attention"] = args.attention
        engines.row_buckets = not args.no_row_buckets
        if args.step_bucket_slack is not None:
            engines.step_bucket_slack = args.step_bucket_slack
        with torch_threads(engines.torch_threads):
            return _bench(args, argv, cfg, source, log)
    finally:
        source.close()


def _bench(args, argv, cfg: BenchConfig, source: EngineSource, log) -> dict:
    from dllm.runtime.pipeline import Pipeline
    from dllm.tools.bench_report import machine_info, weight_read_floor
    from dllm.tools.bench_sources import make_prompts, weight_bytes_per_step
    from dllm.tools.step_profile import format_profile, profile_batch, profile_decode

    engines = source.engines
    pipe = Pipeline(engines, max_seq_len=source.max_seq_len)
    tokenizer = pipe.tokenizer if engines.tokenizer_dir is not None else None
    prompts = make_prompts(engines, tokenizer, cfg.num_prompts, cfg.prompt_len, cfg.seed, cfg.tasks)
    log(f"[bench] {len(cfg.methods)} methods x {len(prompts.ids)} prompts ({prompts.note}), "
        f"gen {cfg.decode.gen_length}, {cfg.warmup} warm-up + {cfg.repeat} timed rounds")
    floor = None
    if engines.device.type == "cuda":
        floor = weight_read_floor(weight_bytes_per_step(engines.spec, engines.dtype), engines.device)
    if cfg.batch_sizes:
        check_batch_limit(cfg.batch_sizes, engines.max_batch)
        runs, executors = run_batch_bench(pipe, prompts, cfg, cfg.batch_sizes, source.max_seq_len, log=log)
        batches, methods = summarize_batches(runs, cfg.decode.gen_length), None
    else:
        runs = run_bench(pipe, prompts, cfg, source.max_seq_len, log=log)
        methods = summarize(runs, prompts, cfg, pipe, floor["floor_ms"] if floor else None)
    if args.profile and cfg.batch_sizes:
        for name, method_cfg in cfg.method_configs().items():
            for b in cfg.batch_sizes:          # one batch's worth of prompts: the steady state of b slots
                prof = profile_batch(engines, executors[b], prompts.ids[:b], method_cfg, b, source.max_seq_len)
                batches[name][str(b)]["profile"] = prof
                log(f"[bench] profile {format_profile(f'{name} at batch {b}', prof)}")
    elif args.profile:
        for name, method_cfg in cfg.method_configs().items():
            methods[name]["profile"] = profile_decode(pipe, prompts.ids[0], method_cfg, source.max_seq_len)
            log(f"[bench] profile {format_profile(name, methods[name]['profile'])}")
    notes = list(source.notes)
    if engines.device.type == "cuda":
        notes.append("engine_ms_per_step is host time inside engine calls; on CUDA that is launch time only "
                     "(the device runs asynchronously), so compare step_ms instead")
        graphs = getattr(pipe.executor, "graphs_captured", 0) + \
            sum(getattr(e, "graphs_captured", 0) for e in engines.engines.values())
        if graphs:
            notes.append(f"{graphs} CUDA graphs captured over the run")
    report = {
        "schema": SCHEMA,
        "command": command_line(argv),
        "machine": machine_info(engines.device),
        "engine": source.description,
        "settings": {"backend": engines.backend.value, "device": str(engines.device),
                     "threads": engines.threads, "torch_threads": engines.torch_threads,
                     "kernels": engines.kernel_path.value,
                     "cuda_graphs": engines.backend.value == "torch" and engines.device.type == "cuda"
                     and not args.no_cuda_graphs,
                     "row_buckets": pipe.executor.row_buckets,
                     "step_bucket_slack": _json_number(pipe.executor.step_bucket_slack),
                     "methods": list(cfg.methods), "num_prompts": len(prompts.ids), "repeat": cfg.repeat,
                     "warmup": cfg.warmup, "prompts": prompts.note, "prompt_kind": prompts.kind.value,
                     "prompt_lengths": prompts.lengths, "decode": cfg.decode.to_dict(),
                     "order": "method order reversed on odd rounds"},
        "notes": notes,
    }
    if methods is not None:
        report["methods"] = methods
    else:
        report["batch"] = batches
        report["settings"]["batch_sizes"] = list(cfg.batch_sizes)
    if floor is not None:
        report["weight_read_floor"] = floor
    return report


def _json_number(x: float):
    """x, or "inf" where it is infinite: JSON has no infinity."""
    return x if math.isfinite(x) else str(x)


def write_outputs(report: dict, args: argparse.Namespace, log=print) -> None:
    """The JSON report and the plot, where the flags ask for them (each written whole or not at all)."""
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n", "--json")
        log(f"[bench] wrote {args.json}")
    if args.plot:
        from dllm.tools.bench_report import plot

        try:
            log(f"[bench] wrote {plot(report, args.plot)}")
        except OSError as e:
            raise ConfigError(f"--plot {args.plot}: could not write it ({e.strerror or e}); choose a writable file "
                              "path") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731

    def body() -> None:
        report = bench(args, argv, log=log)
        for note in report["notes"]:
            log(f"[bench] note: {note}")
        print(format_table(report["methods"]) if "methods" in report else format_batch_table(report["batch"]))
        write_outputs(report, args, log=log)

    return run_cli("dllm-bench", body)


if __name__ == "__main__":
    sys.exit(main())

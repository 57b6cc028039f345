"""Where a decoding step's milliseconds go: one generation under the torch profiler, grouped by kind.

``dllm-bench --profile`` calls ``profile_decode`` once per method after the timed rounds (the profiler
slows a step down, so these runs never count towards tokens/s) and reports, per step:

- on CUDA, GPU kernel time per category (matrix products, attention, elementwise/reductions,
  copies/indexing, top-k/sort, other) from every kernel the process launched, CUDA-graph replays and
  ONNX Runtime's CUDA provider included, plus ``device_idle_ms``: wall time during which no kernel
  ran (host work the GPU waited for: launches, policy bookkeeping, the per-step commit sync);
- on CPU, the self time of torch operators per category, plus ``outside_torch_ops_ms``: Python, the
  profiler itself and, for ONNX Runtime or TensorRT engines, the backend's own work (invisible to
  the torch profiler on CPU).

The categories say where a step's time goes (per-layer engine time, selection, scatter, launches) from one
command instead of a hand-read profiler table.

It also counts operators: on CUDA the kernels per step (graph replays included); on CPU the torch
operators that do work (views and other metadata-only operators left out), with each fused kernel
(``dllm.kernels``) counted once when it runs as a Triton kernel. Counts are split by region (embedding,
one layer, head, commit; marked by the executor while profiling), so ``ops_per_layer_step`` is the
number a GPU would launch per layer: the CPU's proxy for launch cost.
"""

from __future__ import annotations

import time

import torch

# Matched in order, first hit wins: a CUDA kernel name is a long C++ signature, so specific kinds
# (top-k's gather kernels, index kernels built on the elementwise template) are tested before broad ones.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul")),
    ("topk/sort", ("topk", "sort", "radix")),
    ("copy/index", ("memcpy", "memset", "copy", "index", "scatter", "gather", "catarray", "cat_", "fill")),
    ("elementwise/reduction", ("elementwise", "reduce", "norm", "softmax", "reduction", "unrolled")),
)

# CPU: aten operator names (without "aten::" and a trailing "_"), matched exactly.
OP_CATEGORIES: dict[str, frozenset[str]] = {
    "attention": frozenset({"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                            "scaled_dot_product_attention", "_flash_attention_forward",
                            "_scaled_dot_product_flash_attention", "_efficient_attention_forward"}),
    "matmul": frozenset({"mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "dot", "mv", "addmv"}),
    "topk/sort": frozenset({"topk", "sort", "argsort", "kthvalue"}),
    "copy/index": frozenset({"copy", "index_select", "index_copy", "index_put", "index", "scatter", "gather",
                             "cat", "clone", "fill", "zero", "embedding", "_to_copy", "contiguous",
                             "masked_fill", "where", "nonzero", "masked_select"}),
    "elementwise/reduction": frozenset({"add", "sub", "mul", "div", "pow", "rsqrt", "sqrt", "mean", "sum", "silu",
                                        "exp", "log", "cos", "sin", "neg", "max", "min", "amax", "eq", "ne", "lt",
                                        "gt", "ge", "le", "sigmoid", "cumsum", "abs", "clamp", "clamp_min",
                                        "logical_and", "logical_or", "logical_not", "softmax", "_softmax",
                                        "log_softmax", "_log_softmax", "linalg_vector_norm", "norm",
                                        "cosine_similarity", "sum_to_size", "bitwise_and", "bitwise_not",
                                        "reciprocal", "square", "maximum", "minimum", "argmax", "any", "all",
                                        "rms_norm", "_fused_rms_norm", "floor", "ceil", "lerp"}),
}
CATEGORY_ORDER = ("matmul", "attention", "elementwise/reduction", "copy/index", "topk/sort", "other")

# CPU operators that only make views or metadata (no kernel on a GPU); left out of operator counts
VIEW_OPS = frozenset({"view", "reshape", "_reshape_alias", "expand", "expand_as", "as_strided", "transpose", "t",
                      "permute", "select", "slice", "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_like",
                      "empty_strided", "resize", "lift_fresh", "unbind", "split", "chunk", "narrow", "_unsafe_view",
                      "view_as", "flatten", "unflatten", "contiguous", "to", "numel", "size", "stride", "dim",
                      "is_nonzero", "result_type", "set", "split_with_sizes", "movedim", "diagonal", "real",
                      "broadcast_tensors", "_local_scalar_dense", "item", "pin_memory", "is_pinned"})
REGIONS = ("embed", "layer", "head", "commit")
KERNEL_PREFIX = "dllm_kernel::"
REGION_PREFIX = "dllm::"


def classify_kernel(name: str) -> str:
    """The category of a CUDA kernel (or a Memcpy/Memset activity) by its name."""
    low = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "other"


def classify_op(name: str) -> str:
    """The category of a CPU torch operator (``aten::add_`` -> elementwise/reduction)."""
    op = name.removeprefix("aten::")
    if op.endswith("_") and not op.startswith("_"):
        op = op[:-1]
    for category, ops in OP_CATEGORIES.items():
        if op in ops:
            return category
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals (kernels on several streams)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _is_device_event(e) -> bool:
    return e.device_type != torch.autograd.DeviceType.CPU


def _op_name(name: str) -> str:
    op = name.removeprefix("aten::")
    return op[:-1] if op.endswith("_") and not op.startswith("_") else op


def _enclosing(e, prefix: str):
    """The nearest ancestor range of ``e`` whose name starts with ``prefix`` (or None)."""
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(prefix):
            return p
        p = p.cpu_parent
    return None


def count_ops(events, steps: int, n_layers: int, cuda: bool) -> dict:
    """Operators (CPU) or kernels (CUDA) per step, split by the executor's regions."""
    n = max(steps, 1)
    if cuda:
        kernels = sum(1 for e in events if _is_device_event(e) and "memcpy" not in e.name.lower()
                      and "memset" not in e.name.lower())
        return {"what": "CUDA kernels", "per_step": round(kernels / n, 1),
                "per_layer_step": round(kernels / n / max(n_layers, 1), 1)}
    by_region = {r: 0 for r in REGIONS + ("other",)}
    for e in events:
        if _is_device_event(e):
            continue
        if e.name.startswith(KERNEL_PREFIX):
            if e.name.endswith("[triton]"):           # a Triton kernel: one launch, whatever runs inside it
                region = _enclosing(e, REGION_PREFIX)
                by_region[region.name[len(REGION_PREFIX):] if region else "other"] += 1
            continue
        if not e.name.startswith("aten::") or _op_name(e.name) in VIEW_OPS:
            continue
        if any(c.name.startswith("aten::") for c in e.cpu_children):
            continue                                   # count leaves: the operators that do the work
        kernel = _enclosing(e, KERNEL_PREFIX)
        if kernel is not None and kernel.name.endswith("[triton]"):
            continue                                   # the interpreter's own copies inside a Triton launch
        region = _enclosing(e, REGION_PREFIX)
        by_region[region.name[len(REGION_PREFIX):] if region else "other"] += 1
    total = sum(by_region.values())
    return {"what": "torch operators that do work (leaves, no views) + Triton launches",
            "per_step": round(total / n, 1),
            "per_layer_step": round(by_region["layer"] / n / max(n_layers, 1), 1),
            "by_region_per_step": {r: round(v / n, 1) for r, v in by_region.items()}}


def summarize_events(events, steps: int, wall_s: float, cuda: bool, top: int = 12, n_layers: int = 0) -> dict:
    """Per-step milliseconds by category from profiler events (``prof.events()``)."""
    per: dict[str, float] = {c: 0.0 for c in CATEGORY_ORDER}
    by_name: dict[str, list[float]] = {}
    intervals: list[tuple[float, float]] = []
    for e in events:
        if e.name.startswith((KERNEL_PREFIX, REGION_PREFIX)):
            continue                                   # ranges, not operators
        if cuda:
            if not _is_device_event(e):
                continue
            us = e.time_range.end - e.time_range.start
            intervals.append((e.time_range.start, e.time_range.end))
            category = classify_kernel(e.name)
        else:
            if _is_device_event(e) or not e.name.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
            category = classify_op(e.name)
        per[category] += us
        slot = by_name.setdefault(e.name, [0.0, 0])
        slot[0] += us
        slot[1] += 1
    n = max(steps, 1)
    wall_ms = wall_s * 1e3 / n
    busy_ms = (_union_us(intervals) if cuda else sum(per.values())) / 1e3 / n
    out = {
        "device": "cuda" if cuda else "cpu",
        "what": "GPU kernel time" if cuda else "self CPU time of torch operators",
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "categories_ms_per_step": {c: round(v / 1e3 / n, 3) for c, v in per.items()},
        "busy_ms_per_step": round(busy_ms, 3),
        ("device_idle_ms_per_step" if cuda else "outside_torch_ops_ms_per_step"): round(max(wall_ms - busy_ms, 0.0), 3),
        "top": [{"name": name[:120], "category": classify_kernel(name) if cuda else classify_op(name),
                 "ms_per_step": round(us / 1e3 / n, 3), "calls_per_step": round(calls / n, 2)}
                for name, (us, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        "ops": count_ops(events, steps, n_layers, cuda),
        "note": "measured under the profiler, which slows the host: use step_ms from the timed rounds for "
                "speed, and this for where the time goes",
    }
    return out


def profile_decode(pipe, prompt, cfg, max_seq_len: int | None = None) -> dict:
    """Decode ``prompt`` once with ``cfg`` under the torch profiler; return ``summarize_events``' dict.

    Run it after a warm-up generation with the same config (CUDA graphs captured, sessions set up), so
    the profile shows the steady state.
    """
    from dllm.runtime import decode

    return _profiled(pipe.engines, pipe.executor, lambda: decode(
        pipe.engines, list(prompt), cfg, executor=pipe.executor, max_seq_len=max_seq_len).steps)


def profile_batch(engines, executor, prompts, cfg, batch: int, max_seq_len: int | None = None) -> dict:
    """``prompts`` decoded at ``batch`` slots with ``cfg`` under the torch profiler (``dllm-bench --batch
    --profile``): ``summarize_events``' dict per batched step, so ``ops.per_layer_step`` shows what each
    added sequence costs in launches. Warm up ``executor`` at this batch size first."""
    from dllm.tools.bench_batch import decode_pass

    return _profiled(engines, executor, lambda: decode_pass(engines, executor, prompts, cfg, batch, max_seq_len)[2])


def _profiled(engines, executor, run) -> dict:
    """``run()`` (returning the steps it ran) under the profiler, with the executor's regions marked."""
    from torch.profiler import ProfilerActivity, profile

    device = engines.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ops = engines.ops
    executor.profiling = True                 # regions (embed, layer, head, commit) and kernel ranges
    if ops is not None:
        ops.profiling = True
    try:
        with profile(activities=activities) as prof:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            steps = run()
            if cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
    finally:
        executor.profiling = False
        if ops is not None:
            ops.profiling = False
    return summarize_events(prof.events(), steps, wall, cuda, n_layers=engines.spec.n_layers)


def format_profile(name: str, prof: dict) -> str:
    """A few lines for the terminal: the categories of one method's step."""
    idle_key = "device_idle_ms_per_step" if prof["device"] == "cuda" else "outside_torch_ops_ms_per_step"
    idle_label = "GPU idle (host)" if prof["device"] == "cuda" else "outside torch ops"
    parts = [f"{c} {v:.2f}" for c, v in prof["categories_ms_per_step"].items() if v > 0]
    ops = prof.get("ops", {})
    return (f"{name}: {prof['wall_ms_per_step']:.2f} ms/step under the profiler; {prof['what']} "
            f"{prof['busy_ms_per_step']:.2f} ms ({', '.join(parts)}); {idle_label} {prof[idle_key]:.2f} ms; "
            f"{ops.get('per_step', '?')} {ops.get('what', 'ops')} per step, {ops.get('per_layer_step', '?')} "
            f"per layer step")

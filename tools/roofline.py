"""Roofline model of one decode step, and which model fits which device: ``python -m dllm.tools.roofline``.

    python -m dllm.tools.roofline step --bench docs/bench-gpu-h100-llada8b-p1024.json --devices orin-nx-16gb
    python -m dllm.tools.roofline compare docs/bench-gpu-h100-llada8b-p1024.json --device h100-sxm
    python -m dllm.tools.roofline fit --model llada-8b --canvas 1280
    python -m dllm.tools.roofline measure --device-figures h100-sxm --json fig.json   # on a GPU
    python -m dllm.tools.roofline compare BENCH.json --device h100-sxm --figures fig.json

A step is a sequence of kernels; each takes max(bytes / bandwidth, FLOPs / tensor throughput), and the
step is their sum (a per-kernel roofline, no overlap between kernels). Per layer with ``r`` rows recomputed
over a canvas of ``N`` (the real row counts come from a ``dllm-bench`` JSON, ``methods.<m>.rows_per_layer``):

- the seven weight matrix products: the weight bytes once (quantized: integers plus scales) and
  2 * r * in * out FLOPs each;
- attention of the r rows over N keys: K and V of the whole canvas read once, 4 * r * N * H * hd FLOPs;
- the runtime's row traffic, memory only: gathering the r input rows, scattering the r rows of keys,
  values and residual deltas into their caches, and the residual update of every canvas row
  (read h and both delta caches, write h: 4 * N * D elements), which the runtime does every layer;
- the head on the block's rows (final norm + LM head) and the embedding gather of the canvas.

Assumptions, stated because they set the answer: achievable bandwidth and tensor throughput are the
device's figures times ``--bw-efficiency`` (0.9 by default: a 1 GiB device copy on an H100 moves
2.99 TB/s, 0.89 of its 3.35 TB/s) and ``--compute-efficiency`` (0.75 by default: LLaDA-8B's seven layer
matrix products at 1280 rows ran at 766 TFLOPS on an H100 in bf16, 0.77 of 989; ``measure`` reports both
on your GPU); activations are 2 bytes; kernels do not overlap and cost no launch time unless
``--kernel-overhead-us`` says otherwise (0 by default). ``--figures`` replaces these assumptions by what
``measure`` found on a GPU (copy bandwidth, the bandwidth of products with few rows, the throughput of
products with many, the cost of one more kernel in a CUDA graph, charged for every kernel the bench's
profile counted). Anything the model leaves out (normalization and RoPE kernels, casts, top-k and commit,
host time) shows up as the gap to the measurement, which ``compare`` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from pathlib import Path

from dllm.errors import ConfigError, DllmError
from dllm.spec import ModelSpec

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Device:
    """Public figures of a GPU or Jetson module: memory, its bandwidth, dense fp16/bf16 tensor throughput."""
    name: str
    memory_gb: float
    bandwidth_gb_s: float
    tensor_tflops: float          # dense fp16/bf16 tensor-core throughput
    reserve_gb: float             # memory the model cannot use (OS, CUDA and TensorRT runtime on unified memory)
    source: str                   # where the figures come from


# Orin (Ampere GA10B): dense fp16 tensor FLOPs = the GPU's sparse INT8 TOPS / 4 (sparse -> dense, INT8 ->
# FP16), i.e. SMs x 2048 FLOP/clock x GPU clock. Thor (Blackwell): dense fp16 = sparse FP4 / 8.
# Jetson memory is shared by CPU and GPU: the reserve is for Linux, the CUDA context and TensorRT's libraries.
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("orin-nano-8gb", 8, 102, 16.7, 2.0,
           "Orin Nano 8GB, JetPack 6.2 'super' mode: 8 SMs at 1020 MHz, LPDDR5 102 GB/s"),
    Device("orin-nx-16gb", 16, 102.4, 19.2, 2.0,
           "Orin NX 16GB, JetPack 6.2 'super' mode: 8 SMs at 1173 MHz, LPDDR5 102.4 GB/s"),
    Device("agx-orin-32gb", 32, 204.8, 26.7, 2.0,
           "AGX Orin 32GB: 14 SMs at 930 MHz, LPDDR5 204.8 GB/s"),
    Device("agx-orin-64gb", 64, 204.8, 42.5, 2.0,
           "AGX Orin 64GB: 16 SMs at 1.3 GHz (170 sparse INT8 TOPS), LPDDR5 204.8 GB/s"),
    Device("thor-t5000", 128, 273, 259, 2.5,
           "Jetson AGX Thor T5000: 2070 sparse FP4 TFLOPS, LPDDR5X 273 GB/s"),
    Device("h100-sxm", 80, 3350, 989, 1.0, "H100 SXM 80GB: HBM3 3.35 TB/s, 989 dense bf16 TFLOPS"),
    Device("h200", 141, 4800, 989, 1.0, "H200 141GB: HBM3e 4.8 TB/s, 989 dense bf16 TFLOPS"),
)}
JETSON = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb", "thor-t5000")


class Precision(str, enum.Enum):
    """Weight format of the layers (``dllm-export --dtype fp16`` alone, or with ``--quant``)."""
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    def weight_bytes(self, numel: int, in_dim: int, out_dim: int, block: int = 128) -> float:
        """Bytes of one quantized weight matrix: integers plus fp16 scales (per channel / per block)."""
        if self == Precision.FP16:
            return 2.0 * numel
        if self == Precision.INT8:
            return numel + 2.0 * out_dim
        return numel / 2 + 2.0 * out_dim * (in_dim // block)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    bw_efficiency: float = 0.9
    compute_efficiency: float = 0.75
    kernel_overhead_us: float = 0.0
    act_bytes: int = 2
    block: int = 128                   # int4 block
    quant_head: bool = False           # LM head (and embedding) quantized too
    # bandwidth efficiency of weight-bound matrix products with few rows (None: bw_efficiency); measured
    # products of 70 rows stream their weights slower than a plain copy does
    skinny_bw_efficiency: float | None = None
    skinny_rows: int = 256             # up to this many rows a product counts as skinny
    count_kernels: bool = False        # launch overhead per kernel the bench's profile counted, not per modelled one

    def __post_init__(self):
        for name in ("bw_efficiency", "compute_efficiency", "skinny_bw_efficiency"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if self.kernel_overhead_us < 0:
            raise ConfigError(f"--kernel-overhead-us must be >= 0, got {self.kernel_overhead_us}")


def matrices(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """(name, in, out) of one layer's weight matrices."""
    D, F, q, kv = spec.d_model, spec.mlp_hidden, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return [("q", D, q), ("k", D, kv), ("v", D, kv), ("o", q, D), ("gate", D, F), ("up", D, F), ("down", F, D)]


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Predicted time of one step and what it is made of."""
    ms: float
    weight_gb: float
    other_gb: float                      # KV reads, row traffic, residual updates, head activations
    tflop: float
    parts_ms: dict                       # {"matmul": .., "attention": .., "row traffic": .., "head": ..}

    def to_dict(self) -> dict:
        return {"ms": self.ms, "weight_gb": self.weight_gb, "other_gb": self.other_gb, "tflop": self.tflop,
                "parts_ms": self.parts_ms}


def step_cost(spec: ModelSpec, rows_per_layer: list[float], canvas: int, head_rows: int, device: Device,
              precision: Precision, a: Assumptions = Assumptions(), kernels: float | None = None) -> StepCost:
    """Roofline time of one step with ``rows_per_layer[l]`` rows recomputed in layer l over ``canvas`` positions.
    ``kernels``: the kernels a step really launches (a bench profile's count); with ``a.count_kernels`` the
    launch overhead is charged for each of them instead of for each modelled kernel."""
    if len(rows_per_layer) != spec.n_layers:
        raise ConfigError(f"rows_per_layer has {len(rows_per_layer)} entries, the model {spec.n_layers} layers")
    bw = device.bandwidth_gb_s * GB * a.bw_efficiency            # bytes/s
    skinny_bw = device.bandwidth_gb_s * GB * (a.skinny_bw_efficiency or a.bw_efficiency)
    peak = device.tensor_tflops * 1e12 * a.compute_efficiency    # FLOP/s
    per_kernel = a.kernel_overhead_us * 1e-6
    launch = 0.0 if (a.count_kernels and kernels) else per_kernel
    kernel = lambda nbytes, flops, b=bw: max(nbytes / b, flops / peak) + launch   # noqa: E731
    N, D, act = canvas, spec.d_model, a.act_bytes
    kv = spec.n_kv_heads * spec.head_dim
    parts = {"matmul": 0.0, "attention": 0.0, "row traffic": 0.0, "head": 0.0}
    weight = other = flops = 0.0
    for r in rows_per_layer:
        for _, i, o in matrices(spec):
            wb = precision.weight_bytes(i * o, i, o, a.block)
            io = r * (i + o) * act
            parts["matmul"] += kernel(wb + io, 2 * r * i * o, skinny_bw if r <= a.skinny_rows else bw)
            weight, other, flops = weight + wb, other + io, flops + 2 * r * i * o
        kv_bytes = 2 * N * kv * act
        attn_flops = 4 * r * N * spec.n_heads * spec.head_dim
        parts["attention"] += kernel(kv_bytes, attn_flops)
        rows = (r * D + r * (2 * kv + 2 * D)) * act           # gather input rows, scatter k, v, attn, mlp rows
        residual = 4 * N * D * act                             # h += attn_cache + mlp_cache over the canvas
        parts["row traffic"] += kernel(rows, 0) + kernel(residual, 0)
        other, flops = other + kv_bytes + rows + residual, flops + attn_flops
    head_prec = precision if a.quant_head else Precision.FP16
    head_w = head_prec.weight_bytes(spec.vocab_size * D, D, spec.vocab_size, a.block)
    head_io = head_rows * (D + spec.vocab_size) * act + N * D * act    # + the embedding gather of the canvas
    parts["head"] = kernel(head_w + head_io, 2 * head_rows * D * spec.vocab_size) + kernel(N * D * act, 0)
    weight, other, flops = weight + head_w, other + head_io, flops + 2 * head_rows * D * spec.vocab_size
    if a.count_kernels and kernels:
        parts["launches"] = kernels * per_kernel
    total = sum(parts.values())
    return StepCost(total * 1e3, weight / GB, other / GB, flops / 1e12, {k: v * 1e3 for k, v in parts.items()})


# -- memory fit -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Footprint:
    weights_gb: float
    caches_gb: float
    workspace_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.caches_gb + self.workspace_gb


def footprint(spec: ModelSpec, precision: Precision, canvas: int, gen_length: int, a: Assumptions = Assumptions()
              ) -> Footprint:
    """Device memory of a run: every weight, the runtime's per-canvas state, and the largest layer's scratch.

    Caches (per layer): keys and values [N, Hkv, hd] and the attention/MLP deltas [N, D]; plus the hidden
    state, the row buffers, the DCU input proxy [G, D] and the logits buffer [G + 1, V]. Workspace: the
    scratch of the largest engine at k = N (TensorRT shares one buffer across engines): the MLP's gate and
    up activations [N, F] and the fp32 attention scores [H, N, N].
    """
    D, L, N, act = spec.d_model, spec.n_layers, canvas, a.act_bytes
    kv = spec.n_kv_heads * spec.head_dim
    layer = sum(precision.weight_bytes(i * o, i, o, a.block) for _, i, o in matrices(spec)) + 2 * D * act
    outer = Precision.FP16 if not a.quant_head else precision
    embed_head = 2 * outer.weight_bytes(spec.vocab_size * D, D, spec.vocab_size, a.block) + D * act
    weights = L * layer + embed_head
    per_layer = (2 * N * kv + 2 * N * D + gen_length * D) * act
    state = (N * D + 2 * N * kv + 2 * N * D) * act + (gen_length + 1) * spec.vocab_size * act
    caches = L * per_layer + state
    workspace = 2 * N * spec.mlp_hidden * act + spec.n_heads * N * N * 4
    return Footprint(weights / GB, caches / GB, workspace / GB)


# -- inputs -----------------------------------------------------------------------------------------
def model_spec(name: str) -> ModelSpec:
    from dllm.tools.random_model import random_spec

    return random_spec(name)


def read_bench(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the bench report {path} ({e}); pass a dllm-bench --json file") from None
    if not str(report.get("schema", "")).startswith("dllm-bench") or "methods" not in report:
        raise ConfigError(f"{path} is not a dllm-bench report (no schema/methods keys)")
    return report


def bench_methods(report: dict) -> dict[str, dict]:
    """{method: {"rows": rows_per_layer, "canvas": N, "head_rows": block rows, "measured_ms": step ms}}."""
    decode = report["settings"]["decode"]
    out = {}
    for name, m in report["methods"].items():
        cfg = m.get("config", decode)
        ops = (m.get("profile") or {}).get("ops") or {}
        out[name] = {"rows": list(m["rows_per_layer"]), "canvas": round(m["canvas_len_mean"]),
                     "head_rows": min(cfg["block_length"], cfg["gen_length"]), "measured_ms": m["step_ms_mean"],
                     "steps": m["steps_mean"],
                     "kernels": ops.get("per_step") if ops.get("what") == "CUDA kernels" else None}
    return out


def bench_spec(report: dict) -> ModelSpec:
    return ModelSpec.from_dict(report["engine"]["model"])


# -- commands ---------------------------------------------------------------------------------------
def compare(report: dict, device: Device, a: Assumptions) -> list[dict]:
    """Predicted vs measured ms per step for every method of a bench report (its own device and dtype)."""
    spec = bench_spec(report)
    rows = []
    for name, m in bench_methods(report).items():
        cost = step_cost(spec, m["rows"], m["canvas"], m["head_rows"], device, Precision.FP16, a, m["kernels"])
        rows.append({"method": name, "predicted_ms": cost.ms, "measured_ms": m["measured_ms"],
                     "measured_over_predicted": m["measured_ms"] / cost.ms, **{"parts_ms": cost.parts_ms}})
    return rows


def step_table(report: dict, devices: list[Device], precisions: list[Precision], a: Assumptions) -> list[dict]:
    """Predicted ms per step for each device, precision and method, with the bench's real row counts."""
    spec = bench_spec(report)
    out = []
    for dev in devices:
        for prec in precisions:
            for name, m in bench_methods(report).items():
                cost = step_cost(spec, m["rows"], m["canvas"], m["head_rows"], dev, prec, a, m["kernels"])
                out.append({"device": dev.name, "precision": prec.value, "method": name, "ms": cost.ms,
                            "weight_gb": cost.weight_gb, "tflop": cost.tflop, "steps": m["steps"]})
    return out


def fit_table(spec: ModelSpec, canvas: int, gen_length: int, devices: list[Device], a: Assumptions) -> list[dict]:
    """Footprint per weight format (quantized ones with and without the head and embedding) and where it fits."""
    out = []
    formats = [(Precision.FP16, False)] + [(p, h) for p in (Precision.INT8, Precision.INT4) for h in (False, True)]
    for prec, head in formats:
        f = footprint(spec, prec, canvas, gen_length, dataclasses.replace(a, quant_head=head))
        label = prec.value + (" +head/embed" if head else "")
        out.append({"precision": label, "weights_gb": f.weights_gb, "caches_gb": f.caches_gb,
                    "workspace_gb": f.workspace_gb, "total_gb": f.total_gb,
                    "fits": {d.name: f.total_gb <= d.memory_gb - d.reserve_gb for d in devices}})
    return out


def measure(device_name: str, spec: ModelSpec, rows: tuple[int, ...] = (1280, 70), repeat: int = 20) -> dict:
    """Achieved copy bandwidth and bf16 matrix-product throughput of this GPU at the model's layer shapes,
    as fractions of ``device_name``'s figures (what --bw-efficiency and --compute-efficiency stand for)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("measure needs a CUDA GPU; on a CPU machine use the default efficiencies")
    dev = DEVICES[device_name]
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat / 1e3

    copy_s = timed(lambda: y.copy_(x))
    out = {"device": torch.cuda.get_device_name(0), "figures": dev.name,
           "copy_gb_s": 2 * x.numel() / copy_s / GB}
    out["bw_efficiency"] = out["copy_gb_s"] / dev.bandwidth_gb_s
    del x, y
    per_rows = {}
    for r in rows:
        secs = flops = nbytes = 0.0
        for _, i, o in matrices(spec):
            a_ = torch.randn(r, i, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(i, o, device="cuda", dtype=torch.bfloat16)
            secs += timed(lambda: a_ @ w)
            flops += 2 * r * i * o
            nbytes += 2 * (i * o + r * (i + o))
        per_rows[r] = {"layer_matmul_ms": secs * 1e3, "tflops": flops / secs / 1e12, "gb_s": nbytes / secs / GB,
                       "compute_efficiency": flops / secs / 1e12 / dev.tensor_tflops,
                       "bw_efficiency": nbytes / secs / GB / dev.bandwidth_gb_s}
    out["rows"] = per_rows
    # what one more kernel costs inside a CUDA graph (the runtime replays whole steps): n tiny dependent kernels
    n, t = 200, torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        t.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            t.add_(1)
    out["launch_us"] = timed(graph.replay) / n * 1e6
    return out


def figures_assumptions(path: Path, device: Device, base: Assumptions) -> Assumptions:
    """``base`` with the efficiencies and the per-kernel cost that ``measure --json`` found on a GPU: the copy's
    bandwidth for memory-bound kernels, the products' bandwidth at the fewest rows measured for skinny
    products, their throughput at the most rows for compute-bound ones, and the launch cost per kernel
    (charged for every kernel the bench's profile counted)."""
    try:
        fig = json.loads(Path(path).read_text())
        rows = {int(r): v for r, v in fig["rows"].items()}
        few, many = rows[min(rows)], rows[max(rows)]
        figures, launch = fig["figures"], fig["launch_us"]
        bw, skinny, compute = fig["bw_efficiency"], few["bw_efficiency"], many["compute_efficiency"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read measured figures from {path} ({e!r}); write them on the GPU with "
                          "python -m dllm.tools.roofline measure --json FILE") from None
    if figures != device.name:
        raise ConfigError(f"{path} holds efficiencies relative to {figures}'s figures; pass --device {figures} "
                          f"(or measure again with --device-figures {device.name})")
    return dataclasses.replace(base, bw_efficiency=min(bw, 1.0), compute_efficiency=min(compute, 1.0),
                               skinny_bw_efficiency=min(skinny, 1.0), skinny_rows=max(min(rows), 1) * 2,
                               kernel_overhead_us=launch, count_kernels=True)


def step_markdown(rows: list[dict]) -> str:
    """One line per device and precision, one column per method (ms per step), plus seconds per answer."""
    methods = list(dict.fromkeys(r["method"] for r in rows))       # "dcu@allocation=uniform" etc.
    steps = {r["method"]: r["steps"] for r in rows}
    lines = ["| device | weights | weights read (GB) | " + " | ".join(f"{m} ms/step" for m in methods)
             + " | " + " | ".join(f"{m} s/answer ({steps[m]:.0f} steps)" for m in methods) + " |",
             "|---" * (3 + 2 * len(methods)) + "|"]
    for dev, prec in dict.fromkeys((r["device"], r["precision"]) for r in rows):
        cells = {r["method"]: r for r in rows if (r["device"], r["precision"]) == (dev, prec)}
        lines.append(f"| {dev} | {prec} | {cells[methods[0]]['weight_gb']:.1f} | "
                     + " | ".join(f"{cells[m]['ms']:.1f}" for m in methods) + " | "
                     + " | ".join(f"{cells[m]['ms'] * cells[m]['steps'] / 1e3:.1f}" for m in methods) + " |")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------------
def _devices(names: str) -> list[Device]:
    out = []
    for n in names.split(","):
        if n.strip() not in DEVICES:
            raise ConfigError(f"unknown device {n.strip()!r}; known: {sorted(DEVICES)}")
        out.append(DEVICES[n.strip()])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dllm.tools.roofline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bw-efficiency", type=float, default=Assumptions.bw_efficiency)
    common.add_argument("--compute-efficiency", type=float, default=Assumptions.compute_efficiency)
    common.add_argument("--kernel-overhead-us", type=float, default=Assumptions.kernel_overhead_us)
    common.add_argument("--block", type=int, default=Assumptions.block, help="int4 block size")
    common.add_argument("--quant-head", action="store_true", help="the LM head and embedding quantized too")
    common.add_argument("--json", type=Path, metavar="OUT", help="also write the table as JSON")
    common.add_argument("--figures", type=Path, metavar="MEASURED.json",
                        help="efficiencies and per-kernel cost measured on the GPU (measure --json) instead of "
                             "the assumptions above; launch cost is then charged per kernel the bench profile counted")
    c = sub.add_parser("compare", parents=[common], help="predicted vs measured ms per step of a bench JSON")
    c.add_argument("bench", type=Path)
    c.add_argument("--device", default="h100-sxm", help=f"figures to predict with ({', '.join(DEVICES)})")
    s = sub.add_parser("step", parents=[common], help="predicted ms per step per device, precision and method")
    s.add_argument("--bench", type=Path, required=True, help="dllm-bench JSON with the real row counts")
    s.add_argument("--devices", default=",".join(JETSON))
    s.add_argument("--precisions", default=",".join(p.value for p in Precision))
    f = sub.add_parser("fit", parents=[common], help="which model and precision fits which device")
    f.add_argument("--model", default="llada-8b", help="llada-8b, dream-7b or a ModelSpec JSON")
    f.add_argument("--canvas", type=int, default=1280, help="prompt + generation length N")
    f.add_argument("--gen-length", type=int, default=256)
    f.add_argument("--devices", default=",".join(JETSON))
    m = sub.add_parser("measure", help="achieved bandwidth and bf16 GEMM throughput of this GPU")
    m.add_argument("--device-figures", default="h100-sxm", help="figures to divide by")
    m.add_argument("--model", default="llada-8b")
    m.add_argument("--rows", default="1280,70", help="row counts to time the layer's products at (default 1280,70)")
    m.add_argument("--json", type=Path, metavar="OUT")
    return p


def _assumptions(args) -> Assumptions:
    return Assumptions(bw_efficiency=args.bw_efficiency, compute_efficiency=args.compute_efficiency,
                       kernel_overhead_us=args.kernel_overhead_us, block=args.block, quant_head=args.quant_head)


def run(args) -> tuple[str, object]:
    """(printed text, JSON-ready result) of one command."""
    if args.command == "measure":
        try:
            rows = tuple(int(r) for r in args.rows.split(","))
        except ValueError:
            raise ConfigError(f"--rows {args.rows!r}: expected comma-separated row counts, e.g. 1280,70") from None
        result = measure(args.device_figures, model_spec(args.model), rows)
        lines = [f"{result['device']}: copy {result['copy_gb_s']:.0f} GB/s ({result['bw_efficiency']:.2f} of "
                 f"{result['figures']})"]
        lines += [f"  {r} rows: layer matmuls {v['layer_matmul_ms']:.3f} ms, {v['tflops']:.0f} TFLOPS "
                  f"({v['compute_efficiency']:.2f} of peak), {v['gb_s']:.0f} GB/s ({v['bw_efficiency']:.2f})"
                  for r, v in result["rows"].items()]
        lines.append(f"  one more kernel in a CUDA graph: {result['launch_us']:.2f} us")
        return "\n".join(lines), result
    a = _assumptions(args)
    device = _devices(args.device)[0] if args.command == "compare" else None
    if args.figures is not None:
        if device is None:
            raise ConfigError("--figures applies to compare: measured efficiencies belong to the GPU they were "
                              "measured on, not to the modules a step table predicts")
        a = figures_assumptions(args.figures, device, a)
    skinny = "" if a.skinny_bw_efficiency is None else \
        f" (products of <= {a.skinny_rows} rows x{a.skinny_bw_efficiency:.2f})"
    launches = "per kernel of the bench's profile" if a.count_kernels else "per modelled kernel"
    head = (f"assumptions{' (measured: ' + str(args.figures) + ')' if args.figures else ''}: bandwidth "
            f"x{a.bw_efficiency:.2f}{skinny}, tensor throughput x{a.compute_efficiency:.2f}, "
            f"{a.kernel_overhead_us:.2f} us {launches}, int4 block {a.block}, head/embedding "
            f"{'quantized' if a.quant_head else 'fp16'}")
    if args.command == "compare":
        rows = compare(read_bench(args.bench), device, a)
        lines = [head, f"{'method':<30} {'predicted ms':>12} {'measured ms':>12} {'measured/predicted':>19}"]
        lines += [f"{r['method']:<30} {r['predicted_ms']:>12.2f} {r['measured_ms']:>12.2f} "
                  f"{r['measured_over_predicted']:>18.2f}x" for r in rows]
        return "\n".join(lines), rows
    if args.command == "step":
        precisions = [Precision(p.strip()) for p in args.precisions.split(",")]
        rows = step_table(read_bench(args.bench), _devices(args.devices), precisions, a)
        return head + "\n" + step_markdown(rows), rows
    devices = _devices(args.devices)
    rows = fit_table(model_spec(args.model), args.canvas, args.gen_length, devices, a)
    lines = [head, f"model {args.model}, canvas {args.canvas} (gen {args.gen_length}); GB = 1e9 bytes",
             "| weights | weights GB | caches GB | workspace GB | total GB | "
             + " | ".join(f"{d.name} ({d.memory_gb - d.reserve_gb:g} GB usable)" for d in devices) + " |",
             "|---" * (5 + len(devices)) + "|"]
    lines += [f"| {r['precision']} | {r['weights_gb']:.2f} | {r['caches_gb']:.2f} | {r['workspace_gb']:.2f} | "
              f"{r['total_gb']:.2f} | " + " | ".join("yes" if r["fits"][d.name] else "no" for d in devices) + " |"
              for r in rows]
    return "\n".join(lines), rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text, result = run(args)
    except DllmError as e:
        print(f"roofline: {e}", file=sys.stderr)
        return 2
    print(text)
    if getattr(args, "json", None):
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

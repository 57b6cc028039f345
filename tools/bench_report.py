"""``dllm-bench`` reporting: machine facts, memory probes, the GPU weight-read floor, the table and the plot.

Nothing here decodes; ``dllm.tools.bench`` measures and hands plain dicts to these functions.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from pathlib import Path


# -- machine ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    """CPU, cores, load, GPU and library versions: enough to tell two reports' machines apart."""
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpu_capability=f"{props.major}.{props.minor}")
    return info


def command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["dllm-bench", *args])


# -- memory -------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory over a span: process RSS (Linux: VmHWM, reset through clear_refs) and, on CUDA,
    torch's peak allocated bytes. Elsewhere the RSS figure is the process lifetime peak (ru_maxrss)."""

    def __init__(self, device):
        self.device = device
        self.rss_resettable = None

    def reset(self) -> None:
        import torch

        if self.rss_resettable is not False:
            try:
                Path("/proc/self/clear_refs").write_text("5")   # "5": reset the peak RSS (Linux >= 4.0)
                self.rss_resettable = True
            except OSError:
                self.rss_resettable = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict:
        import torch

        out = {"peak_rss_mb": round(self._peak_rss_bytes() / 2**20, 1),
               "peak_rss_scope": "span" if self.rss_resettable else "process"}
        if self.device.type == "cuda":
            out["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out

    def _peak_rss_bytes(self) -> int:
        if self.rss_resettable:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            except OSError:
                pass
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024


# -- GPU floor ----------------------------------------------------------------------------------------
def copy_bandwidth(device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write bytes over time) of a ``nbytes`` device-to-device copy."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                                           # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * iters / seconds


def weight_read_floor(weight_bytes: int, device) -> dict:
    """Time to read every weight once at the measured copy bandwidth: a lower bound for one full step."""
    bw = copy_bandwidth(device)
    return {"weight_bytes_per_step": weight_bytes, "copy_bandwidth_gb_s": round(bw / 1e9, 1),
            "floor_ms": round(weight_bytes / bw * 1e3, 3),
            "how": "weights of every layer + final norm + LM head (embedding gather left out) / "
                   "device-to-device copy bandwidth of a 1 GiB torch copy (read + write bytes)"}


# -- numbers ------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- table --------------------------------------------------------------------------------------------
_COLUMNS = [("method", "{}", "method"), ("latency ms", "{:.1f}", "latency_ms_mean"),
            ("1st token ms", "{:.1f}", "first_token_ms_mean"), ("tok/s", "{:.1f}", "tokens_per_s"),
            ("canvas tok/s", "{:.0f}", "canvas_tokens_per_s"), ("speedup", "{:.2f}x", "speedup"),
            ("steps", "{:.1f}", "steps_mean"),
            ("step ms", "{:.2f}", "step_ms_mean"), ("p50", "{:.2f}", "step_ms_p50"), ("p90", "{:.2f}", "step_ms_p90"),
            ("engine ms/step", "{:.2f}", "engine_ms_per_step"), ("rows/layer", "{:.1f}", "rows_per_layer_mean"),
            ("agree", "{:.3f}", "token_agreement"), ("exact", "{:.3f}", "exact_match"),
            ("peak MB", "{:.0f}", "peak_mb")]


def format_table(methods: dict[str, dict]) -> str:
    """A plain-text table of the per-method results (markdown-compatible). ``tok/s`` counts answer tokens
    (before the first EOS); ``canvas tok/s`` every generated position."""
    rows = []
    for name, m in methods.items():
        row = []
        for _, fmt, key in _COLUMNS:
            v = name if key == "method" else m.get(key)
            if key == "peak_mb":
                v = m.get("gpu_max_allocated_mb", m.get("peak_rss_mb"))
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    head = [c[0] for c in _COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"   # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


# -- plot ---------------------------------------------------------------------------------------------
def _latency(m: dict) -> tuple[float, float, float]:
    """(mean latency ms, how far the fastest round was below it, how far the slowest above it); older
    reports without per-round numbers get no spread."""
    mean = m.get("latency_ms_mean", m.get("wall_ms_per_generation", 0.0))
    rounds = m.get("latency_ms_per_round") or [mean]
    return mean, max(0.0, mean - min(rounds)), max(0.0, max(rounds) - mean)


def plot(report: dict, path: str | os.PathLike) -> Path:
    """One report figure: latency per generation (with the spread over rounds and the speedup over ``full``),
    steps per generation, accuracy against ``full``, and rows recomputed per layer. 1800 x 1275 px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    names = list(methods)
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    ys = list(range(len(names)))[::-1]                  # first method on top
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=150, gridspec_kw={"hspace": 0.6, "wspace": 0.45})
    (ax_lat, ax_steps), (ax_acc, ax_rows) = axes

    means, below, above = zip(*(_latency(methods[n]) for n in names))
    spread = any(below) or any(above)         # reports without per-round latencies draw no whiskers
    ax_lat.barh(ys, means, xerr=[below, above] if spread else None, color=[colors[n] for n in names], capsize=3,
                height=0.6, error_kw={"elinewidth": 1})
    for y, n, v, e in zip(ys, names, means, above):
        x = methods[n].get("speedup", 1.0)
        when = f"{v / 1e3:.3g} s" if v >= 1e3 else f"{v:.3g} ms"
        ax_lat.text(v + e, y, f"  {when}, {x:.2f}x" if x < 10 else f"  {when}, {x:.1f}x", va="center",
                    fontsize=8)
    ax_lat.set_xscale("log")
    ax_lat.set_xlim(min(m - b for m, b in zip(means, below)) / 2, max(m + a for m, a in zip(means, above)) * 15)
    ax_lat.set_xlabel("latency per generation (ms, log scale" + ("; whiskers: fastest to slowest round)"
                                                                  if spread else ")"))
    ax_lat.set_title("latency (x = speedup over full)", fontsize=10)

    steps = [methods[n].get("steps_mean", 0.0) for n in names]
    ax_steps.barh(ys, steps, color=[colors[n] for n in names], height=0.6)
    for y, v, n in zip(ys, steps, names):
        ax_steps.text(v, y, f"  {v:.1f} ({methods[n].get('tokens_per_step', 0.0):.1f} tok/step)", va="center",
                      fontsize=8)
    ax_steps.set_xlim(0, max(steps) * 1.6)
    ax_steps.set_xlabel("decoding steps (model forwards) per generation")
    ax_steps.set_title("steps per generation: what explains the latency", fontsize=10)

    keys = [("token_agreement", "tokens equal to full's", None)]
    if any(methods[n].get("exact_match") is not None for n in names):
        keys.append(("exact_match", "answers correct", "//"))
    from matplotlib.patches import Patch

    height = 0.8 / len(keys)
    handles = []
    for j, (key, label, hatch) in enumerate(keys):
        handles.append(Patch(facecolor="white" if hatch else "0.6", edgecolor="0.3", hatch=hatch, label=label))
        offs = [y + (len(keys) - 1) / 2 * height - j * height for y in ys]
        vals = [100 * (methods[n].get(key) or 0.0) for n in names]
        ax_acc.barh(offs, vals, height, label=label, color="white" if hatch else [colors[n] for n in names],
                    edgecolor=[colors[n] for n in names], hatch=hatch)
        for o, v in zip(offs, vals):
            ax_acc.text(v, o, f" {v:.0f}%", va="center", fontsize=7)
    ax_acc.set_xlim(0, 118)
    ax_acc.set_xlabel("percent")
    ax_acc.set_title("same tokens as full, and correct answers", fontsize=10)
    ax_acc.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(keys),
                  frameon=False)

    labels = [n.replace("@", "\n@") for n in names]      # per-method overrides on a second line
    for ax in (ax_lat, ax_steps, ax_acc):
        ax.set_yticks(ys, labels, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)

    for n in names:
        prof = methods[n].get("rows_per_layer") or []
        ax_rows.plot(range(len(prof)), prof, marker="o", ms=3, label=n, color=colors[n])
    ax_rows.set_xlabel("layer")
    ax_rows.xaxis.get_major_locator().set_params(integer=True)
    ax_rows.set_ylabel("rows recomputed per step")
    ax_rows.set_ylim(bottom=0)
    ax_rows.grid(alpha=0.3)
    ax_rows.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax_rows.set_title("rows recomputed per layer (mean over steps)", fontsize=10)

    settings = report["settings"]
    src = report["engine"].get("engine_dir") or f"random {report['engine'].get('random_weights')}"
    threads = settings.get("threads")
    fig.suptitle(f"{Path(str(src)).name}: {settings['backend']} on {settings['device']}"
                 f"{f', {threads} thread' + ('s' if threads != 1 else '') if threads else ''}, gen length {settings['decode']['gen_length']}, "
                 f"{settings['num_prompts']} prompts x {settings['repeat']} rounds", fontsize=11)
    fig.subplots_adjust(left=0.16, right=0.97, top=0.9, bottom=0.17)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

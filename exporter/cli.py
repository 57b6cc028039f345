"""``dllm-export CHECKPOINT -o OUT_DIR``: flags -> ExportConfig -> export_checkpoint, with progress and a summary.

CHECKPOINT is a checkpoint directory or a Hugging Face repo id (``GSAI-ML/LLaDA-8B-Instruct``), which
``dllm.exporter.hub`` resolves through huggingface_hub (downloaded, or from the local cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dllm.cli import Progress, add_choice, add_common
from dllm.cli_common import Parser, run_cli
from dllm.exporter.quant_config import DEFAULT_BLOCK_SIZE, DEFAULT_CALIB_SAMPLES, TASKS_SOURCE, QuantBits, QuantMethod

# The choices, spelled here so that --help needs no torch (a test checks them against DType and ExportBackend).
DTYPES = ("fp32", "fp16", "bf16")
BACKENDS = ("onnx", "tensorrt")
DEFAULT_MAX_SEQ_LEN = 2048    # = dllm.exporter.config.DEFAULT_MAX_SEQ_LEN
DEFAULT_OPT_ROWS = 32         # = dllm.exporter.config.DEFAULT_OPT_ROWS
DEFAULT_MAX_BATCH = 8         # = dllm.exporter.config.DEFAULT_MAX_BATCH


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dllm-export",
        description="Export a LLaDA or Dream checkpoint (Hugging Face layout) to an engine directory: per-layer "
                    "ONNX subgraphs with dynamic row count k and canvas length N, validated against PyTorch, "
                    "optionally built into TensorRT plans.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint directory (config.json, *.safetensors, tokenizer files) or a Hugging Face repo "
                        "id such as GSAI-ML/LLaDA-8B-Instruct (downloaded, or read from the local cache with "
                        "HF_HUB_OFFLINE=1)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR",
                   help="engine directory to write (replaced atomically; unchanged subgraphs are reused)")
    add_choice(p, "--dtype", DTYPES, default="fp32",
               help="dtype of weights and activations in the graphs (fp32 suits ONNX Runtime's CPU provider, which "
                    "runs it fastest and has no bf16 MatMul; use bf16 or fp16 for GPUs and TensorRT)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help=f"largest canvas length N the engines serve (default: the model's limit, at most "
                        f"{DEFAULT_MAX_SEQ_LEN})")
    add_choice(p, "--backend", BACKENDS, default="onnx",
               help="onnx: ONNX files only; tensorrt: also build TensorRT plans for this machine with the "
                    "installed tensorrt or tensorrt_rtx module")
    p.add_argument("--opt-rows", type=int, default=DEFAULT_OPT_ROWS, metavar="K",
                   help=f"rows recomputed per cached step that TensorRT optimizes for (default {DEFAULT_OPT_ROWS})")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="B",
                   help=f"most sequences decoded together in one step (prompts of different lengths share a batch "
                        f"by right padding); sets the TensorRT profiles' batch range and is recorded in the manifest "
                        f"(default {DEFAULT_MAX_BATCH}; larger batches need more TensorRT scratch memory)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime vs PyTorch parity check of every subgraph")
    p.add_argument("--no-vproj", dest="with_vproj", action="store_false",
                   help="do not export the vproj_i value probes (only needed by value-based change scores)")
    q = p.add_argument_group("weight-only quantization (needs the quant extra: pip install 'dllm-deploy[quant]')")
    q.add_argument("--quant", choices=[b.value for b in QuantBits], default=None,
                   help="quantize the layers' weights: int8 (per output channel) or int4 (block-wise); "
                        "activations, the embedding and the LM head stay in --dtype (fp32 or fp16)")
    q.add_argument("--quant-method", choices=[m.value for m in QuantMethod], default=QuantMethod.AWQ.value,
                   help="awq: activation-aware scales searched on --calib prompts (default); rtn: round to nearest")
    q.add_argument("--quant-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="B",
                   help=f"int4 block along the input dim; must divide d_model and the MLP width "
                        f"(default {DEFAULT_BLOCK_SIZE})")
    q.add_argument("--calib", metavar="SOURCE", default=None,
                   help=f"calibration prompts: '{TASKS_SOURCE}' (dllm.tools.tasks, the default for the shipped "
                        "model), a text file (one sample per line) or a JSONL file")
    q.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, metavar="N",
                   help=f"calibration samples (default {DEFAULT_CALIB_SAMPLES}; a few more are held out to "
                        "measure the error)")
    q.add_argument("--quant-head", action="store_true", help="also quantize the LM head")
    q.add_argument("--quant-embed", action="store_true", help="also quantize the embedding table")
    add_common(p, threads_for="of PyTorch while tracing and validating the subgraphs", gpu_note="",
               threads_default="1")
    return p


class _Progress:
    """Progress per stage (a bar on a terminal, one line per subgraph in logs) and what was reused."""

    def __init__(self):
        self.display = Progress()
        self.counts: dict[tuple[str, str], int] = {}     # (stage, status) -> subgraphs

    def __call__(self, event) -> None:
        from dllm.exporter.export import Status

        done = event.status != Status.START
        if done:
            key = (event.stage.value, event.status.value)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.display.update(event.stage.value, event.total, event.name, event.status.value, done)

    def reused(self, stage: str) -> tuple[int, int]:
        """(made, reused) subgraphs of ``stage``."""
        return self.counts.get((stage, "done"), 0), self.counts.get((stage, "skipped"), 0)

    def close(self) -> None:
        self.display.close()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary(out: Path, progress: _Progress | None = None) -> str:
    """Files, sizes, validation results and build times of an engine directory (and, given the export's
    progress, how many subgraphs and plans were made and how many reused from an earlier export)."""
    from dllm.exporter.manifest import read_manifest

    m = read_manifest(out)
    files = [p for p in out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    lines = [f"wrote {out}: {len(files)} files, {_size(total)}",
             f"  model {m.model.arch.value}, {m.model.n_layers} layers, dtype {m.dtype}, max_seq_len {m.max_seq_len}, "
             f"max_batch {m.max_batch}"]
    onnx = [out / s.onnx for s in m.subgraphs]
    onnx_size = sum(p.stat().st_size + p.with_name(p.name + ".data").stat().st_size for p in onnx)
    made = ""
    if progress is not None:
        exported, reused = progress.reused("export")
        made = f" ({exported} exported, {reused} reused unchanged)"
    lines.append(f"  onnx/: {len(onnx)} subgraphs, {_size(onnx_size)}{made}")
    if m.generation:
        g = m.generation
        lines.append(f"  generation defaults ({g.get('source') or 'none found'}): gen length {g.get('gen_length')}, "
                     f"block {g.get('block_length')}, steps {g.get('steps')}, chat {'on' if g.get('chat') else 'off'}")
    validation = m.build.get("validation") or {}
    if validation:
        checks = sorted({v["check"] for v in validation.values()})
        worst = max((o["max_abs_err"] / o["tolerance"], name, out_name)
                    for name, v in validation.items() for out_name, o in v["outputs"].items())
        failed = [n for n, v in validation.items() if not v["passed"]]
        lines.append(f"  validation ({', '.join(checks)}): {len(validation) - len(failed)}/{len(validation)} "
                     f"subgraphs passed; worst output {worst[1]}.{worst[2]} at {worst[0]:.2f} of its tolerance")
    else:
        lines.append("  validation: skipped (--no-validate)")
    from dllm.exporter.quant import quant_summary

    lines += quant_summary(m.quantization, validation)
    for tag, plans in m.plans.items():
        times = [p.get("build_s") or 0.0 for p in plans.values()]
        size = sum((out / p["file"]).stat().st_size for p in plans.values())
        built = ""
        if progress is not None:
            made_plans, reused_plans = progress.reused("build")
            built = f", {made_plans} built, {reused_plans} reused"
        lines.append(f"  plans/{tag}/: {len(plans)} plans, {_size(size)}, build {sum(times):.1f} s "
                     f"(slowest {max(times):.1f} s){built}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    bars = _Progress()

    def body() -> None:
        from dllm.exporter.config import ExportConfig
        from dllm.exporter.export import export_checkpoint
        from dllm.exporter.hub import resolve_checkpoint
        from dllm.exporter.quant_config import QuantConfig
        from dllm.threads import resolve_threads, torch_threads

        try:
            checkpoint = resolve_checkpoint(args.checkpoint, log=lambda msg: print(msg, file=sys.stderr, flush=True))
            quant = None if args.quant is None else QuantConfig(
                bits=args.quant, method=args.quant_method, block_size=args.quant_block_size, calib=args.calib,
                calib_samples=args.calib_samples, head=args.quant_head, embed=args.quant_embed)
            cfg = ExportConfig(checkpoint=checkpoint, out_dir=args.out, dtype=args.dtype,
                               max_seq_len=args.max_seq_len, backend=args.backend, opt_rows=args.opt_rows,
                               max_batch=args.max_batch, validate=args.validate, with_vproj=args.with_vproj,
                               quant=quant)
            with torch_threads(resolve_threads(args.threads, "torch")):
                out = export_checkpoint(cfg, progress=bars)
        finally:
            bars.close()
        print(summary(out, bars))

    return run_cli("dllm-export", body, interrupted_hint="finished subgraphs are kept; run the same command again "
                                                         "to resume")


if __name__ == "__main__":
    sys.exit(main())

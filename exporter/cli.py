"""``dllm-export CHECKPOINT_DIR -o OUT_DIR``: flags -> ExportConfig -> export_checkpoint, with progress and a summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dllm.errors import DllmError
from dllm.exporter.config import DEFAULT_MAX_SEQ_LEN, DEFAULT_OPT_ROWS, ExportBackend, ExportConfig
from dllm.exporter.quant_config import (DEFAULT_BLOCK_SIZE, DEFAULT_CALIB_SAMPLES, TASKS_SOURCE, QuantBits,
                                        QuantConfig, QuantMethod)
from dllm.exporter.subgraphs import DType

EXIT_ERROR = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dllm-export",
        description="Export a LLaDA or Dream checkpoint (Hugging Face layout) to an engine directory: per-layer "
                    "ONNX subgraphs with dynamic row count k and canvas length N, validated against PyTorch, "
                    "optionally built into TensorRT plans.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR",
                   help="directory with config.json, *.safetensors and tokenizer files")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR",
                   help="engine directory to write (replaced atomically; unchanged subgraphs are reused)")
    p.add_argument("--dtype", choices=[d.value for d in DType], default=DType.FP32.value,
                   help="dtype of weights and activations in the graphs (default fp32: ONNX Runtime's CPU "
                        "provider runs fp32 fastest and has no bf16 MatMul; use bf16 or fp16 for GPUs and TensorRT)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help=f"largest canvas length N the engines serve (default: the model's limit, at most "
                        f"{DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--backend", choices=[b.value for b in ExportBackend], default=ExportBackend.ONNX.value,
                   help="onnx: ONNX files only (default); tensorrt: also build TensorRT plans for this machine "
                        "with the installed tensorrt or tensorrt_rtx module")
    p.add_argument("--opt-rows", type=int, default=DEFAULT_OPT_ROWS, metavar="K",
                   help=f"rows recomputed per cached step that TensorRT optimizes for (default {DEFAULT_OPT_ROWS})")
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
    return p


class _Bars:
    """One tqdm bar per stage on stderr, advanced per subgraph."""

    def __init__(self):
        self.bars = {}

    def __call__(self, event) -> None:
        from tqdm import tqdm

        from dllm.exporter.export import Status

        bar = self.bars.get(event.stage)
        if bar is None:
            bar = self.bars[event.stage] = tqdm(total=event.total, desc=event.stage.value, unit="subgraph",
                                                file=sys.stderr, leave=True, dynamic_ncols=True)
        if event.status == Status.START:
            bar.set_postfix_str(event.name)
        else:
            bar.set_postfix_str(f"{event.name} {event.status.value}")
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary(out: Path) -> str:
    """Files, sizes, validation results and build times of an engine directory."""
    from dllm.exporter.manifest import read_manifest

    m = read_manifest(out)
    files = [p for p in out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    lines = [f"wrote {out}: {len(files)} files, {_size(total)}",
             f"  model {m.model.arch.value}, {m.model.n_layers} layers, dtype {m.dtype}, max_seq_len {m.max_seq_len}"]
    onnx = [out / s.onnx for s in m.subgraphs]
    onnx_size = sum(p.stat().st_size + p.with_name(p.name + ".data").stat().st_size for p in onnx)
    lines.append(f"  onnx/: {len(onnx)} subgraphs, {_size(onnx_size)}")
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
        lines.append(f"  plans/{tag}/: {len(plans)} plans, {_size(size)}, build {sum(times):.1f} s "
                     f"(slowest {max(times):.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    bars = _Bars()
    try:
        from dllm.exporter.export import export_checkpoint

        quant = None if args.quant is None else QuantConfig(
            bits=args.quant, method=args.quant_method, block_size=args.quant_block_size, calib=args.calib,
            calib_samples=args.calib_samples, head=args.quant_head, embed=args.quant_embed)
        cfg = ExportConfig(checkpoint=args.checkpoint, out_dir=args.out, dtype=args.dtype,
                           max_seq_len=args.max_seq_len, backend=args.backend, opt_rows=args.opt_rows,
                           validate=args.validate, with_vproj=args.with_vproj, quant=quant)
        out = export_checkpoint(cfg, progress=bars)
        bars.close()
        print(summary(out))
    except DllmError as e:
        bars.close()
        print(f"dllm-export: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())

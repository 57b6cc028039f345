"""dllm-demo: the README's main command. Export the shipped model, answer a prompt fast and slow.

    dllm-demo                                   # export to ./dllm-demo-engine (reused), ask the default question
    dllm-demo --prompt "Sort: 5 12 9 1"

1. export the shipped small model (``tools/assets/tiny-llada``) to an engine directory; the exporter is
   resumable, so a second run reuses the files;
2. load it on the default backend, ONNX Runtime on the CPU (``Pipeline.from_dir``);
3. answer the prompt with DCU + APD and with the reference decoding (``full`` + ``schedule``, one token
   per step), alternating, and print both answers, their tokens/s and the speedup.

Without the shipped model (a source checkout where it has not been trained yet) the demo says so and
uses a tiny random checkpoint instead: the answers are then noise, the mechanics and timings are real.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from dllm.cli import add_common
from dllm.cli_common import Parser, run_cli
from dllm.errors import DllmError

DEFAULT_PROMPT = "What is 47+38?"            # inside every trained operand range (the answer is 85)
FAST, REFERENCE = "dcu+apd", "full"


@dataclasses.dataclass(frozen=True)
class Answer:
    method: str
    text: str
    steps: int
    latency_ms: float          # median over the timed runs
    tokens_per_s: float        # answer tokens (before the first EOS) / latency, median over the timed runs


def shipped_checkpoint() -> Path | None:
    """The shipped model's checkpoint directory, or None when it is not there."""
    try:
        from dllm.tools.assets import shipped_model_dir
        path = Path(shipped_model_dir())
    except (ImportError, AttributeError, DllmError, OSError):
        path = Path(__file__).resolve().parent / "assets" / "tiny-llada"
    return path if (path / "config.json").is_file() else None


def export(checkpoint: Path, out: Path, log) -> Path:
    """Export (or reuse) ``checkpoint`` into ``out``; prints one line per subgraph state."""
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import Stage, Status, export_checkpoint

    counts = {Status.DONE: 0, Status.SKIPPED: 0}

    def progress(event):
        if event.stage == Stage.EXPORT and event.status in counts:
            counts[event.status] += 1

    path = export_checkpoint(ExportConfig(checkpoint, out), progress)
    log(f"[demo] engine directory {out}: {counts[Status.DONE]} subgraphs exported, "
        f"{counts[Status.SKIPPED]} reused")
    return path


def answer(pipe, prompt, configs: dict, repeat: int) -> dict[str, Answer]:
    """Each method once to warm up, then ``repeat`` alternating timed runs; the median latency."""
    latency: dict[str, list[float]] = {m: [] for m in configs}
    speeds: dict[str, list[float]] = {m: [] for m in configs}
    results = {m: pipe.generate(prompt, c) for m, c in configs.items()}   # warm-up (sessions, buffers)
    for r in range(repeat):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for m in order:
            results[m] = pipe.generate(prompt, configs[m])
            latency[m].append(results[m].latency_s * 1e3)
            speeds[m].append(results[m].tokens_per_second)
    return {m: Answer(m, results[m].text if results[m].text is not None else " ".join(map(str, results[m].ids)),
                      results[m].steps, statistics.median(latency[m]), statistics.median(speeds[m]))
            for m in configs}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dllm-demo", description="Export the shipped small diffusion LM and answer a prompt with "
               "DCU + APD next to the reference decoding.")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question to ask (default {DEFAULT_PROMPT!r}; the "
                   "shipped model knows two-digit additions and sorting a few two-digit numbers)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, not as a chat message")
    p.add_argument("--engine-dir", default="dllm-demo-engine", metavar="DIR",
                   help="where to export (reused if present; default dllm-demo-engine)")
    p.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory instead of the shipped model")
    p.add_argument("--gen-length", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--block-length", type=int, default=32, metavar="N", help="block size (default 32)")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="timed runs per method (default 3)")
    add_common(p)
    return p


def run(args: argparse.Namespace, log=print) -> dict[str, Answer]:
    from dllm.runtime import DecodeConfig, Pipeline, method_config

    base = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length)
    configs = {REFERENCE: method_config(REFERENCE, base), FAST: method_config(FAST, base)}
    with tempfile.TemporaryDirectory(prefix="dllm-demo-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
        if checkpoint is None:
            from dllm.exporter.models.writer import write_tiny_checkpoint

            log("[demo] note: the shipped model (tools/assets/tiny-llada) is not in this install; using a tiny "
                "RANDOM checkpoint instead: its answers are noise, the export, loading and timings are real")
            checkpoint = write_tiny_checkpoint(Path(tmp) / "random-tiny", "llada", n_layers=2, d_model=64)
        engine_dir = export(checkpoint, Path(args.engine_dir), log)
    pipe = Pipeline.from_dir(engine_dir, backend="onnxruntime", device="cpu", threads=args.threads)
    prompt = args.prompt if args.no_chat else [{"role": "user", "content": args.prompt}]
    answers = answer(pipe, prompt, configs, args.repeat)
    ref, fast = answers[REFERENCE], answers[FAST]
    print(f"prompt: {args.prompt}")
    width = max(len(repr(a.text)) for a in answers.values())
    print(f"  {'method':<16} {'answer':<{width}} {'steps':>5} {'latency ms':>10} {'tokens/s':>9}")
    for label, a in (("full (reference)", ref), ("dcu + apd", fast)):
        print(f"  {label:<16} {a.text!r:<{width}} {a.steps:>5} {a.latency_ms:>10.1f} {a.tokens_per_s:>9.1f}")
    same = "same answer" if ref.text == fast.text else "answers differ"
    print(f"speedup of dcu+apd over full: {ref.latency_ms / fast.latency_ms:.2f}x ({same}; ONNX Runtime CPU, "
          f"{pipe.engines.threads} threads, gen {args.gen_length}, median of {args.repeat}; tokens/s counts the "
          "answer's tokens, before the first EOS)")
    return answers


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))

    return run_cli("dllm-demo", body)


if __name__ == "__main__":
    sys.exit(main())

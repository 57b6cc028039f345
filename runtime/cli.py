"""dllm-run: decode from an engine directory (or, with --backend torch, a checkpoint directory).

Thin: flags -> DecodeConfig -> Pipeline.generate / Pipeline.stream. Each decoding flag maps onto
the DecodeConfig field of the same name (``--gen-length`` -> ``gen_length``).

    dllm-run out/ --prompt "Hello" --cache dcu --commit apd --gen-length 64 --block-length 16
    dllm-run out/ --prompt-ids 1,2,3 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dllm.cli_common import Parser, run_cli
from dllm.errors import ConfigError

# flag -> DecodeConfig field; type; help
_FIELDS = [
    ("--gen-length", int, "tokens to generate (default 256)"),
    ("--block-length", int, "block size; gen-length must be a multiple (default 32)"),
    ("--steps", int, "schedule commit: steps over the whole generation (default 256)"),
    ("--cache", str, "full | prefix | dual | dllm-cache | dcu | dcu-reference (default full)"),
    ("--commit", str, "schedule | threshold | factor | apd (default schedule)"),
    ("--budget", int, "dcu: rows per layer per step on average (default 32)"),
    ("--window", int, "dcu: forced rows around the last committed token (default 32)"),
    ("--proxy", str, "dcu change score: input | value (default input)"),
    ("--allocation", str, "dcu budget split: proportional | softmax | uniform (default proportional)"),
    ("--softmax-temp", float, "dcu softmax allocation temperature (default 200)"),
    ("--refresh-interval", int, "dcu: full refresh every K steps (default: first step only)"),
    ("--prompt-interval", int, "dllm-cache/dcu: prompt refresh every K steps (default 5000)"),
    ("--gen-interval", int, "dllm-cache/dcu: gen refresh every K steps (default 5000)"),
    ("--rho", float, "dllm-cache: fraction of gen rows partially updated (default 0.25)"),
    ("--threshold", float, "threshold commit: confidence to commit (default 0.9)"),
    ("--factor", float, "factor commit: f in 1 - f/(n+1) (default 1.0)"),
    ("--apd-mode", str, "apd: global | per-token (default per-token)"),
    ("--tau0", float, "apd: initial threshold (default 0.9)"),
    ("--alpha", float, "apd: confidence step (default 0.01)"),
    ("--beta", float, "apd: instability step (default 0.15)"),
    ("--tau-min", float, "apd: clamp threshold from below (default off)"),
    ("--tau-max", float, "apd: clamp threshold from above (default off)"),
    ("--remasking", str, "low_confidence | random (default low_confidence)"),
    ("--alg", str, "Dream schedule confidence: maskgit_plus | topk_margin | entropy | origin"),
    ("--alg-temp", float, "Dream schedule: > 0 draws the committed positions from softmax(conf/alg-temp) "
                          "(default 0)"),
    ("--eps", float, "Dream schedule: last timestep (default 1e-3)"),
    ("--temperature", float, "sampling temperature, 0 = greedy (default 0)"),
    ("--top-p", float, "sample from the smallest token set with this mass (default off)"),
    ("--top-k", int, "sample from the k most likely tokens (default off; Dream's own code uses 50)"),
    ("--cfg-scale", float, "classifier-free guidance scale, prompt masked in the second pass (default 0 = off)"),
    ("--seed", int, "random seed (default 0)"),
]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dllm-run", description="Generate with a diffusion LLM from an engine directory.")
    p.add_argument("engine_dir", help="engine directory from dllm-export (or a checkpoint directory with "
                                      "--backend torch)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the engine directory's tokenizer)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma separated: 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    p.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    for flag, typ, help_ in _FIELDS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--apd-block-reset", action="store_true", default=None, help="apd: reset tau at each block")
    p.add_argument("--verify", action="store_true",
                   help="hash every file of the engine directory against its manifest before loading (by default "
                        "files unchanged since they were last verified are trusted; sizes are always checked)")
    p.add_argument("--fastdllm-dream", action="store_true", default=None,
                   help="Dream with --cache prefix/dual: reproduce Fast-dLLM's Dream port")
    p.add_argument("--stream", action="store_true", help="print text as it is committed")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, steps, nfe, ...)")
    return p


def config_from_args(args: argparse.Namespace):
    """DecodeConfig from the parsed flags (only the flags given; the rest keep their defaults)."""
    from dllm.runtime.config import DecodeConfig

    fields = {flag[2:].replace("-", "_") for flag, _, _ in _FIELDS} | {"apd_block_reset", "fastdllm_dream"}
    values = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    return DecodeConfig(**values)


def _prompt(args):
    if args.chat and args.prompt_ids is not None:
        raise ConfigError("--chat wraps --prompt text in the chat template and cannot apply to --prompt-ids; "
                          "pass --prompt TEXT --chat, or the ids of an already formatted prompt without --chat")
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r} is not a comma-separated list of integers "
                              "(e.g. --prompt-ids 1,2,3)") from None
    if args.chat:
        return [{"role": "user", "content": args.prompt}]
    return args.prompt


def _pipeline(args):
    from dllm.runtime.pipeline import Pipeline

    path = Path(args.engine_dir)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass an engine directory written by dllm-export")
    if not (path / "manifest.json").exists() and (path / "config.json").exists():
        if args.backend != "torch":
            raise ConfigError(f"{path} is a checkpoint, not an engine directory; export it with "
                              f"`dllm-export {path} OUT` or run it directly with --backend torch")
        return Pipeline.from_checkpoint(path, device=args.device)
    return Pipeline.from_dir(path, backend=args.backend, device=args.device, verify_hashes=args.verify)


def run(args: argparse.Namespace) -> int:
    from dllm.device import parse_device

    cfg = config_from_args(args)
    device = parse_device(args.device, "--device", check_available=args.backend != "tensorrt")
    if args.backend != "torch" and device.type != "cuda":
        # torch only orchestrates between engine calls here (small ops); its thread pool would compete
        # with the backend's own threads (4-5x slower generation measured on a busy 2-core machine)
        import torch
        torch.set_num_threads(1)
    prompt = _prompt(args)
    pipe = _pipeline(args)
    if args.stream and not args.json:
        for delta in pipe.stream(prompt, cfg):
            print(delta, end="", flush=True)
        print()
        res = pipe.last_result
    else:
        res = pipe.generate(prompt, cfg)
    if args.json:
        out = res.to_dict()
        out["rows_per_layer"] = [round(x, 3) for x in out["rows_per_layer"]]
        out["config"] = cfg.to_dict()
        print(json.dumps(out))
    elif not args.stream:
        print(res.text if res.text is not None else " ".join(map(str, res.ids)))
    if not args.json:
        rows = ", ".join(f"{x:.0f}" for x in res.rows_per_layer)
        print(f"[{res.steps} steps, {res.nfe} NFE, {res.tokens_per_second:.1f} tokens/s, "
              f"rows per layer: {rows}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("dllm-run", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

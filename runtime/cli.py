"""dllm-run: decode from an engine directory (or, with --backend torch, a checkpoint directory).

Thin: flags -> DecodeConfig -> Pipeline.generate / Pipeline.stream. Each decoding flag maps onto
the DecodeConfig field of the same name (``--gen-length`` -> ``gen_length``).

    dllm-run out/ --prompt "Hello" --cache dcu --commit apd --gen-length 64 --block-length 16
    dllm-run out/ --prompt-ids 1,2,3 --json
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
from pathlib import Path

from dllm.cli import add_choice, add_common, show
from dllm.cli_common import Parser, run_cli
from dllm.errors import ConfigError
from dllm.runtime.config import Alg, Allocation, ApdMode, CachePolicyKind, CommitPolicyKind, DecodeConfig, Proxy, Remasking

# flag -> DecodeConfig field; type (an Enum class for choices); help (the default is added from DecodeConfig)
_FIELDS = [
    ("--gen-length", int, "tokens to generate"),
    ("--block-length", int, "block size; gen-length must be a multiple"),
    ("--steps", int, "schedule commit: steps over the whole generation"),
    ("--cache", CachePolicyKind, "cache policy: which rows each layer recomputes per step (docs/algorithms.md)"),
    ("--commit", CommitPolicyKind, "commit policy: which masked tokens become final per step"),
    ("--budget", int, "dcu: rows per layer per step on average"),
    ("--window", int, "dcu: forced rows around the last committed token"),
    ("--proxy", Proxy, "dcu change score"),
    ("--allocation", Allocation, "dcu budget split over layers"),
    ("--softmax-temp", float, "dcu softmax allocation temperature"),
    ("--refresh-interval", int, "dcu: full refresh every K steps (default: the first step only)"),
    ("--prompt-interval", int, "dllm-cache/dcu: prompt refresh every K steps"),
    ("--gen-interval", int, "dllm-cache/dcu: gen refresh every K steps"),
    ("--rho", float, "dllm-cache: fraction of gen rows partially updated"),
    ("--threshold", float, "threshold commit: confidence to commit"),
    ("--factor", float, "factor commit: f in 1 - f/(n+1)"),
    ("--apd-mode", ApdMode, "apd: one threshold (global) or one per position"),
    ("--tau0", float, "apd: initial threshold"),
    ("--alpha", float, "apd: confidence step"),
    ("--beta", float, "apd: instability step"),
    ("--tau-min", float, "apd: clamp the threshold from below"),
    ("--tau-max", float, "apd: clamp the threshold from above"),
    ("--remasking", Remasking, "LLaDA schedule: how masked positions are ranked"),
    ("--alg", Alg, "Dream schedule: how masked positions are ranked (origin: no ranking, each mask moves "
                   "with probability 1 - s/t)"),
    ("--alg-temp", float, "Dream schedule: > 0 draws the committed positions from softmax(conf/alg-temp)"),
    ("--eps", float, "Dream schedule: last timestep"),
    ("--temperature", float, "sampling temperature, 0 = greedy"),
    ("--top-p", float, "sample from the smallest token set with this probability mass"),
    ("--top-k", int, "sample from the k most likely tokens (default off; Dream's own code uses 50)"),
    ("--cfg-scale", float, "classifier-free guidance scale, 0 = off; the second pass masks the prompt"),
    ("--seed", int, "random seed"),
]
_MODEL = "default: the engine directory's generation defaults, else "
RUN_CANVAS = {"--gen-length": _MODEL + "256", "--block-length": _MODEL + "32",
              "--steps": _MODEL + "the gen length: one token per step"}


def add_decode_flags(parser, canvas: dict[str, str] = RUN_CANVAS, exclude: tuple[str, ...] = ()) -> None:
    """The DecodeConfig flags, spelled and explained the same way in dllm-run, dllm-eval and dllm-bench.
    ``canvas``: how the defaults of --gen-length, --block-length and --steps are chosen, per flag."""
    for flag, typ, help_ in _FIELDS:
        if flag in exclude:
            continue
        field = flag[2:].replace("-", "_")
        default = DecodeConfig.__dataclass_fields__[field].default
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            add_choice(parser, flag, typ, help=f"{help_} (default {show(default)})")
        else:
            if flag in canvas:
                text = f"{help_} ({canvas[flag]})"
            elif default is None:
                text = help_ if "default" in help_ else f"{help_} (default off)"
            else:
                text = f"{help_} (default {show(default)})"
            parser.add_argument(flag, type=typ, default=None, metavar=field.upper().split("_")[-1] if typ is int
                                else "X", help=text)
    parser.add_argument("--apd-block-reset", action="store_true", default=None,
                        help="apd: reset the thresholds at each block (default off)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dllm-run", description="Generate with a diffusion LLM from an engine directory. Settings "
               "not given come from the engine directory's generation defaults (dllm-export records them), then "
               "from the runtime's defaults.")
    p.add_argument("engine_dir", help="engine directory from dllm-export (or a checkpoint directory with "
                                      "--backend torch)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the engine directory's tokenizer)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma separated: 1,2,3")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap --prompt as a user message in the chat template (default: on when the model has a "
                        "chat template)")
    add_choice(p, "--backend", ("onnxruntime", "torch", "tensorrt"), default="onnxruntime",
               help="what runs the subgraphs: ONNX Runtime (CPU or CUDA), PyTorch (the reference modules, CPU or "
                    "CUDA; a checkpoint directory needs no export) or TensorRT plans (GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    add_common(p)
    add_decode_flags(p)
    p.add_argument("--fastdllm-dream", action="store_true", default=None,
                   help="Dream with --cache prefix or dual: reproduce Fast-dLLM's Dream port (each block's full "
                        "step commits only its first position; default off)")
    p.add_argument("--verify", action="store_true",
                   help="hash every file of the engine directory against its manifest before loading (by default "
                        "files unchanged since they were last verified are trusted; sizes are always checked)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed generations before the reported one, so the speed shown is not that of a cold "
                        "start (default 1; 0 = report the first call)")
    p.add_argument("--stream", action="store_true", help="print text as it is committed")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, steps, nfe, latency, ...)")
    return p


def config_from_args(args: argparse.Namespace, defaults: dict | None = None) -> DecodeConfig:
    """DecodeConfig from the parsed flags: the flags given, then ``defaults`` (the model's generation
    defaults), then DecodeConfig's own."""
    fields = {flag[2:].replace("-", "_") for flag, _, _ in _FIELDS} | {"apd_block_reset", "fastdllm_dream"}
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    values = dict(defaults or {})
    if "gen_length" in given:
        model_gen, model_block = values.get("gen_length"), values.get("block_length")
        if "steps" not in given:
            values.pop("steps", None)      # one token per step of the gen length asked for
        if "block_length" not in given and model_block is not None and (
                model_block == model_gen or given["gen_length"] % model_block):
            # the model's one block becomes one block of the new length; a block that no longer divides it goes
            values["block_length"] = given["gen_length"] if model_block == model_gen else None
            if values["block_length"] is None:
                del values["block_length"]
    values.update(given)
    return DecodeConfig(**values)


def _prompt(args):
    """The prompt as ids (--prompt-ids) or text (--prompt; the pipeline applies the chat template)."""
    if args.chat and args.prompt_ids is not None:
        raise ConfigError("--chat wraps --prompt text in the chat template and cannot apply to --prompt-ids; "
                          "pass --prompt TEXT --chat, or the ids of an already formatted prompt without --chat")
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r} is not a comma-separated list of integers "
                              "(e.g. --prompt-ids 1,2,3)") from None
    return args.prompt


def _pipeline(args):
    from dllm.runtime.pipeline import Pipeline

    path = Path(args.engine_dir)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass an engine directory written by dllm-export")
    if not (path / "manifest.json").exists() and (path / "config.json").exists():
        if args.backend != "torch":
            raise ConfigError(f"{path} is a checkpoint, not an engine directory; export it with "
                              f"`dllm-export {path} -o OUT` or run it directly with --backend torch")
        return Pipeline.from_checkpoint(path, device=args.device, threads=args.threads)
    return Pipeline.from_dir(path, backend=args.backend, device=args.device, threads=args.threads,
                             verify_hashes=args.verify)


def speed_line(res, warmup: int) -> str:
    """The stderr summary: steps, latency, time to the first answer token, answer and canvas rates."""
    rows = ", ".join(f"{x:.0f}" for x in res.rows_per_layer)
    timing = f"after {warmup} warm-up run{'s' if warmup != 1 else ''}" if warmup else "cold: first call"
    return (f"[{res.steps} steps, {res.nfe} NFE, latency {res.wall_s * 1e3:.1f} ms, first answer token "
            f"{res.first_token_s * 1e3:.1f} ms, {res.answer_tokens} answer tokens = {res.tokens_per_second:.1f} "
            f"tokens/s (canvas {res.canvas_tokens_per_second:.1f} positions/s), {timing}; rows per layer: {rows}]")


def run(args: argparse.Namespace) -> int:
    from dllm.device import parse_device

    if args.warmup < 0:
        raise ConfigError(f"--warmup must be at least 0, got {args.warmup}")
    parse_device(args.device, "--device", check_available=args.backend != "tensorrt")
    prompt = _prompt(args)
    pipe = _pipeline(args)
    cfg = config_from_args(args, pipe.generation.decode_values())
    for _ in range(args.warmup):
        pipe.generate(prompt, cfg, chat=args.chat)
    if args.stream and not args.json:
        for delta in pipe.stream(prompt, cfg, chat=args.chat):
            print(delta, end="", flush=True)
        print()
        res = pipe.last_result
    else:
        res = pipe.generate(prompt, cfg, chat=args.chat)
    if args.json:
        out = res.to_dict()
        out["rows_per_layer"] = [round(x, 3) for x in out["rows_per_layer"]]
        out["config"] = cfg.to_dict()
        out["warmup"] = args.warmup
        print(json.dumps(out))
    elif not args.stream:
        print(res.text if res.text is not None else " ".join(map(str, res.ids)))
    if not args.json:
        print(speed_line(res, args.warmup), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("dllm-run", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

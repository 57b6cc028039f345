"""``dllm-eval``: exact-match accuracy of decoding methods on the same prompts.

    dllm-eval ENGINE_DIR --task arithmetic --limit 200 --methods full,dual+threshold,dcu,dcu+apd --json out.json
    dllm-eval CHECKPOINT_DIR --task sorting --methods reference          # the reference decoder only
    dllm-eval ENGINE_DIR --task arithmetic --reference CHECKPOINT_DIR   # methods plus the reference
    dllm-eval ENGINE_DIR --task gsm8k --data gsm8k_test.jsonl --gen-length 256 --block-length 8

Every method answers every problem; problems are the outer loop so the methods' timings interleave.
Per method it reports accuracy, mean steps, mean NFE, mean latency and tokens/s (answer tokens, before
the first EOS, over decode wall time), as a table and as JSON. Method names are those of ``dllm.runtime.method_config``
(``CACHE`` or ``CACHE+COMMIT``), plus ``reference``: ``runtime/reference.py`` on the checkpoint
weights in PyTorch, the decoder every fast path is tested against.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from dllm.cli import add_choice, add_common
from dllm.cli_common import Parser, check_output_file, run_cli, write_text
from dllm.errors import ConfigError
from dllm.threads import resolve_threads, torch_threads, torch_threads_for
from dllm.tools.tasks import FEWSHOT_DEFAULT, Problem, Split, Task, extract_answer, generate, is_correct, load_gsm8k

REFERENCE = "reference"
DEFAULT_METHODS = ("full", "dual+threshold", "dcu", "dcu+apd")
# decode settings per task when no flag says otherwise: the shipped model's canvas for the generated
# tasks, the GSM8K protocol of the Dynamic-dLLM evaluation for gsm8k
TASK_DECODE = {Task.ARITHMETIC: dict(gen_length=32, block_length=32, steps=32),
               Task.SORTING: dict(gen_length=32, block_length=32, steps=32),
               Task.GSM8K: dict(gen_length=256, block_length=8, steps=256)}
GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate: problems, methods, where the model lives, and the base decode settings."""
    task: Task
    methods: tuple[str, ...]
    engine_dir: Path | None = None     # engine directory (or a checkpoint with backend torch)
    reference_dir: Path | None = None  # checkpoint for the `reference` method
    data: Path | None = None           # gsm8k JSONL
    limit: int = 200
    seed: int = 1234                   # which fresh test problems are drawn
    fewshot: int = FEWSHOT_DEFAULT
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None         # CPU threads per generation (dllm.threads); None: the default
    verify: bool = False               # hash every engine-directory file before loading
    batch_size: int = 1                # problems decoded together per step (runtime methods; same answers)

    def __post_init__(self):
        object.__setattr__(self, "task", Task(self.task))
        object.__setattr__(self, "methods", tuple(m.strip() for m in self.methods if m.strip()))
        if not self.methods:
            raise ConfigError("--methods is empty; give e.g. full,dcu+apd or reference")
        if self.limit <= 0:
            raise ConfigError(f"--limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.fewshot < 0:
            raise ConfigError(f"--fewshot must be at least 0 (solved examples before each question), got "
                              f"{self.fewshot}")
        if self.task == Task.GSM8K and self.data is None:
            raise ConfigError("--task gsm8k reads a local JSONL: pass --data FILE.jsonl "
                              '(one {"question": ..., "answer": "... #### n"} per line)')
        needs_engines = [m for m in self.methods if m != REFERENCE]
        if needs_engines and self.engine_dir is None:
            raise ConfigError(f"methods {needs_engines} need ENGINE_DIR")
        if REFERENCE in self.methods and self.reference_dir is None:
            raise ConfigError("method 'reference' needs a checkpoint: pass --reference CHECKPOINT_DIR, or give a "
                              "checkpoint directory (config.json, no manifest.json) as ENGINE_DIR")


# -- problems -----------------------------------------------------------------------------------
def load_problems(cfg: EvalConfig) -> list[Problem]:
    """The evaluation set: a fresh seeded test split for generated tasks, the JSONL for gsm8k."""
    if cfg.task == Task.GSM8K:
        problems = load_gsm8k(cfg.data, fewshot=cfg.fewshot)[:cfg.limit]
        if not problems:
            raise ConfigError(f"--data {cfg.data} has no problems left after the {cfg.fewshot} few-shot rows; add "
                              "rows or lower --fewshot")
        return problems
    return generate(cfg.task, cfg.limit, seed=cfg.seed, split=Split.TEST)


def cut_at_stops(task: Task, text: str) -> str:
    """GSM8K answers stop at the evaluation harness' stop strings; others are the text."""
    if task != Task.GSM8K:
        return text
    for s in GSM8K_STOPS:
        text = text.split(s, 1)[0]
    return text


# -- runners: one per method, each maps a problem to (text, steps, nfe, seconds, answer tokens) ----
class PipelineRunner:
    """A runtime method through ``Pipeline.generate``; ``many`` decodes problems as one batch."""

    def __init__(self, pipe, config):
        self.pipe, self.config = pipe, config

    def __call__(self, problem: Problem):
        res = self.pipe.generate(problem.messages(), self.config)
        return res.text or "", res.steps, res.nfe, res.wall_s, res.answer_tokens

    def many(self, problems: list[Problem]) -> list:
        if len(problems) == 1:
            return [self(problems[0])]
        results = self.pipe.generate([p.messages() for p in problems], self.config, batch_size=len(problems))
        return [(r.text or "", r.steps, r.nfe, r.wall_s, r.answer_tokens) for r in results]


class ReferenceRunner:
    """``runtime/reference.py`` on the checkpoint's PyTorch model, with the same canvas settings."""

    def __init__(self, checkpoint_dir: Path, decode_config, device: str, threads: int | None = None):
        import torch

        from dllm.exporter.models.checkpoint import Checkpoint
        from dllm.runtime import reference
        from dllm.spec import Arch

        ckpt = Checkpoint(checkpoint_dir)
        self.device = torch.device(device)
        self.model = ckpt.load_model().to(self.device).eval()
        self.tokenizer = ckpt.tokenizer()
        self.spec = self.model.spec
        c = decode_config
        common = dict(gen_length=c.gen_length, block_length=c.block_length, steps=c.steps,
                      temperature=c.temperature, seed=c.seed)
        common.update(top_p=c.top_p, top_k=c.top_k)
        if self.spec.arch == Arch.LLADA:
            # the reference decoders keep the published code's spelling of their choices (low_confidence)
            self.ref_cfg = reference.LladaConfig(remasking=c.remasking.value.replace("-", "_"),
                                                 cfg_scale=c.cfg_scale, **common)
        else:
            self.ref_cfg = reference.DreamConfig(alg=c.alg.value.replace("-", "_"), eps=c.eps, alg_temp=c.alg_temp,
                                                 **common)
        self.generate = reference.generate
        self.threads = torch_threads_for("torch", self.device.type, resolve_threads(threads, "torch"))

    def _prompt_ids(self, problem: Problem) -> list[int]:
        from dllm.runtime.prompts import encode_chat

        return encode_chat(self.tokenizer, problem.messages(), "the checkpoint's tokenizer")

    def __call__(self, problem: Problem):
        import torch

        prompt = torch.tensor([self._prompt_ids(problem)], device=self.device)   # [1, P]
        with torch.no_grad(), torch_threads(self.threads):
            t0 = time.perf_counter()
            res = self.generate(self.model, prompt, self.ref_cfg)
            wall = time.perf_counter() - t0
        gen = res.gen_ids[0].tolist()
        cut = next((i for i, t in enumerate(gen) if t in set(self.spec.eos_ids)), len(gen))
        return self.tokenizer.decode(gen[:cut], skip_special_tokens=True), res.steps, res.nfe, wall, cut


def run_many(runner, problems: list[Problem]) -> list:
    """A runner over several problems: a batch where the runner decodes batches (``many``), else one by one."""
    many = getattr(runner, "many", None)
    return many(problems) if many is not None else [runner(p) for p in problems]


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "manifest.json").is_file()


def open_pipeline(cfg: EvalConfig):
    from dllm.runtime import Pipeline

    if is_checkpoint_dir(cfg.engine_dir):
        if cfg.backend != "torch":
            raise ConfigError(f"{cfg.engine_dir} is a checkpoint, not an engine directory: export it with "
                              f"`dllm-export {cfg.engine_dir} -o OUT`, pass --backend torch, or evaluate "
                              "only --methods reference")
        return Pipeline.from_checkpoint(cfg.engine_dir, device=cfg.device, threads=cfg.threads)
    return Pipeline.from_dir(cfg.engine_dir, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                             verify_hashes=cfg.verify)


def build_runners(cfg: EvalConfig, base) -> dict:
    from dllm.runtime import method_config

    runners, pipe = {}, None
    for m in cfg.methods:
        if m == REFERENCE:
            runners[m] = ReferenceRunner(cfg.reference_dir, base, cfg.device, cfg.threads)
            continue
        mcfg = method_config(m, base)       # validates the name before any engine opens
        pipe = pipe or open_pipeline(cfg)
        runners[m] = PipelineRunner(pipe, mcfg)
    return runners


# -- evaluation ---------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, base, log=print) -> dict:
    """Run every method on every problem; returns the JSON-ready report."""
    problems = load_problems(cfg)
    runners = build_runners(cfg, base)
    rows = {m: [] for m in cfg.methods}
    elapsed = dict.fromkeys(cfg.methods, 0.0)
    done = 0
    for start in range(0, len(problems), cfg.batch_size):
        chunk = problems[start:start + cfg.batch_size]
        for m, run in runners.items():
            t0 = time.perf_counter()
            outs = run_many(run, chunk)
            elapsed[m] += time.perf_counter() - t0
            for p, (text, steps, nfe, wall, answer_tokens) in zip(chunk, outs):
                text = cut_at_stops(cfg.task, text)
                rows[m].append({"text": text, "extracted": extract_answer(cfg.task, text),
                                "correct": is_correct(cfg.task, text, p.answer),
                                "steps": steps, "nfe": nfe, "wall_s": wall, "answer_tokens": answer_tokens})
        before, done = done, done + len(chunk)
        if done // 25 > before // 25 or done == len(problems):
            log(f"[eval] {done}/{len(problems)} " + " ".join(
                f"{m} {sum(r['correct'] for r in rows[m]) / done:.0%}" for m in cfg.methods))
    methods = {}
    for m, rs in rows.items():
        n, wall = len(rs), sum(r["wall_s"] for r in rs)
        answer = sum(r["answer_tokens"] for r in rs)
        # throughput over the time the method ran (with batches, sequences overlap: their walls add up to more)
        span = elapsed[m] if cfg.batch_size > 1 else wall
        methods[m] = {"accuracy": sum(r["correct"] for r in rs) / n, "correct": sum(r["correct"] for r in rs),
                      "n": n, "mean_steps": sum(r["steps"] for r in rs) / n,
                      "mean_nfe": sum(r["nfe"] for r in rs) / n, "latency_ms_mean": wall / n * 1e3,
                      "tokens_per_second": answer / span if span > 0 else 0.0,
                      "canvas_tokens_per_second": base.gen_length * n / span if span > 0 else 0.0, "wall_s": wall,
                      "elapsed_s": elapsed[m]}
    return {
        "task": cfg.task.value, "n_problems": len(problems), "seed": cfg.seed, "batch_size": cfg.batch_size,
        "engine_dir": str(cfg.engine_dir) if cfg.engine_dir else None,
        "reference_dir": str(cfg.reference_dir) if cfg.reference_dir else None,
        "backend": cfg.backend if set(cfg.methods) - {REFERENCE} else "torch (reference only)", "device": cfg.device, "decode": base.to_dict(), "methods": methods,
        "problems": [{"prompt": p.prompt, "answer": p.answer,
                      **{m: {k: rows[m][i][k] for k in ("text", "correct", "steps")} for m in cfg.methods}}
                     for i, p in enumerate(problems)],
    }


def format_table(report: dict) -> str:
    head = f"{'method':<20} {'accuracy':>9} {'correct':>9} {'steps':>7} {'NFE':>7} {'latency ms':>10} {'tokens/s':>9}"
    batch = f", batches of {report['batch_size']}" if report.get("batch_size", 1) > 1 else ""
    lines = [f"task {report['task']}, {report['n_problems']} problems, backend {report['backend']}{batch}", head,
             "-" * len(head)]
    for m, r in report["methods"].items():
        lines.append(f"{m:<20} {r['accuracy']:>9.1%} {r['correct']:>4}/{r['n']:<4} {r['mean_steps']:>7.1f} "
                     f"{r['mean_nfe']:>7.1f} {r['latency_ms_mean']:>10.1f} {r['tokens_per_second']:>9.1f}")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from dllm.runtime.cli import add_decode_flags   # the decode flags of dllm-run, spelled the same way

    p = Parser(prog="dllm-eval", description="Exact-match accuracy of decoding methods on the same problems "
               "(generated arithmetic and sorting, or a local GSM8K file).")
    p.add_argument("engine_dir", nargs="?", type=Path, help="engine directory (or checkpoint with --backend torch)")
    add_choice(p, "--task", Task, required=True, help="problem family")
    p.add_argument("--data", type=Path, metavar="FILE.jsonl", help="gsm8k: local JSONL in the GSM8K format")
    p.add_argument("--fewshot", type=int, default=FEWSHOT_DEFAULT, metavar="N",
                   help=f"gsm8k: solved examples as chat turns (default {FEWSHOT_DEFAULT})")
    p.add_argument("--limit", type=int, default=200, metavar="N", help="number of problems (default 200)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="problems decoded together in one step (default 1); every answer is the one it gets alone, "
                        "so accuracy does not change. At most the engines' --max-batch; 'reference' runs one by one")
    p.add_argument("--seed-problems", type=int, default=1234, metavar="SEED",
                   help="seed of the generated test problems (default 1234)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method names (CACHE or CACHE+COMMIT, or 'reference'; default "
                        f"{','.join(DEFAULT_METHODS)})")
    p.add_argument("--reference", type=Path, metavar="CHECKPOINT_DIR",
                   help="also evaluate the reference decoder on this checkpoint")
    add_choice(p, "--backend", ("onnxruntime", "torch", "tensorrt"), default="onnxruntime",
               help="what runs the subgraphs (as in dllm-run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    add_common(p)
    p.add_argument("--json", type=Path, metavar="OUT", help="write the report here")
    p.add_argument("--verify", action="store_true",
                   help="hash every file of the engine directory against its manifest before loading (by default "
                        "files unchanged since they were last verified are trusted; sizes are always checked)")
    add_decode_flags(p, canvas=dict.fromkeys(("--gen-length", "--block-length", "--steps"),
                                             "default: per task, see the end of this help"))
    p.epilog = "Decode defaults per task: " + "; ".join(
        f"{t.value} gen length {d['gen_length']}, block {d['block_length']}, {d['steps']} steps"
        for t, d in TASK_DECODE.items()) + "."
    return p


def config_from_args(a: argparse.Namespace):
    """(EvalConfig, base DecodeConfig) from parsed flags."""
    from dllm.device import parse_device
    from dllm.runtime.cli import config_from_args as decode_config

    task = Task(a.task)
    parse_device(a.device, "--device", check_available=a.backend != "tensorrt")
    if a.json is not None:
        check_output_file(a.json, "--json")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    reference_dir = a.reference
    if a.engine_dir is not None and is_checkpoint_dir(a.engine_dir) and reference_dir is None:
        reference_dir = a.engine_dir
    if a.reference is not None and REFERENCE not in methods:
        methods.append(REFERENCE)
    engine_dir = a.engine_dir
    if engine_dir is not None and not engine_dir.is_dir():
        raise ConfigError(f"{engine_dir} is not a directory; pass an engine directory from dllm-export "
                          "or a checkpoint directory")
    if reference_dir is not None and not reference_dir.is_dir():
        raise ConfigError(f"--reference {reference_dir} is not a directory; pass the checkpoint directory "
                          "(config.json, *.safetensors)")
    base = decode_config(a, TASK_DECODE[task])
    cfg = EvalConfig(task=task, methods=tuple(methods), engine_dir=engine_dir, reference_dir=reference_dir,
                     data=a.data, limit=a.limit, seed=a.seed_problems, fewshot=a.fewshot, backend=a.backend,
                     device=a.device, threads=a.threads, verify=a.verify, batch_size=a.batch_size)
    return cfg, base


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        cfg, base = config_from_args(args)
        report = evaluate(cfg, base, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(report))
        if args.json:
            write_text(args.json, json.dumps(report, indent=1), "--json")
            print(f"report written to {args.json}", file=sys.stderr)

    return run_cli("dllm-eval", body)


if __name__ == "__main__":
    sys.exit(main())

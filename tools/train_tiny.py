"""``dllm-train-tiny``: train a small LLaDA-layout masked-diffusion model on generated tasks.

The objective is LLaDA's SFT setup. Each sequence is the chat-template prompt followed by the answer,
``<|eot_id|>`` and ``<|endoftext|>`` padding. Most batches (``tight_frac``) use a tight canvas (answer +
1-4 EOS) for a dense signal; the rest pad the response to 16-64 positions, so the model learns to fill
any tail with EOS. The prompt is never masked; for each sequence a mask ratio t ~ U(eps, 1) masks
response tokens independently. Loss ``llada``: cross-entropy on masked positions weighted 1/t, divided
by the response length, batch mean (LLaDA); ``token`` (default): the plain mean over masked tokens,
which trains tiny models several times faster (tools/assets/tiny-llada/README.md).

Everything is seeded (weights, data, masks), so the same flags on the same device give the same
checkpoint. The output is a Hugging Face-layout LLaDA checkpoint (``save_checkpoint``) with the
character tokenizer of ``build_tokenizer`` and its chat template, plus ``train_config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from dllm.cli import add_choice, add_common, show
from dllm.cli_common import Parser, run_cli
from dllm.errors import ConfigError
from dllm.spec import Arch, ModelSpec
from dllm.threads import resolve_threads
from dllm.tools.tasks import GenConfig, Problem, Split, Task, generate, is_correct, sample_problem

# torch and the model classes load inside the functions that use them, so --help answers at once.

EPS_MASK = 1e-3        # lower bound of the mask ratio t, as in LLaDA


class LossKind(str, enum.Enum):
    LLADA = "llada"   # sum of masked CE / t / response length (LLaDA's SFT objective, unbiased ELBO)
    TOKEN = "token"   # mean masked CE (no 1/t weight): lower variance, faster on tiny models


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained checkpoint."""
    out: Path
    steps: int = 3000
    seed: int = 0
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    mlp_mult: int = 3
    batch: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    min_canvas: int = 16      # response canvas (answer + eot + EOS padding), drawn per batch
    max_canvas: int = 64
    loss: LossKind = LossKind.TOKEN
    tight_frac: float = 0.7   # share of batches whose canvas is just the answer + 1-4 EOS (denser signal)
    gen: GenConfig = GenConfig()
    device: Device = Device.CPU
    time_limit: float = 0.0   # seconds; 0 = none. Stops early (and says so) but still saves.
    eval_every: int = 500
    eval_problems: int = 32   # per task, test split, at each periodic evaluation
    threads: int | None = None   # CPU threads (dllm.threads); None: the default
    save_dtype: str = "float32"
    tasks: tuple[Task, ...] = (Task.ARITHMETIC, Task.SORTING)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "device", Device(self.device))
        object.__setattr__(self, "loss", LossKind(self.loss))
        object.__setattr__(self, "tasks", tuple(Task(t) for t in self.tasks))
        if Task.GSM8K in self.tasks:
            raise ConfigError("dllm-train-tiny trains on generated tasks only (arithmetic, sorting), got gsm8k")
        object.__setattr__(self, "threads", resolve_threads(self.threads))
        for name in ("steps", "d_model", "layers", "heads", "mlp_mult", "batch", "min_canvas"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "eval_problems"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be at least 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "time_limit"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                bound = "above 0" if name == "lr" else "of at least 0"
                raise ConfigError(f"TrainConfig.{name} must be a finite number {bound}, got {v}")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if self.max_canvas < self.min_canvas:
            raise ConfigError(f"max_canvas ({self.max_canvas}) < min_canvas ({self.min_canvas})")
        if not 0.0 <= self.tight_frac <= 1.0:   # also false for nan
            raise ConfigError(f"tight_frac must be in [0, 1], got {self.tight_frac}")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}")
        import torch

        if self.device == Device.CUDA and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")

    def spec(self) -> ModelSpec:
        from dllm.exporter.models.writer import tiny_spec

        return tiny_spec(Arch.LLADA, n_layers=self.layers, d_model=self.d_model, n_heads=self.heads,
                         mlp_hidden=self.mlp_mult * self.d_model, max_seq_len=512)


def check_checkpoint_out(out: Path) -> None:
    """Fail before training when ``out`` cannot receive a new checkpoint: it is a file, it already holds
    files (nothing is overwritten), or its folder is not writable."""
    from dllm.cli_common import check_output_dir

    check_output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty ({sorted(p.name for p in out.iterdir())[:5]}); a checkpoint is "
                          "written into a new or empty directory only, so nothing there is overwritten: choose "
                          "another --out")


def write_checkpoint_atomically(model, out: Path, tokenizer, dtype, record: dict) -> Path:
    """The checkpoint appears at ``out`` whole or not at all: written beside it, then renamed."""
    import shutil
    import tempfile

    from dllm.exporter.models.writer import save_checkpoint

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_checkpoint(model, tmp, tokenizer=tokenizer, dtype=dtype)
        (tmp / "train_config.json").write_text(json.dumps(record, indent=2))
        tmp.chmod(0o755)
        if out.is_dir():
            out.rmdir()                      # empty (checked at start); fails loudly if that changed
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- data -------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """Chat-template ids of the problem's messages, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def response_ids(tokenizer, answer: str, spec: ModelSpec) -> list[int]:
    """Answer ids followed by <|eot_id|> (the chat turn end), before EOS padding."""
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    return tokenizer.encode(answer, add_special_tokens=False) + [eot]


def make_batch(problems: list[Problem], tokenizer, spec: ModelSpec, canvas: int, extra: int = 0):
    """Ids [B, N] and prompt lengths [B]: prompt + response + <|endoftext|> padding.

    All rows share N = longest prompt + max(``canvas``, longest response + ``extra``); shorter
    prompts get a longer EOS tail, exactly the layout a padded SFT batch has.
    """
    import torch

    pad = spec.eos_ids[0]
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    responses = [response_ids(tokenizer, p.answer, spec) for p in problems]
    n = max(len(p) for p in prompts) + max(canvas, max(len(r) for r in responses) + extra)
    rows = [p + r + [pad] * (n - len(p) - len(r)) for p, r in zip(prompts, responses)]
    return torch.tensor(rows), torch.tensor([len(p) for p in prompts])


def masked_diffusion_loss(model: DiffusionLM, ids: torch.Tensor, prompt_len: torch.Tensor,
                          gen: torch.Generator, kind: LossKind = LossKind.LLADA) -> torch.Tensor:
    """CE on masked response tokens of a noised batch.

    ``llada``: weighted 1/t, divided by the response length, batch mean (LLaDA's SFT loss).
    ``token``: plain mean over the masked tokens of the batch.
    """
    import torch
    import torch.nn.functional as F

    B, N = ids.shape
    pos = torch.arange(N, device=ids.device)[None, :]                         # [1, N]
    response = pos >= prompt_len.to(ids.device)[:, None]                       # [B, N]
    t = EPS_MASK + (1 - EPS_MASK) * torch.rand(B, generator=gen).to(ids.device)   # [B]
    draw = torch.rand(B, N, generator=gen).to(ids.device)                      # [B, N]
    masked = response & (draw < t[:, None])                                    # [B, N]
    noisy = torch.where(masked, torch.full_like(ids, model.spec.mask_id), ids)
    logits = model(noisy)                                                      # [B, N, V]
    ce = F.cross_entropy(logits[masked], ids[masked], reduction="none")        # [M]
    if kind == LossKind.TOKEN:
        return ce.mean()
    weight = 1.0 / (t[:, None].expand(B, N)[masked] * response.sum(1)[:, None].expand(B, N)[masked])
    return (ce * weight).sum() / B


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# -- quick decoding (progress only; the trusted decoder is runtime/reference.py) -------------------
def quick_decode(model: DiffusionLM, prompts: list[list[int]], gen_length: int = 32,
                 block_length: int = 32, steps: int = 32) -> list[list[int]]:
    """Greedy low-confidence semi-AR decoding (LLaDA's schedule at temperature 0), batched by prompt length."""
    import torch

    with torch.no_grad():
        return _quick_decode(model, prompts, gen_length, block_length, steps)


def _quick_decode(model, prompts, gen_length, block_length, steps):
    import torch

    spec = model.spec
    device = model.embed.weight.device
    out: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for plen, idx in by_len.items():
        x = torch.full((len(idx), plen + gen_length), spec.mask_id, dtype=torch.long, device=device)
        x[:, :plen] = torch.tensor([prompts[i] for i in idx], device=device)
        for b in range(n_blocks):
            hi = plen + (b + 1) * block_length
            counts = [block_length // per_block + (s < block_length % per_block) for s in range(per_block)]
            for k in counts:
                probs = torch.softmax(model(x).double(), dim=-1)                # [b, N, V]
                conf, x0 = probs.max(-1)                                        # [b, N]
                mask = x == spec.mask_id
                mask[:, hi:] = False
                conf = torch.where(mask, conf, torch.full_like(conf, -math.inf))
                top = conf.topk(k, dim=-1).indices                              # [b, k]
                x.scatter_(1, top, x0.gather(1, top))
        for row, i in enumerate(idx):
            out[i] = x[row, plen:].tolist()
    return [out[i] for i in range(len(prompts))]


def answer_text(tokenizer, ids: list[int]) -> str:
    """Response text up to the first end token (<|eot_id|> or <|endoftext|>)."""
    stops = {tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def quick_accuracy(model: DiffusionLM, tokenizer, problems: list[Problem], **decode_kw) -> float:
    was_training = model.training
    model.eval()
    texts = [answer_text(tokenizer, ids) for ids in
             quick_decode(model, [prompt_ids(tokenizer, p) for p in problems], **decode_kw)]
    model.train(was_training)
    return sum(is_correct(p.task, t, p.answer) for p, t in zip(problems, texts)) / max(1, len(problems))


# -- training ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, log=print) -> Path:
    """Train per ``cfg`` and write the checkpoint to ``cfg.out``; returns the directory."""
    import torch

    from dllm.exporter.models.model import DiffusionLM
    from dllm.exporter.models.writer import build_tokenizer, init_weights

    check_checkpoint_out(cfg.out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device.value)
    spec = cfg.spec()
    tokenizer = build_tokenizer(Arch.LLADA)
    model = init_weights(DiffusionLM(spec), cfg.seed).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    data_rng = random.Random(f"train:{cfg.seed}")
    mask_gen = torch.Generator().manual_seed(cfg.seed)
    gen_cfg = cfg.gen
    evalset = [p for t in cfg.tasks
               for p in generate(t, cfg.eval_problems, seed=10_000 + cfg.seed, split=Split.TEST, cfg=gen_cfg)]
    log(f"[train] model {spec.n_layers}x{spec.d_model} heads {spec.n_heads} mlp {spec.mlp_hidden}: "
        f"{spec.n_params() / 1e6:.2f}M params; steps {cfg.steps} batch {cfg.batch} lr {cfg.lr} seed {cfg.seed} "
        f"device {cfg.device.value} threads {cfg.threads}")
    start = last = time.time()
    ema = None
    step = 0
    for step in range(cfg.steps):
        if cfg.time_limit and time.time() - start > cfg.time_limit:
            log(f"[train] time limit {cfg.time_limit:.0f}s reached at step {step}/{cfg.steps}: "
                "stopping early, the LR schedule was cut short")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        problems = [sample_problem(data_rng.choice(cfg.tasks), data_rng, Split.TRAIN, gen_cfg)
                    for _ in range(cfg.batch)]
        if data_rng.random() < cfg.tight_frac:
            ids, plen = make_batch(problems, tokenizer, spec, 0, extra=data_rng.randint(1, 4))
        else:
            ids, plen = make_batch(problems, tokenizer, spec, data_rng.randint(cfg.min_canvas, cfg.max_canvas))
        loss = masked_diffusion_loss(model, ids.to(device), plen, mask_gen, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 25 == 0 or step == 0:
            now = time.time()
            rate = (25 if step else 1) / max(1e-9, now - last)
            last = now
            log(f"[train] step {step + 1:5d}/{cfg.steps} loss {loss.item():.4f} (ema {ema:.4f}) "
                f"lr {lr_at(step, cfg):.2e} {rate:.2f} steps/s elapsed {now - start:.0f}s")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            accs = {t.value: quick_accuracy(model, tokenizer, [p for p in evalset if p.task == t])
                    for t in cfg.tasks}
            log(f"[eval] step {step + 1}: quick accuracy (gen 32, test split) "
                + " ".join(f"{k} {v:.0%}" for k, v in accs.items()))
            sys.stdout.flush()
    else:
        step = cfg.steps
    out = write_checkpoint_atomically(model.cpu().eval(), cfg.out, tokenizer, getattr(torch, cfg.save_dtype),
                                      config_record(cfg, step, time.time() - start))
    log(f"[train] {step} steps in {time.time() - start:.0f}s; checkpoint written to {out}")
    return out


def config_record(cfg: TrainConfig, steps_done: int, seconds: float) -> dict:
    """What produced a checkpoint: every TrainConfig field plus steps done and wall time."""
    import torch

    rec = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    rec.update(out=str(cfg.out), device=cfg.device.value, loss=cfg.loss.value, tasks=[t.value for t in cfg.tasks],
               gen=dataclasses.asdict(cfg.gen), steps_done=steps_done, seconds=round(seconds, 1),
               torch=torch.__version__)
    return rec


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__
    g = GenConfig()

    def default(name):
        return show(d[name].default)

    ap = Parser(prog="dllm-train-tiny", description="Train a small LLaDA-layout masked-diffusion "
                                 "model on generated arithmetic and sorting problems and write it as a Hugging Face "
                                 "checkpoint (tools/assets/tiny-llada/README.md has the recipe of the shipped one).")
    ap.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=d["steps"].default, metavar="N",
                    help=f"optimizer steps (default {default('steps')})")
    ap.add_argument("--seed", type=int, default=d["seed"].default, help="seed of weights, data and masks "
                    f"(default {default('seed')})")
    ap.add_argument("--d-model", type=int, default=d["d_model"].default, metavar="N",
                    help=f"hidden size (default {default('d_model')})")
    ap.add_argument("--layers", type=int, default=d["layers"].default, metavar="N",
                    help=f"transformer layers (default {default('layers')})")
    ap.add_argument("--heads", type=int, default=d["heads"].default, metavar="N",
                    help=f"attention heads; must divide --d-model (default {default('heads')})")
    ap.add_argument("--mlp-mult", type=int, default=d["mlp_mult"].default, metavar="N",
                    help=f"MLP hidden size = N x d-model (default {default('mlp_mult')})")
    ap.add_argument("--batch", type=int, default=d["batch"].default, metavar="N",
                    help=f"sequences per step (default {default('batch')})")
    ap.add_argument("--lr", type=float, default=d["lr"].default, help=f"peak learning rate (default {default('lr')})")
    ap.add_argument("--warmup", type=int, default=d["warmup"].default, metavar="N",
                    help=f"linear warm-up steps before the cosine decay (default {default('warmup')})")
    ap.add_argument("--min-canvas", type=int, default=d["min_canvas"].default, metavar="N",
                    help=f"shortest padded response canvas (default {default('min_canvas')})")
    ap.add_argument("--max-canvas", type=int, default=d["max_canvas"].default, metavar="N",
                    help=f"longest padded response canvas; also the longest generation the model then handles well "
                         f"(default {default('max_canvas')})")
    add_choice(ap, "--loss", LossKind, default=d["loss"].default.value,
               help="token: mean masked cross-entropy (fast on tiny models); llada: LLaDA's 1/t-weighted objective")
    ap.add_argument("--tight-frac", type=float, default=d["tight_frac"].default, metavar="X",
                    help=f"share of batches with a tight canvas, answer + 1-4 EOS (default {default('tight_frac')})")
    ap.add_argument("--max-operand", type=int, default=g.max_operand, metavar="N",
                    help=f"arithmetic operands in [0, N] (default {g.max_operand})")
    ap.add_argument("--ops", default="".join(g.ops), help=f"arithmetic operators, '+' and/or '-' "
                    f"(default {''.join(g.ops)})")
    ap.add_argument("--sort-len", default=f"{g.sort_min_len}-{g.sort_max_len}", metavar="MIN-MAX",
                    help=f"sorting: list length range (default {g.sort_min_len}-{g.sort_max_len})")
    ap.add_argument("--sort-max-value", type=int, default=g.sort_max_value, metavar="N",
                    help=f"sorting: values in [0, N] (default {g.sort_max_value})")
    add_choice(ap, "--device", Device, default=d["device"].default.value, help="where to train")
    ap.add_argument("--time-limit", type=float, default=d["time_limit"].default, metavar="SECONDS",
                    help="stop early after this long and still save (default 0: no limit)")
    ap.add_argument("--eval-every", type=int, default=d["eval_every"].default, metavar="N",
                    help=f"steps between quick accuracy checks; 0 disables them (default {default('eval_every')})")
    add_choice(ap, "--save-dtype", ("float32", "float16", "bfloat16"), default=d["save_dtype"].default,
               help="dtype of the saved weights")
    add_common(ap, threads_for="of the training on the CPU", gpu_note="",
               threads_default="the cores, at most 4: big batches keep them busy")
    return ap


def parse_args(argv=None) -> TrainConfig:
    a = build_parser().parse_args(argv)
    lo, _, hi = a.sort_len.partition("-")
    try:
        sort_min, sort_max = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"--sort-len {a.sort_len!r} is not a range of integers like 3-5 (MIN-MAX)") from None
    return TrainConfig(out=Path(a.out), steps=a.steps, seed=a.seed, d_model=a.d_model, layers=a.layers,
                       heads=a.heads, mlp_mult=a.mlp_mult, batch=a.batch, lr=a.lr, warmup=a.warmup,
                       min_canvas=a.min_canvas, max_canvas=a.max_canvas, tight_frac=a.tight_frac, loss=a.loss,
                       gen=GenConfig(max_operand=a.max_operand, ops=tuple(a.ops), sort_min_len=sort_min,
                                     sort_max_len=sort_max, sort_max_value=a.sort_max_value),
                       device=a.device, time_limit=a.time_limit, eval_every=a.eval_every, threads=a.threads,
                       save_dtype=a.save_dtype)


def main(argv=None) -> int:
    def body() -> None:
        train(parse_args(argv), log=lambda s: print(s, flush=True))

    return run_cli("dllm-train-tiny", body)


if __name__ == "__main__":
    sys.exit(main())

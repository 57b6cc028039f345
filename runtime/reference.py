"""Reference decoders: full recompute every step, the oracle every faster path is tested against.

Two loops, each a transcription of the published behaviour (see docs/algorithms.md):

- ``llada_generate``: LLaDA's semi-autoregressive block decoding. Each block's masks are split
  evenly over ``steps / num_blocks`` steps with the remainder going to the first steps; Gumbel-max
  sampling in float64; ``low_confidence`` (float64 softmax probability of the chosen token) or
  ``random`` (U(0,1)) ranking; confidence is -inf past the current block and on non-mask
  positions; the top-k by confidence are committed.
- ``dream_generate``: Dream's timestep loop. ``linspace(1, eps, steps + 1)``; at step i,
  ``int(#mask * (1 - s/t))`` tokens are committed (all remaining ones at the last step), ranked by
  ``alg``. Optionally block-wise (``block_length < gen_length``): the same loop runs once per block
  over that block's masks with ``steps / num_blocks`` steps, confidence -inf outside the block.

The model is any callable ``ids [B, N] LongTensor -> logits [B, N, V]`` (for example
``dllm.exporter.models.DiffusionLM``; a Hugging Face style output with ``.logits`` also works).
For Dream the logits must already be shifted (``DiffusionLM`` does this when ``spec.logit_shift``).
All randomness comes from one ``torch.Generator`` seeded with ``cfg.seed``, drawn in a fixed order,
so a run is reproducible and a faster path can replay the same draws.

Prompts are ``[B, P]`` without padding (every row has the same length); the reference does not
support left padding.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable

import torch
import torch.nn.functional as F

from dllm.errors import ConfigError

__all__ = ["DreamAlg", "DreamConfig", "LladaConfig", "ReferenceConfig", "ReferenceResult", "Remasking",
           "dream_generate", "dream_transfer_count", "generate", "llada_generate", "transfer_counts"]

Model = Callable[[torch.Tensor], torch.Tensor]


class Remasking(str, enum.Enum):
    """How LLaDA ranks the masked positions it may commit this step."""
    LOW_CONFIDENCE = "low_confidence"   # probability of the chosen token (float64 softmax)
    RANDOM = "random"                   # U(0, 1)


class DreamAlg(str, enum.Enum):
    """How Dream ranks the masked positions it may commit this step."""
    ORIGIN = "origin"               # each mask transferred independently with probability 1 - s/t
    MASKGIT_PLUS = "maskgit_plus"   # probability of the sampled token (max prob at temperature 0)
    TOPK_MARGIN = "topk_margin"     # p1 - p2
    ENTROPY = "entropy"             # sum p log p (negative entropy: higher = more confident)


# -- configs ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Settings shared by both reference decoders.

    ``block_length=None`` means one block of ``gen_length`` (Dream's original, block-free loop).
    """
    gen_length: int = 128
    block_length: int | None = None
    steps: int = 128
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        name = type(self).__name__
        if int(self.gen_length) <= 0:
            raise ConfigError(f"{name}.gen_length must be positive, got {self.gen_length}")
        block = self.gen_length if self.block_length is None else int(self.block_length)
        object.__setattr__(self, "block_length", block)
        if block <= 0:
            raise ConfigError(f"{name}.block_length must be positive, got {block}")
        if self.gen_length % block:
            raise ConfigError(
                f"{name}: gen_length {self.gen_length} is not a multiple of block_length {block}; "
                f"choose a block_length that divides gen_length (e.g. {_divisor_near(self.gen_length, block)})")
        if int(self.steps) <= 0:
            raise ConfigError(f"{name}.steps must be positive, got {self.steps}")
        if self.steps % self.num_blocks:
            raise ConfigError(
                f"{name}: steps {self.steps} is not a multiple of the number of blocks {self.num_blocks} "
                f"(gen_length {self.gen_length} / block_length {block}); use steps = a multiple of "
                f"{self.num_blocks}, e.g. {self.num_blocks * max(1, round(self.steps / self.num_blocks))}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"{name}.temperature must be a finite number >= 0, got {self.temperature}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclasses.dataclass(frozen=True)
class LladaConfig(ReferenceConfig):
    """LLaDA's published ``generate`` settings (defaults as published: 128/128/128, greedy)."""
    remasking: Remasking = Remasking.LOW_CONFIDENCE
    cfg_scale: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        try:
            object.__setattr__(self, "remasking", Remasking(self.remasking))
        except ValueError:
            raise ConfigError(f"LladaConfig.remasking {self.remasking!r} is unknown; expected one of "
                              f"{[r.value for r in Remasking]}") from None
        if not (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale)):
            raise ConfigError(f"LladaConfig.cfg_scale must be a finite number >= 0 (0 = off), got {self.cfg_scale}")


@dataclasses.dataclass(frozen=True)
class DreamConfig(ReferenceConfig):
    """Dream's ``diffusion_generate`` settings (``top_p``/``top_k`` None = off, ``alg_temp`` 0 = top-k)."""
    alg: DreamAlg = DreamAlg.MASKGIT_PLUS
    eps: float = 1e-3
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        try:
            object.__setattr__(self, "alg", DreamAlg(self.alg))
        except ValueError:
            raise ConfigError(f"DreamConfig.alg {self.alg!r} is unknown; expected one of "
                              f"{[a.value for a in DreamAlg]}") from None
        if not 0 < self.eps < 1:
            raise ConfigError(f"DreamConfig.eps must be in (0, 1) (the last timestep), got {self.eps}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"DreamConfig.top_p must be in (0, 1] or None (off), got {self.top_p}")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ConfigError(f"DreamConfig.top_k must be >= 1 or None (off), got {self.top_k}")
        if not (self.alg_temp >= 0 and math.isfinite(self.alg_temp)):
            raise ConfigError(f"DreamConfig.alg_temp must be a finite number >= 0 (0 = top-k), got {self.alg_temp}")


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


# -- result -------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReferenceResult:
    """What a reference run produced.

    ``history[t]`` is ``transfer.nonzero()`` of step t: a LongTensor [K_t, 2] of (batch row, position)
    pairs committed at that step, in ascending order. ``commit_step`` [B, N] holds the step at which
    each position was committed (-1 for the prompt).
    """
    ids: torch.Tensor            # [B, N] final canvas (prompt + generation)
    prompt_length: int
    steps: int                   # decoding steps run
    nfe: int                     # model calls (with CFG each call runs a 2B batch)
    history: list[torch.Tensor]
    commit_step: torch.Tensor    # [B, N]

    @property
    def gen_ids(self) -> torch.Tensor:
        """[B, G] the generated tokens."""
        return self.ids[:, self.prompt_length:]


# -- shared pieces ------------------------------------------------------------------------------
def _mask_id(model, mask_id: int | None) -> int:
    if mask_id is not None:
        return int(mask_id)
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("mask_id is unknown: pass mask_id=..., or a model with a .spec (e.g. DiffusionLM)")
    return int(spec.mask_id)


def _check_prompt(prompt_ids: torch.Tensor, mask_id: int, model) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        got = (f"{prompt_ids.dtype} tensor of shape {list(prompt_ids.shape)}"
               if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__)
        raise ConfigError(f"prompt_ids must be a LongTensor [B, P], got a {got}; "
                          "use torch.tensor([ids], dtype=torch.long)")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ConfigError(f"prompt_ids is empty (shape {list(prompt_ids.shape)}); pass at least one token per row")
    if (prompt_ids == mask_id).any():
        raise ConfigError(f"prompt_ids contains the mask id {mask_id}; the prompt must be real tokens only")
    spec = getattr(model, "spec", None)
    if spec is not None and (prompt_ids.min() < 0 or prompt_ids.max() >= spec.vocab_size):
        raise ConfigError(f"prompt_ids hold ids outside the vocabulary [0, {spec.vocab_size}): "
                          f"min {int(prompt_ids.min())}, max {int(prompt_ids.max())}")


def _logits(model: Model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _start(model: Model, prompt_ids: torch.Tensor, cfg: ReferenceConfig, mask_id: int | None):
    """Checked mask id, the canvas [prompt, mask * gen_length] and the seeded generator."""
    mask_id = _mask_id(model, mask_id)
    _check_prompt(prompt_ids, mask_id, model)
    B, P = prompt_ids.shape
    x = torch.full((B, P + cfg.gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :P] = prompt_ids
    return mask_id, x, _generator(prompt_ids.device, cfg.seed)


def transfer_counts(mask_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: split each row's mask count evenly over ``steps``, remainder to the first steps.

    mask_counts [B] int -> counts [B, steps] int64 (e.g. 10 over 4 steps -> 3, 3, 2, 2).
    """
    base = mask_counts.long() // steps                                             # [B]
    rem = mask_counts.long() % steps                                               # [B]
    first = torch.arange(steps, device=mask_counts.device)[None, :] < rem[:, None]  # [B, steps]
    return base[:, None] + first.long()


def _add_gumbel_noise(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: exp(logits) / (-log U)^T; T = 0 returns the logits unchanged."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=gen)
    return logits.exp() / (-torch.log(noise)) ** temperature


# -- LLaDA --------------------------------------------------------------------------------------
@torch.no_grad()
def llada_generate(model: Model, prompt_ids: torch.Tensor, cfg: LladaConfig, *,
                   mask_id: int | None = None) -> ReferenceResult:
    """LLaDA's published semi-autoregressive decoding, full recompute every step.

    Random draws per step, in order: Gumbel noise [B, N, V] float64 (only when temperature > 0),
    then U(0,1) [B, N] float32 (only for ``random`` remasking). At temperature 0 no noise is drawn
    and x0 is the plain argmax (the latest published code computes ``exp(logits)`` with noise^0 = 1
    instead: the same tokens, only its global RNG advances). If the model ranks the mask token
    first, it is "committed" and stays a mask, exactly as published; trained models never do.
    ``mask_id`` defaults to ``model.spec.mask_id``.
    """
    if not isinstance(cfg, LladaConfig):
        raise ConfigError(f"llada_generate needs a LladaConfig, got {type(cfg).__name__}")
    mask_id, x, gen = _start(model, prompt_ids, cfg, mask_id)                           # x [B, N]
    B, P = prompt_ids.shape
    device = prompt_ids.device
    prompt_index = x != mask_id                                                         # [B, N]
    commit_step = torch.full_like(x, -1)
    history: list[torch.Tensor] = []
    spb, step = cfg.steps_per_block, 0

    for b in range(cfg.num_blocks):
        start, end = P + b * cfg.block_length, P + (b + 1) * cfg.block_length
        counts = transfer_counts((x[:, start:end] == mask_id).sum(1), spb)             # [B, spb]
        for i in range(spb):
            mask_index = x == mask_id                                                   # [B, N]
            if cfg.cfg_scale > 0:
                un_x = x.masked_fill(prompt_index, mask_id)
                both = _logits(model, torch.cat([x, un_x], dim=0))                      # [2B, N, V]
                cond, un = both.chunk(2, dim=0)
                logits = un + (cfg.cfg_scale + 1) * (cond - un)
            else:
                logits = _logits(model, x)                                              # [B, N, V]
            x0 = _add_gumbel_noise(logits, cfg.temperature, gen).argmax(-1)             # [B, N]
            if cfg.remasking == Remasking.LOW_CONFIDENCE:
                p = F.softmax(logits.to(torch.float64), dim=-1)                          # [B, N, V]
                conf = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)                        # [B, N]
            else:
                conf = torch.rand(x0.shape, device=device, generator=gen)               # [B, N]
            conf[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.full_like(conf, -math.inf))
            transfer = torch.zeros_like(mask_index)
            for j in range(B):
                _, sel = torch.topk(conf[j], k=int(counts[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
            commit_step[transfer] = step
            history.append(transfer.nonzero())
            step += 1
    return ReferenceResult(x, P, step, step, history, commit_step)


# -- Dream --------------------------------------------------------------------------------------
def dream_transfer_count(num_mask: float | torch.Tensor, i: int, timesteps: torch.Tensor) -> int:
    """Dream's commit count at step i: ``int(num_mask * (1 - s/t))``, all remaining at the last step.

    ``timesteps`` is ``linspace(1, eps, steps + 1)`` in float32, and the product is taken in float32
    tensor arithmetic as Dream does, so rounding matches exactly.
    """
    steps = timesteps.numel() - 1
    num_mask = torch.as_tensor(num_mask, dtype=torch.float32)
    if i == steps - 1:
        return int(num_mask)
    t, s = timesteps[i], timesteps[i + 1]
    return int(num_mask * (1 - s / t))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of the sorted distribution whose mass exceeds top_p (first always kept)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, remove)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _sample_tokens(logits: torch.Tensor, cfg: DreamConfig, gen: torch.Generator,
                   confidence: DreamAlg) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens`` on rows of logits [M, V] -> (confidence [M], token [M])."""
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = _top_p_filter(logits, cfg.top_p)
    if cfg.top_k is not None:
        logits = _top_k_filter(logits, cfg.top_k)
    probs = torch.softmax(logits, dim=-1)                                        # [M, V]
    if cfg.temperature > 0 and probs.shape[0] > 0:
        x0 = torch.multinomial(probs, 1, generator=gen).squeeze(-1)             # [M]
        conf = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if confidence == DreamAlg.TOPK_MARGIN:
        top2 = torch.topk(probs, 2, dim=-1).values                                 # [M, 2]
        conf = top2[:, 0] - top2[:, 1]
    elif confidence == DreamAlg.ENTROPY:
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


@torch.no_grad()
def dream_generate(model: Model, prompt_ids: torch.Tensor, cfg: DreamConfig, *,
                   mask_id: int | None = None) -> ReferenceResult:
    """Dream's diffusion decoding loop, full recompute every step.

    With ``block_length == gen_length`` (the default) this is Dream's original loop: the canvas is
    the prompt padded with masks to P + G, timesteps ``linspace(1, eps, steps + 1)``, and step i
    commits ``int(mean #mask per row * (1 - s/t))`` tokens (all remaining at the last step), the
    top ones by ``alg`` confidence (or sampled via ``softmax(conf / alg_temp)`` when alg_temp > 0).
    ``origin`` instead transfers each mask independently with probability ``1 - s/t`` (1 at the last
    step), so its per-step count is random.

    Block-wise variant (``block_length < gen_length``, our extension for comparing the runtime with
    blocks): blocks are decoded left to right, each with ``steps / num_blocks`` steps and its own
    timestep schedule; only the current block's masks are scored and counted (confidence is -inf
    elsewhere), so each block is empty when it ends.

    Random draws per step, in order: for ``origin`` U(0,1) over the block's masks, then (when
    temperature > 0) one categorical draw per transferred mask; for the others one categorical draw
    per block mask (temperature > 0), then the ``alg_temp`` multinomial. Logits must already be
    shifted (``DiffusionLM`` does this for Dream). ``mask_id`` defaults to ``model.spec.mask_id``.
    """
    if not isinstance(cfg, DreamConfig):
        raise ConfigError(f"dream_generate needs a DreamConfig, got {type(cfg).__name__}")
    mask_id, x, gen = _start(model, prompt_ids, cfg, mask_id)                           # x [B, N]
    B, P = prompt_ids.shape
    device = prompt_ids.device
    commit_step = torch.full_like(x, -1)
    history: list[torch.Tensor] = []
    spb, step = cfg.steps_per_block, 0
    timesteps = torch.linspace(1, cfg.eps, spb + 1)                                     # float32

    for b in range(cfg.num_blocks):
        start, end = P + b * cfg.block_length, P + (b + 1) * cfg.block_length
        in_block = torch.zeros(x.shape[1], dtype=torch.bool, device=device)
        in_block[start:end] = True
        for i in range(spb):
            mask_index = (x == mask_id) & in_block                                      # [B, N]
            logits = _logits(model, x)                                                  # [B, N, V]
            mask_logits = logits[mask_index]                                            # [M, V]
            t, s = timesteps[i], timesteps[i + 1]
            if cfg.alg == DreamAlg.ORIGIN:
                p_transfer = (1 - s / t) if i < spb - 1 else torch.tensor(1.0)          # float32 as Dream
                x0 = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=device)
                move = torch.rand(x0.shape, device=device, generator=gen) < p_transfer   # [M]
                _, x0[move] = _sample_tokens(mask_logits[move], cfg, gen, DreamAlg.MASKGIT_PLUS)
                x[mask_index] = x0
                transfer = torch.zeros_like(mask_index)
                transfer[mask_index] = move
            else:
                conf, x0 = _sample_tokens(mask_logits, cfg, gen, cfg.alg)               # [M], [M]
                num_mask = mask_index.sum() / B
                k = dream_transfer_count(num_mask, i, timesteps)
                full_conf = torch.full(x.shape, -math.inf, dtype=logits.dtype, device=device)
                full_conf[mask_index] = conf.to(logits.dtype)                           # [B, N]
                transfer = torch.zeros_like(mask_index)
                if k > 0:
                    if cfg.alg_temp == 0:
                        sel = torch.topk(full_conf, k).indices                          # [B, k]
                    else:
                        w = F.softmax(full_conf / cfg.alg_temp, dim=-1)
                        sel = torch.multinomial(w, k, generator=gen)                    # [B, k]
                    cand = torch.full_like(x, mask_id)
                    cand[mask_index] = x0
                    rows = torch.arange(B, device=device)[:, None].expand_as(sel)
                    x[rows, sel] = cand[rows, sel]
                    transfer[rows, sel] = True
            commit_step[transfer] = step
            history.append(transfer.nonzero())
            step += 1
    return ReferenceResult(x, P, step, step, history, commit_step)


def generate(model: Model, prompt_ids: torch.Tensor, cfg: ReferenceConfig, *,
             mask_id: int | None = None) -> ReferenceResult:
    """Dispatch on the config type: ``LladaConfig`` -> llada_generate, ``DreamConfig`` -> dream_generate."""
    if isinstance(cfg, LladaConfig):
        return llada_generate(model, prompt_ids, cfg, mask_id=mask_id)
    if isinstance(cfg, DreamConfig):
        return dream_generate(model, prompt_ids, cfg, mask_id=mask_id)
    raise ConfigError(f"generate needs a LladaConfig or a DreamConfig, got {type(cfg).__name__}")

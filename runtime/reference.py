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
- ``apd_generate``: Dynamic-dLLM's adaptive parallel decoding (``generate_pd``, section B): each
  block runs until it has no masks; a global or per-token threshold tau moves by
  ``-alpha * c + beta * H`` every step after the first and commits every block mask whose
  confidence reaches it, plus the most confident one.
- ``fastdllm_dream_generate``: Fast-dLLM's Dream port with its prefix or dual
  key/value cache: each block's full forward commits the block's first position, then Dream's
  schedule (from timestep index 1, ranked by negative entropy) or the threshold rule decides on the
  cached steps.

The model is any callable ``ids [B, N] LongTensor -> logits [B, N, V]`` (for example
``dllm.exporter.models.DiffusionLM``; a Hugging Face style output with ``.logits`` also works).
For Dream the logits must already be shifted (``DiffusionLM`` does this when ``spec.logit_shift``).
All randomness comes from one ``torch.Generator`` seeded with ``cfg.seed``, drawn in a fixed order,
so a run is reproducible and a faster path can replay the same draws.

Prompts are ``[B, P]`` without padding (every row has the same length); the reference does not
support padding (a batch of different lengths runs each prompt alone).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable

import torch
import torch.nn.functional as F

from dllm.errors import ConfigError

__all__ = ["ApdConfig", "BlockCache", "DreamAlg", "DreamConfig", "FastDllmDreamConfig", "LladaConfig", "PdMode",
           "ReferenceConfig", "ReferenceResult", "Remasking", "apd_generate", "dream_generate",
           "dream_transfer_count", "fastdllm_dream_generate", "generate", "llada_generate", "transfer_counts"]

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


class PdMode(str, enum.Enum):
    """How APD keeps its threshold (``generate_pd``'s pd_mode 1 and 2)."""
    GLOBAL = "global"               # one scalar, moved by the means over the current block's masks
    PER_TOKEN = "per_token"         # one per generated position, every position moved every step


class BlockCacheKind(str, enum.Enum):
    """Fast-dLLM's key/value reuse inside a block."""
    PREFIX = "prefix"               # later steps run [block start, N) against the cached prefix
    DUAL = "dual"                   # later steps run the block against cached prefix and suffix


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
    """LLaDA's published ``generate`` settings (defaults as published: 128/128/128, greedy).

    ``top_p``/``top_k`` (our extension, None = off) restrict the Gumbel-max draw to the nucleus / the k
    most likely tokens; the confidence stays the unrestricted probability of the drawn token.
    """
    remasking: Remasking = Remasking.LOW_CONFIDENCE
    cfg_scale: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self):
        super().__post_init__()
        try:
            object.__setattr__(self, "remasking", Remasking(self.remasking))
        except ValueError:
            raise ConfigError(f"{type(self).__name__}.remasking {self.remasking!r} is unknown; expected one of "
                              f"{[r.value for r in Remasking]}") from None
        if not (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale)):
            raise ConfigError(f"LladaConfig.cfg_scale must be a finite number >= 0 (0 = off), got {self.cfg_scale}")
        _check_filters(self)


def _check_filters(cfg) -> None:
    name = type(cfg).__name__
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise ConfigError(f"{name}.top_p must be in (0, 1] or None (off), got {cfg.top_p}")
    if cfg.top_k is not None and int(cfg.top_k) < 1:
        raise ConfigError(f"{name}.top_k must be >= 1 or None (off), got {cfg.top_k}")


@dataclasses.dataclass(frozen=True)
class DreamConfig(ReferenceConfig):
    """Dream's ``diffusion_generate`` settings (``top_p``/``top_k`` None = off, ``alg_temp`` 0 = top-k).

    Dream's own ``diffusion_generate`` inherits ``top_k=50`` from transformers' generation defaults when
    the caller passes none; here None means no top-k filter. Pass ``top_k=50`` to replay such a call
    (it matters even greedily: the confidence is computed over the filtered distribution).
    """
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
        _check_filters(self)
        if not (self.alg_temp >= 0 and math.isfinite(self.alg_temp)):
            raise ConfigError(f"DreamConfig.alg_temp must be a finite number >= 0 (0 = top-k), got {self.alg_temp}")


@dataclasses.dataclass(frozen=True)
class ApdConfig(ReferenceConfig):
    """``generate_pd`` settings (defaults as published: mode global, tau0 1.0, alpha 0.01, beta 0.15).

    ``steps`` is only checked to be a multiple of the number of blocks, as published; every block
    runs until it is empty. ``top_p``/``top_k`` (our extension, None = off) restrict the token draw.
    """
    mode: PdMode = PdMode.GLOBAL
    tau0: float = 1.0
    alpha: float = 0.01
    beta: float = 0.15
    remasking: Remasking = Remasking.LOW_CONFIDENCE
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for name, enum_cls in (("mode", PdMode), ("remasking", Remasking)):
            try:
                object.__setattr__(self, name, enum_cls(getattr(self, name)))
            except ValueError:
                raise ConfigError(f"ApdConfig.{name} {getattr(self, name)!r} is unknown; expected one of "
                                  f"{[e.value for e in enum_cls]}") from None
        for name in ("tau0", "alpha", "beta"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"ApdConfig.{name} must be a finite number, got {getattr(self, name)}")
        _check_filters(self)


@dataclasses.dataclass(frozen=True)
class FastDllmDreamConfig(DreamConfig):
    """Fast-dLLM's Dream port: ``cache`` prefix or dual; ``threshold`` None = its schedule mode (Dream's
    timesteps, ranked by negative entropy whatever ``alg`` says, as published), a number = its
    ``alg='confidence_threshold'`` mode with that threshold (confidence: the drawn token's probability).
    ``steps / num_blocks`` (at least 2 in schedule mode) sets each block's timestep schedule; the
    threshold mode runs every block until it is empty."""
    cache: BlockCacheKind = BlockCacheKind.DUAL
    threshold: float | None = None

    def __post_init__(self):
        super().__post_init__()
        try:
            object.__setattr__(self, "cache", BlockCacheKind(self.cache))
        except ValueError:
            raise ConfigError(f"FastDllmDreamConfig.cache {self.cache!r} is unknown; expected one of "
                              f"{[e.value for e in BlockCacheKind]}") from None
        if self.alg == DreamAlg.ORIGIN:
            raise ConfigError("FastDllmDreamConfig ranks positions by negative entropy whatever alg says; alg "
                              "'origin' (no ranking) is not part of it: leave alg at its default")
        if self.threshold is None and self.steps_per_block < 2 and self.block_length > 1:
            raise ConfigError(f"FastDllmDreamConfig's schedule mode needs at least 2 steps per block (the first "
                              f"position, then the schedule), got steps {self.steps} over {self.num_blocks} blocks")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ConfigError(f"FastDllmDreamConfig.threshold must be in [0, 1] or None, got {self.threshold}")


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
            x0 = _add_gumbel_noise(_restrict(logits, cfg.top_p, cfg.top_k), cfg.temperature, gen).argmax(-1)
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


def _restrict(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Top-p, then top-k (Dream's order); None = that filter off."""
    if top_p is not None and top_p < 1:
        logits = _top_p_filter(logits, top_p)
    if top_k is not None:
        logits = _top_k_filter(logits, top_k)
    return logits


def _sample_tokens(logits: torch.Tensor, cfg: DreamConfig, gen: torch.Generator,
                   confidence: DreamAlg) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens`` on rows of logits [M, V] -> (confidence [M], token [M])."""
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    logits = _restrict(logits, cfg.top_p, cfg.top_k)
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


# -- APD --------------------------------------------------------------------------------------------
def _is_dream(model) -> bool:
    spec = getattr(model, "spec", None)
    return spec is not None and str(getattr(spec.arch, "value", spec.arch)) == "dream"


@torch.no_grad()
def apd_generate(model: Model, prompt_ids: torch.Tensor, cfg: ApdConfig, *,
                 mask_id: int | None = None) -> ReferenceResult:
    """Dynamic-dLLM's ``generate_pd`` (the ``apd`` commit policy of docs/algorithms.md), full recompute every
    step, batch 1.

    Every step t (counted over the whole generation), with p = float64 softmax of each generated
    position's logits, c = 1 - (second-largest p) and H = 1 - cos(p, p of step t-1):
    - from t = 2 on, before committing: ``global`` moves its scalar tau by -alpha * mean(c) + beta * mean(H)
      over the current block's masks; ``per_token`` moves every generated position's tau by
      -alpha * c + beta * H (future blocks included). Nothing is clamped or reset at block starts.
    - commit the block masks with confidence >= tau, plus the most confident one.
    Tokens: argmax at temperature 0; above it LLaDA's Gumbel-max with the noise in the logits' dtype
    over the whole canvas (Dream models: one draw from softmax(logits/T) per block mask). Confidence:
    the float64 probability of the token, or U(0,1) over the canvas for ``random``. Random draws per
    step in that order.
    """
    if not isinstance(cfg, ApdConfig):
        raise ConfigError(f"apd_generate needs an ApdConfig, got {type(cfg).__name__}")
    mask_id, x, gen = _start(model, prompt_ids, cfg, mask_id)                           # x [B, N]
    B, P = prompt_ids.shape
    if B != 1:
        raise ConfigError(f"apd_generate decodes one prompt at a time (as published); got a batch of {B}")
    G, device, dream = cfg.gen_length, prompt_ids.device, _is_dream(model)
    tau = torch.full(() if cfg.mode == PdMode.GLOBAL else (B, G), cfg.tau0, dtype=torch.float64, device=device)
    prev_p = None                                                                       # [B, G, V]
    commit_step = torch.full_like(x, -1)
    history: list[torch.Tensor] = []
    step = 0
    for b in range(cfg.num_blocks):
        start, end = P + b * cfg.block_length, P + (b + 1) * cfg.block_length
        while (x[:, start:end] == mask_id).any():
            mask_index = x == mask_id
            mask_index[:, end:] = False                                                 # M_t: the block's masks
            logits = _logits(model, x)                                                  # [B, N, V]
            p = F.softmax(logits.to(torch.float64), dim=-1)                              # [B, N, V]
            pg = p[:, P:]                                                               # [B, G, V]
            if prev_p is not None:
                c = 1 - torch.topk(pg, 2, dim=-1).values[..., 1]                        # [B, G]
                H = 1 - (pg * prev_p).sum(-1) / (pg.norm(dim=-1) * prev_p.norm(dim=-1))  # [B, G]
                if cfg.mode == PdMode.GLOBAL:
                    m = mask_index[:, P:]
                    tau = tau - cfg.alpha * c[m].mean() + cfg.beta * H[m].mean()
                else:
                    tau = tau - cfg.alpha * c + cfg.beta * H
            prev_p = pg
            x0 = _apd_tokens(logits, mask_index, cfg, gen, dream)                       # [B, N]
            if cfg.remasking == Remasking.RANDOM:
                conf = torch.rand(x.shape, device=device, generator=gen).to(torch.float64)
            else:
                conf = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)                        # [B, N]
            conf = torch.where(mask_index, conf, torch.full_like(conf, -math.inf))
            if cfg.mode == PdMode.GLOBAL:
                thr = tau
            else:                                                                       # the prompt never passes
                thr = torch.cat([torch.full((B, P), math.inf, dtype=torch.float64, device=device), tau], dim=1)
            transfer = mask_index & (conf >= thr)
            transfer[0, conf[0].argmax()] = True                                        # at least one per step
            x[transfer] = x0[transfer]
            commit_step[transfer] = step
            history.append(transfer.nonzero())
            step += 1
    return ReferenceResult(x, P, step, step, history, commit_step)


def _apd_tokens(logits: torch.Tensor, mask_index: torch.Tensor, cfg: ApdConfig, gen: torch.Generator,
                dream: bool) -> torch.Tensor:
    """x0 [B, N] for APD: argmax at temperature 0; else Gumbel-max in the logits' dtype (LLaDA) or
    Dream's categorical draw per block mask, over the top-p/top-k restricted logits."""
    x0 = logits.argmax(-1)
    T = cfg.temperature
    if T == 0:
        return x0
    if dream:
        probs = torch.softmax(_restrict(logits[mask_index] / T, cfg.top_p, cfg.top_k), dim=-1)   # [M, V]
        if probs.shape[0] > 0:
            x0[mask_index] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return x0
    restricted = _restrict(logits, cfg.top_p, cfg.top_k)
    noise = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=gen)
    return (restricted.exp() / (-torch.log(noise)) ** T).argmax(-1)


# -- Fast-dLLM's Dream port ------------------------------------------------------------------------
class BlockCache:
    """Fast-dLLM's block-level key/value reuse on a ``DiffusionLM``.

    ``full(ids)`` runs every row and keeps each layer's keys (after RoPE) and values. ``rows(ids, lo,
    hi)`` runs only rows [lo, hi), which attend to their fresh keys/values and to the kept ones of
    every other row (prefix: hi = N, so only the prefix is reused; dual: the suffix too). Returns
    logits [B, rows, V]; Dream's shift is applied inside the rows, as Fast-dLLM's port does (the
    first row reads its own hidden state).
    """

    def __init__(self, model):
        if not hasattr(model, "layers") or not hasattr(model, "embed"):
            raise ConfigError("fastdllm_dream_generate needs a DiffusionLM (it reuses per-layer keys/values); "
                              f"got {type(model).__name__}")
        self.model = model
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def full(self, ids: torch.Tensor) -> torch.Tensor:
        self.keys, self.values = [], []
        return self._run(ids, 0, ids.shape[1], store=True)

    def rows(self, ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return self._run(ids, lo, hi, store=False)

    def _run(self, ids, lo, hi, store):
        m = self.model
        B = ids.shape[0]
        h = m.embed(ids[:, lo:hi])                                                      # [B, k, D]
        pos = torch.arange(lo, hi, device=ids.device).expand(B, hi - lo)
        for l, layer in enumerate(m.layers):
            q, k, v = layer.project_qkv(h, pos)
            if store:
                self.keys.append(k)
                self.values.append(v)
            else:
                k = torch.cat([self.keys[l][:, :lo], k, self.keys[l][:, hi:]], dim=1)
                v = torch.cat([self.values[l][:, :lo], v, self.values[l][:, hi:]], dim=1)
            y = h + layer.attend(q, k, v)
            h = y + layer.mlp(y)
        logits = m.lm_head(m.norm(h))
        if m.spec.logit_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


@torch.no_grad()
def fastdllm_dream_generate(model, prompt_ids: torch.Tensor, cfg: FastDllmDreamConfig, *,
                            mask_id: int | None = None) -> ReferenceResult:
    """Fast-dLLM's Dream port (``_sample`` with ``block_length``, ``dual_cache``, ``threshold``) with its prefix
    or dual cache (docs/algorithms.md, "Reproducing public decoders"), batch 1.

    Per block, with S = steps / num_blocks, timesteps ``linspace(1, eps, S + 1)`` and the fed region
    [start, N) (prefix) or [start, end) (dual):
    - the opening step, a full forward that refreshes the cache: Dream's sampler on every canvas row (one
      draw per row at temperature > 0), and only the block's first position is kept;
    - cached steps i = 1, 2, ... run the fed region against the cache, Dream's shift applied inside it.
      Schedule mode (``threshold`` None): stop at i = S; ``int(#mask * (1 - s/t))`` of the block's masks (all
      at i = S - 1), ranked by negative entropy whatever ``alg`` says, or drawn with ``alg_temp``.
      Threshold mode (Fast-dLLM's ``alg='confidence_threshold'``): tokens drawn for every mask of the fed
      region; of the block's masks, as many most confident as it has masks are taken in order, the first
      always and the others when their confidence (the drawn token's probability) reaches ``threshold``;
    - the block ends when a cached step leaves it without masks.
    Ranking happens on a tensor over the fed region (-inf outside the block's masks), as published. One
    guard the public loop lacks: a threshold block stops after ``block_length`` cached steps (reached only
    by a model that keeps drawing the mask token itself, where the public loop would go on).
    """
    if not isinstance(cfg, FastDllmDreamConfig):
        raise ConfigError(f"fastdllm_dream_generate needs a FastDllmDreamConfig, got {type(cfg).__name__}")
    cache = BlockCache(model)
    mask_id, x, gen = _start(model, prompt_ids, cfg, mask_id)                           # x [B, N]
    B, P = prompt_ids.shape
    if B != 1:
        raise ConfigError(f"fastdllm_dream_generate decodes one prompt at a time; got a batch of {B}")
    N, S, bl = x.shape[1], cfg.steps_per_block, cfg.block_length
    timesteps = torch.linspace(1, cfg.eps, S + 1)                                       # float32
    commit_step = torch.full_like(x, -1)
    history: list[torch.Tensor] = []
    step = 0

    def record(transfer: torch.Tensor) -> None:                                         # transfer [B, N]
        nonlocal step
        commit_step[transfer] = step
        history.append(transfer.nonzero())
        step += 1

    for b in range(cfg.num_blocks):
        start, end = P + b * bl, P + (b + 1) * bl
        hi = end if cfg.cache == BlockCacheKind.DUAL else N                             # fed region [start, hi)
        logits = cache.full(x)                                                          # [B, N, V]
        _, x0 = _sample_tokens(logits.flatten(0, 1), cfg, gen, DreamAlg.MASKGIT_PLUS)  # [B*N]: every row
        x[:, start] = x0.view(B, N)[:, start]
        transfer = torch.zeros_like(x, dtype=torch.bool)
        transfer[:, start] = True
        record(transfer)
        i = 1
        while True:
            if cfg.threshold is None and i == S:
                break
            if cfg.threshold is not None and i > bl:                                    # our guard, see above
                break
            logits = cache.rows(x, start, hi)                                           # [B, R, V], shifted inside
            fed = x[:, start:hi]                                                        # [B, R] (a view of x)
            mask_index = fed == mask_id                                                 # [B, R]
            if cfg.threshold is None:
                mask_index[:, bl:] = False                                              # the block's masks
                conf, x0 = _sample_tokens(logits[mask_index], cfg, gen, DreamAlg.ENTROPY)   # [M], [M]
                k = dream_transfer_count(mask_index.sum() / B, i, timesteps)
                full_conf = torch.full(fed.shape, -math.inf, dtype=logits.dtype, device=x.device)
                full_conf[mask_index] = conf
                sel = torch.zeros((B, 0), dtype=torch.long, device=x.device)
                if k > 0:
                    if cfg.alg_temp == 0:
                        sel = torch.topk(full_conf, k).indices                          # [B, k]
                    else:
                        sel = torch.multinomial(F.softmax(full_conf / cfg.alg_temp, dim=-1), k, generator=gen)
                fed_transfer = torch.zeros_like(mask_index)
                fed_transfer[0, sel[0]] = True
            else:
                conf, x0 = _sample_tokens(logits[mask_index], cfg, gen, DreamAlg.MASKGIT_PLUS)   # fed masks
                full_conf = torch.full(fed.shape, -math.inf, dtype=logits.dtype, device=x.device)
                full_conf[mask_index] = conf
                full_conf[:, bl:] = -math.inf
                k = int((x[:, start:end] == mask_id).sum())
                fed_transfer = torch.zeros_like(mask_index)
                if k > 0:
                    top_conf, sel = torch.topk(full_conf, k)                            # [B, k]
                    fed_transfer[0, sel[0, 0]] = True
                    for j in range(1, k):
                        if top_conf[0, j] >= cfg.threshold:
                            fed_transfer[0, sel[0, j]] = True
            cand = torch.full_like(fed, mask_id)
            cand[mask_index] = x0
            fed[fed_transfer] = cand[fed_transfer]
            transfer = torch.zeros_like(x, dtype=torch.bool)
            transfer[:, start:hi] = fed_transfer
            record(transfer)
            if not (x[:, start:end] == mask_id).any():
                break
            i += 1
    return ReferenceResult(x, P, step, step, history, commit_step)


def generate(model: Model, prompt_ids: torch.Tensor, cfg: ReferenceConfig, *,
             mask_id: int | None = None) -> ReferenceResult:
    """Dispatch on the config type: ``LladaConfig`` -> llada_generate, ``DreamConfig`` -> dream_generate,
    ``ApdConfig`` -> apd_generate, ``FastDllmDreamConfig`` -> fastdllm_dream_generate."""
    if isinstance(cfg, LladaConfig):
        return llada_generate(model, prompt_ids, cfg, mask_id=mask_id)
    if isinstance(cfg, FastDllmDreamConfig):
        return fastdllm_dream_generate(model, prompt_ids, cfg, mask_id=mask_id)
    if isinstance(cfg, DreamConfig):
        return dream_generate(model, prompt_ids, cfg, mask_id=mask_id)
    if isinstance(cfg, ApdConfig):
        return apd_generate(model, prompt_ids, cfg, mask_id=mask_id)
    raise ConfigError(f"generate needs a LladaConfig, DreamConfig, ApdConfig or FastDllmDreamConfig, "
                      f"got {type(cfg).__name__}")

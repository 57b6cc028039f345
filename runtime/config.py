"""DecodeConfig: every decoding knob in one frozen dataclass (docs/algorithms.md explains each).

One config drives the one decode loop: a cache policy (which rows each layer recomputes)
and a commit policy (which masked tokens become real), plus their numbers. Values are
checked in ``__post_init__``; strings are accepted for enum fields and coerced (every choice is
spelled with hyphens, ``"dllm-cache"``, ``"per-token"``; underscores are accepted too), unknown keys
raise (``DecodeConfig.from_dict``).
"""

from __future__ import annotations

import dataclasses
import enum
import math

from dllm.errors import ConfigError


class CachePolicyKind(str, enum.Enum):
    FULL = "full"                    # every row of every layer: the reference
    PREFIX = "prefix"                # Fast-dLLM prefix cache
    DUAL = "dual"                    # Fast-dLLM dual cache
    DLLM_CACHE = "dllm-cache"        # dLLM-Cache
    DCU = "dcu"                      # Dynamic Cache Update
    DCU_REFERENCE = "dcu-reference"  # DCU as released: value proxy, uniform budget, intervals 5000/5000


class CommitPolicyKind(str, enum.Enum):
    SCHEDULE = "schedule"            # LLaDA fixed count per step
    THRESHOLD = "threshold"          # Fast-dLLM top-1 + conf >= theta
    FACTOR = "factor"                # Fast-dLLM n-th most confident >= 1 - f/(n+1)
    APD = "apd"                      # Adaptive Parallel Decoding


class Proxy(str, enum.Enum):
    INPUT = "input"                  # cosine distance of the layer input rows vs the previous step
    VALUE = "value"                  # cosine distance of V = W_V norm(h) vs the gen V cache (needs vproj)


class Allocation(str, enum.Enum):
    PROPORTIONAL = "proportional"    # B_total * s_l / sum(s)
    SOFTMAX = "softmax"              # B_total * softmax(temp * s)_l
    UNIFORM = "uniform"              # budget rows for every layer


class ApdMode(str, enum.Enum):
    GLOBAL = "global"                # one scalar threshold (mode 1)
    PER_TOKEN = "per-token"          # one threshold per gen position (mode 2)


class Remasking(str, enum.Enum):
    LOW_CONFIDENCE = "low-confidence"
    RANDOM = "random"


class Alg(str, enum.Enum):
    """Confidence used to rank masked positions (Dream's ``alg``; LLaDA's low-confidence = maskgit-plus)."""
    MASKGIT_PLUS = "maskgit-plus"    # probability of the chosen token
    TOPK_MARGIN = "topk-margin"      # p1 - p2
    ENTROPY = "entropy"              # sum p log p (negative entropy: higher is more confident)
    ORIGIN = "origin"                # no ranking: each mask moves with probability 1 - s/t


_ENUMS = {"cache": CachePolicyKind, "commit": CommitPolicyKind, "proxy": Proxy, "allocation": Allocation,
          "apd_mode": ApdMode, "remasking": Remasking, "alg": Alg}
# field -> CLI flag, so errors name what the user typed
_FLAGS = {"gen_length": "--gen-length", "block_length": "--block-length", "steps": "--steps",
          "budget": "--budget", "window": "--window", "softmax_temp": "--softmax-temp",
          "refresh_interval": "--refresh-interval", "prompt_interval": "--prompt-interval",
          "gen_interval": "--gen-interval", "rho": "--rho", "threshold": "--threshold", "factor": "--factor",
          "tau0": "--tau0", "alpha": "--alpha", "beta": "--beta", "tau_min": "--tau-min",
          "tau_max": "--tau-max", "temperature": "--temperature", "seed": "--seed", "cache": "--cache",
          "commit": "--commit", "proxy": "--proxy", "allocation": "--allocation", "apd_mode": "--apd-mode",
          "remasking": "--remasking", "alg": "--alg", "eps": "--eps", "apd_block_reset": "--apd-block-reset",
          "alg_temp": "--alg-temp", "top_p": "--top-p", "top_k": "--top-k", "cfg_scale": "--cfg-scale",
          "fastdllm_dream": "--fastdllm-dream"}


def _flag(name: str) -> str:
    return f"{_FLAGS.get(name, name)} ({name})"


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode: canvas sizes, cache policy, commit policy and their settings.

    Defaults are those of docs/algorithms.md. Settings a policy does not use are ignored by it
    (e.g. ``budget`` outside ``dcu``), never silently reinterpreted.
    """
    # canvas and schedule
    gen_length: int = 256
    block_length: int = 32
    steps: int | None = None         # `schedule` only: steps over the whole generation (steps/num_blocks per
    #                                  block); None: gen_length, one token per step (the reference decoding)
    # policies
    cache: CachePolicyKind = CachePolicyKind.FULL
    commit: CommitPolicyKind = CommitPolicyKind.SCHEDULE
    # dcu
    budget: int = 32                 # rows per budgeted layer per step on average (total budget * (L-1))
    window: int = 32                 # forced rows: 2*floor(W/2)+1 centred on the last committed token
    proxy: Proxy = Proxy.INPUT
    allocation: Allocation = Allocation.PROPORTIONAL
    softmax_temp: float = 200.0      # `softmax` allocation temperature
    refresh_interval: int | None = None   # dcu full refresh every K steps; None = only the first step
    # dllm-cache and dcu region refresh, on the global step counter: (t-1) % K == 0
    prompt_interval: int = 5000
    gen_interval: int = 5000
    rho: float = 0.25                # dllm-cache: int(G*rho) rows partially updated
    # threshold / factor
    threshold: float = 0.9
    factor: float = 1.0
    # apd
    apd_mode: ApdMode = ApdMode.PER_TOKEN
    tau0: float = 0.9
    alpha: float = 0.01
    beta: float = 0.15
    tau_min: float | None = None     # optional clamp, off by default
    tau_max: float | None = None
    apd_block_reset: bool = False    # optional reset of tau at each block start, off by default
    # sampling
    remasking: Remasking = Remasking.LOW_CONFIDENCE   # LLaDA: rank by probability or U(0,1)
    alg: Alg = Alg.MASKGIT_PLUS      # Dream `schedule` only: how masked positions are ranked
    alg_temp: float = 0.0            # Dream `schedule` only: > 0 samples positions from softmax(conf/alg_temp)
    eps: float = 1e-3                # Dream `schedule` only: last timestep of linspace(1, eps, steps+1)
    temperature: float = 0.0         # 0 = greedy; LLaDA: float64 Gumbel-max, Dream: softmax(logits/T) draw
    top_p: float | None = None       # keep the smallest set of tokens with mass >= top_p (None = off)
    top_k: int | None = None         # keep the k most likely tokens (None = off; Dream's own code defaults to 50)
    cfg_scale: float = 0.0           # classifier-free guidance: un + (s+1)(cond - un), prompt masked in un
    seed: int = 0
    # Fast-dLLM's Dream port (prefix/dual + schedule/threshold, Dream only): each block's full step commits
    # just the block's first position; the schedule goes on at timestep 1 ranked by negative entropy, the
    # threshold mode is Fast-dLLM's confidence_threshold
    fastdllm_dream: bool = False

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", self.gen_length)
        for name, enum_cls in _ENUMS.items():
            value = getattr(self, name)
            if isinstance(value, str) and not isinstance(value, enum_cls):
                value = value.strip().lower().replace("_", "-")
            try:
                object.__setattr__(self, name, enum_cls(value))
            except ValueError:
                choices = ", ".join(e.value for e in enum_cls)
                raise ConfigError(f"{_flag(name)} got {getattr(self, name)!r}; expected one of {choices}") from None
        self._check_ints()
        self._check_floats()
        G, bl = self.gen_length, self.block_length
        if G % bl:
            raise ConfigError(f"--gen-length {G} is not a multiple of --block-length {bl}; pick a block length "
                              f"that divides it (e.g. {max(d for d in range(1, bl + 1) if G % d == 0)}) or round the gen length up to "
                              f"{-(-G // bl) * bl}")
        blocks = G // bl
        if (self.commit == CommitPolicyKind.SCHEDULE or self.fastdllm_dream) and self.steps % blocks:
            raise ConfigError(f"--steps {self.steps} is not a multiple of the number of blocks {blocks} "
                              f"(gen length {G} / block length {bl}); use --steps {-(-self.steps // blocks) * blocks}")
        if self.tau_min is not None and self.tau_max is not None and self.tau_min > self.tau_max:
            raise ConfigError(f"--tau-min {self.tau_min} is above --tau-max {self.tau_max}; swap them")
        if self.fastdllm_dream:
            self._check_fastdllm_dream()

    def _check_fastdllm_dream(self):
        if self.cache not in (CachePolicyKind.PREFIX, CachePolicyKind.DUAL):
            raise ConfigError(f"--fastdllm-dream reproduces Fast-dLLM's prefix/dual cache loop; got --cache "
                              f"{self.cache.value}: use --cache prefix or --cache dual")
        if self.commit not in (CommitPolicyKind.SCHEDULE, CommitPolicyKind.THRESHOLD):
            raise ConfigError(f"--fastdllm-dream has a schedule and a threshold mode; got --commit "
                              f"{self.commit.value}: use --commit schedule or --commit threshold")
        if self.alg == Alg.ORIGIN:
            raise ConfigError("--fastdllm-dream ranks positions by negative entropy whatever --alg says (as "
                              "Fast-dLLM's port does); --alg origin (no ranking) is Dream's own loop only: leave "
                              "--alg at its default")
        schedule = self.commit == CommitPolicyKind.SCHEDULE
        if schedule and self.steps // self.num_blocks < 2 and self.block_length > 1:
            raise ConfigError(f"--fastdllm-dream with --commit schedule needs at least 2 steps per block (one for "
                              f"the block's first position, then the schedule); got --steps {self.steps} over "
                              f"{self.num_blocks} blocks: use --steps {2 * self.num_blocks} or more")

    def _check_ints(self):
        positive = ("gen_length", "block_length", "steps", "prompt_interval", "gen_interval")
        non_negative = ("budget", "window", "seed")
        for name in positive + non_negative + ("refresh_interval",):
            v = getattr(self, name)
            if name == "refresh_interval" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{_flag(name)} must be an integer, got {v!r}")
            low = 0 if name in non_negative else 1
            if v < low:
                what = "at least 0" if low == 0 else "at least 1"
                raise ConfigError(f"{_flag(name)} must be {what}, got {v}")
        for name in ("apd_block_reset", "fastdllm_dream"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ConfigError(f"{_flag('top_k')} must be an integer >= 1, or None to keep every token; "
                              f"got {self.top_k!r}")

    def _check_floats(self):
        for name in ("eps", "softmax_temp", "rho", "threshold", "factor", "tau0", "alpha", "beta", "tau_min",
                     "tau_max", "temperature", "alg_temp", "top_p", "cfg_scale"):
            v = getattr(self, name)
            if v is None and name in ("tau_min", "tau_max", "top_p"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{_flag(name)} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        ranges = {"rho": (0.0, 1.0, "in (0, 1]"), "threshold": (0.0, 1.0, "in [0, 1]")}
        if not 0.0 < self.rho <= 1.0:
            raise ConfigError(f"{_flag('rho')} must be {ranges['rho'][2]}, got {self.rho}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{_flag('threshold')} must be {ranges['threshold'][2]}, got {self.threshold}")
        for name in ("tau0", "tau_min", "tau_max"):      # thresholds on a probability
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1] (a threshold on a token's probability), got {v}")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"{_flag('eps')} must be in (0, 1) (Dream's last timestep), got {self.eps}")
        if self.softmax_temp <= 0:
            raise ConfigError(f"{_flag('softmax_temp')} must be above 0, got {self.softmax_temp}")
        if self.factor <= 0:
            raise ConfigError(f"{_flag('factor')} must be above 0, got {self.factor}")
        if self.temperature < 0:
            raise ConfigError(f"{_flag('temperature')} must be at least 0 (0 = greedy), got {self.temperature}")
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError(f"--alpha and --beta must be at least 0, got alpha={self.alpha} beta={self.beta}")
        if self.alg_temp < 0:
            raise ConfigError(f"{_flag('alg_temp')} must be at least 0 (0 = the most confident positions), "
                              f"got {self.alg_temp}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{_flag('top_p')} must be in (0, 1], or None to keep every token; got {self.top_p}")
        if self.cfg_scale < 0:
            raise ConfigError(f"{_flag('cfg_scale')} must be at least 0 (0 = no guidance), got {self.cfg_scale}")

    # -- derived ------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        """`schedule` steps per block; the adaptive commits run until the block is empty (at most block_length)."""
        if self.commit == CommitPolicyKind.SCHEDULE:
            return self.steps // self.num_blocks
        return self.block_length

    def replace(self, **changes) -> "DecodeConfig":
        """A copy with ``changes`` applied (validated again; unknown keys raise ConfigError). Steps that
        followed the gen length (one token per step) follow a new ``gen_length`` too."""
        _check_keys(changes)
        if "gen_length" in changes and "steps" not in changes and self.steps == self.gen_length:
            changes = {**changes, "steps": None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeConfig":
        """Build from plain values (e.g. JSON); unknown keys raise ConfigError."""
        _check_keys(d)
        return cls(**d)


def _check_keys(d: dict) -> None:
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown DecodeConfig keys {unknown}; expected a subset of {sorted(known)}")

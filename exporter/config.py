"""ExportConfig and BuildConfig: what ``dllm-export`` is asked to do, validated once.

``ExportConfig`` is what the user chooses (checkpoint, output, dtype, sequence length,
backend). ``BuildConfig`` is what the TensorRT builder needs (optimization profiles,
timing cache); it is derived from an ``ExportConfig`` and the model's declarations with
``BuildConfig.for_export`` so the manifest, the builder and the runtime agree on it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path

from dllm.errors import ConfigError
from dllm.exporter.manifest import Profile
from dllm.exporter.quant_config import QuantConfig
from dllm.exporter.subgraphs import DYNAMIC_DIMS, DType, SubgraphDecl

SUPPORTED_OPSETS = (17,)      # TorchScript exporter, parsed by TensorRT 10.3 and ONNX Runtime
DEFAULT_MAX_SEQ_LEN = 2048    # used when the model allows more and the user does not say
DEFAULT_OPT_ROWS = 32         # typical rows recomputed per cached step (a block plus its neighbours)
DEFAULT_MAX_BATCH = 8         # sequences per step the profiles admit (a server's or an evaluation's batch)


class ExportBackend(str, enum.Enum):
    ONNX = "onnx"             # ONNX files only (run by ONNX Runtime, or built later)
    TENSORRT = "tensorrt"     # ONNX files plus TensorRT plans for this machine


def _enum(cls, value, what: str):
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not supported; expected one of "
                          f"{[m.value for m in cls]}") from None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """One export: a checkpoint directory in, an engine directory out (docs/engine-dir.md)."""
    checkpoint: Path
    out_dir: Path
    dtype: DType = DType.FP32
    max_seq_len: int | None = None       # None: min(model limit, DEFAULT_MAX_SEQ_LEN)
    backend: ExportBackend = ExportBackend.ONNX
    opt_rows: int = DEFAULT_OPT_ROWS     # TensorRT "cached" profile: optimal k
    max_rows: int | None = None          # TensorRT "cached" profile: largest k (None: 4 * opt_rows)
    max_batch: int = DEFAULT_MAX_BATCH   # largest B of every profile (manifest ``max_batch``)
    validate: bool = True
    with_vproj: bool = True              # also export the vproj_i value probes
    opset: int = SUPPORTED_OPSETS[0]
    quant: QuantConfig | None = None     # weight-only int8/int4 (exporter/quant_config.py)

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", Path(self.checkpoint).expanduser().absolute())
        object.__setattr__(self, "out_dir", Path(self.out_dir).expanduser().absolute())
        object.__setattr__(self, "dtype", _enum(DType, self.dtype, "dtype"))
        object.__setattr__(self, "backend", _enum(ExportBackend, self.backend, "backend"))
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(f"--max-seq-len (max_seq_len) must be at least 1, got {self.max_seq_len}")
        if self.opt_rows < 1:
            raise ConfigError(f"--opt-rows (opt_rows) must be at least 1, got {self.opt_rows}")
        if self.max_rows is not None and self.max_rows < self.opt_rows:
            raise ConfigError(f"--max-rows {self.max_rows} must be at least --opt-rows {self.opt_rows}; raise --max-rows "
                              "or lower --opt-rows")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch (max_batch) must be at least 1, got {self.max_batch}")
        if self.opset not in SUPPORTED_OPSETS:
            raise ConfigError(f"opset {self.opset} is not supported; use one of {list(SUPPORTED_OPSETS)} "
                              "(what TensorRT 10.3 on JetPack 6 parses and this exporter is tested with)")
        if self.quant is not None and self.dtype == DType.BF16:
            raise ConfigError("--quant needs --dtype fp16 or fp32: quantization calibrates and validates in ONNX "
                              "Runtime on the CPU, which has no bf16 MatMul (fp16 is what Jetson runs anyway)")
        self._check_apart()

    def _check_apart(self) -> None:
        """The output and the checkpoint must not contain each other (an export replaces its output whole),
        also through symbolic links."""
        for out, ckpt in ((self.out_dir, self.checkpoint), (Path(os.path.realpath(self.out_dir)),
                                                            Path(os.path.realpath(self.checkpoint)))):
            if out == ckpt or ckpt in out.parents:
                raise ConfigError(f"output {self.out_dir} is inside the checkpoint {self.checkpoint}; choose an "
                                  "output directory outside it")
            if out in ckpt.parents:
                raise ConfigError(f"the checkpoint {self.checkpoint} is inside the output {self.out_dir}, which an "
                                  "export replaces; choose an output directory that does not contain the checkpoint")

    def resolve_max_seq_len(self, model_limit: int) -> int:
        """The canvas length to export for, checked against the model's own limit."""
        if self.max_seq_len is None:
            return min(model_limit, DEFAULT_MAX_SEQ_LEN)
        if self.max_seq_len > model_limit:
            raise ConfigError(f"--max-seq-len {self.max_seq_len} is beyond the model's limit of {model_limit} "
                              f"positions (config.json); pass --max-seq-len {model_limit} or less")
        return self.max_seq_len


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """TensorRT build options. Profile 0 serves cached steps (small k), profile 1 refresh steps (k = N)."""
    profiles: tuple[Profile, ...]
    timing_cache: Path | None = None     # read if present, written after the build
    optimization_level: int | None = None  # builder_optimization_level; None keeps TensorRT's default

    def __post_init__(self):
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if not self.profiles:
            raise ConfigError("BuildConfig needs at least one optimization profile")
        for p in self.profiles:
            for d in set(p.min) | set(p.opt) | set(p.max):
                lo, mid, hi = p.min.get(d), p.opt.get(d), p.max.get(d)
                if None in (lo, mid, hi) or not 1 <= lo <= mid <= hi:
                    raise ConfigError(f"profile {p.name!r}: dim {d} needs 1 <= min <= opt <= max, "
                                      f"got min {lo}, opt {mid}, max {hi}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization_level must be in 0..5, got {self.optimization_level}")

    @classmethod
    def for_export(cls, cfg: ExportConfig, max_seq_len: int, decls: list[SubgraphDecl],
                   timing_cache: Path | None = None) -> "BuildConfig":
        return cls(make_profiles(decls, max_seq_len, cfg.opt_rows, cfg.max_rows, cfg.max_batch), timing_cache)


def make_profiles(decls: list[SubgraphDecl], max_seq_len: int, opt_rows: int,
                  max_rows: int | None = None, max_batch: int = DEFAULT_MAX_BATCH) -> tuple[Profile, ...]:
    """The two optimization profiles every subgraph is built with, over the dims the declarations use.

    - ``cached``: k in 1..opt_rows..max_rows (rows recomputed per cached step), N in 1..opt..max_seq_len.
    - ``refresh``: k = N, both in 1..opt..max_seq_len (full recompute, prefill).

    Both take any batch B in 1..max_batch (a layer's ``kv_len`` [B] follows B); TensorRT tunes for B = 1,
    the latency case, and the larger batches run the same plan.
    """
    used = {d for decl in decls for t in decl.inputs for d in t.dims if isinstance(d, str)}
    unknown = used - set(DYNAMIC_DIMS)
    if unknown:
        raise ConfigError(f"declarations use dynamic dims {sorted(unknown)} this builder has no range for; "
                          f"expected a subset of {list(DYNAMIC_DIMS)}")
    opt_n = min(max_seq_len, 512)
    k_opt = min(opt_rows, max_seq_len)
    k_max = min(max_rows if max_rows is not None else 4 * opt_rows, max_seq_len)
    k_max = max(k_max, k_opt)
    ranges = {
        "cached": {"B": (1, 1, max_batch), "k": (1, k_opt, k_max), "N": (1, opt_n, max_seq_len)},
        "refresh": {"B": (1, 1, max_batch), "k": (1, opt_n, max_seq_len), "N": (1, opt_n, max_seq_len)},
    }
    out = []
    for name, r in ranges.items():
        dims = [d for d in DYNAMIC_DIMS if d in used]
        out.append(Profile(name, {d: r[d][0] for d in dims}, {d: r[d][1] for d in dims},
                           {d: r[d][2] for d in dims}))
    return tuple(out)

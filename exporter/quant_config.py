"""QuantConfig: what ``dllm-export --quant`` is asked to do, validated once.

Weight-only quantization of the matrix products of the exported subgraphs:

- ``int8``: one scale per output channel (per-channel, symmetric).
- ``int4``: one scale per block of ``block_size`` consecutive input channels of each output channel
  (block-wise, symmetric); the block must divide every input dimension it is applied to.

Methods: ``rtn`` (round to nearest, no data needed) and ``awq`` (activation-aware: per input channel
scales searched on calibration canvases, then round to nearest). Activations stay in the export dtype.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from dllm.errors import ConfigError

DEFAULT_BLOCK_SIZE = 128      # int4 block along the input dim (TensorRT's and ModelOpt's default)
DEFAULT_CALIB_SAMPLES = 16    # calibration canvases for AWQ (plus a few held out to measure the error)
TASKS_SOURCE = "tasks"        # calibration on dllm.tools.tasks (what the shipped model was trained on)


class QuantBits(str, enum.Enum):
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return 8 if self == QuantBits.INT8 else 4


class QuantMethod(str, enum.Enum):
    RTN = "rtn"     # round to nearest
    AWQ = "awq"     # activation-aware weight quantization (scale search on calibration data)


def _enum(cls, value, what: str):
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not supported; expected one of {[m.value for m in cls]}") from None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of an export.

    calib: ``"tasks"`` (the generated task families of ``dllm.tools.tasks``), a text file (one sample per
        non-empty line) or a JSONL file (``text``, ``prompt``/``answer``, ``question``/``answer`` or
        ``messages`` per line); None: the tasks for the shipped model, none otherwise (then only ``rtn``).
    head, embed: also quantize the LM head / the embedding table (they stay in the export dtype by default:
        the head decides every token and the embedding is a row gather that reads almost nothing per step).
    """
    bits: QuantBits
    method: QuantMethod = QuantMethod.AWQ
    block_size: int = DEFAULT_BLOCK_SIZE
    calib: str | None = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    head: bool = False
    embed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bits", _enum(QuantBits, self.bits, "quantization"))
        object.__setattr__(self, "method", _enum(QuantMethod, self.method, "quantization method"))
        if self.calib is not None and self.calib != TASKS_SOURCE:
            path = Path(self.calib).expanduser().absolute()
            if not path.is_file():
                raise ConfigError(f"calibration file {path} does not exist; pass a text file (one sample per "
                                  f"line), a JSONL file, or '{TASKS_SOURCE}'")
            object.__setattr__(self, "calib", str(path))
        if self.bits == QuantBits.INT4 and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ConfigError(f"--quant-block-size must be a power of two of at least 16, got {self.block_size}")
        if self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be at least 1, got {self.calib_samples}")

    @property
    def block(self) -> int | None:
        """The int4 block size; None for int8 (per-channel)."""
        return self.block_size if self.bits == QuantBits.INT4 else None

    def check_dims(self, in_dims: dict[str, int]) -> None:
        """ConfigError unless the int4 block divides every input dim it is applied to ({what: dim})."""
        if self.block is None:
            return
        bad = {what: d for what, d in in_dims.items() if d % self.block}
        if bad:
            dims = sorted(set(in_dims.values()))
            fits = [b for b in (256, 128, 64, 32, 16) if all(d % b == 0 for d in dims)]
            hint = f"--quant-block-size {fits[0]}" if fits else "--quant int8"
            raise ConfigError(f"int4 block size {self.block} does not divide the input dims {bad} of this model; "
                              f"use {hint} (a block must divide every input dim: {dims})")

    def to_dict(self) -> dict:
        return {"bits": self.bits.bits, "format": self.bits.value, "method": self.method.value,
                "block_size": self.block, "head": self.head, "embed": self.embed}

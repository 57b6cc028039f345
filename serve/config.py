"""What dllm-serve loads, how it decodes when a request says nothing, where it listens; and the Ray
Serve settings of a scale-out deployment. Frozen and checked on construction; files are checked
when the model is loaded (``dllm.serve.app.load_state``)."""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Any, Mapping

from dllm.engines.base import Backend
from dllm.errors import ConfigError
from dllm.exporter.subgraphs import DType
from dllm.runtime import DecodeConfig, method_config


class Source(str, enum.Enum):
    ENGINE_DIR = "engine_dir"      # dllm-export output, any backend
    CHECKPOINT = "checkpoint"      # a Hugging Face checkpoint directory, torch backend only


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """One server (or one Ray Serve replica): the model, the default decoding, the HTTP address."""
    path: Path
    source: Source = Source.ENGINE_DIR
    backend: Backend = Backend.ONNXRUNTIME
    device: str = "cpu"
    threads: int = 1                 # CPU threads of the backend (ONNX Runtime intra-op, or torch); 0 = every core
    dtype: DType = DType.FP32        # checkpoint source only (torch weights)
    model_name: str = ""             # the `model` clients send; "" = the directory's name
    method: str = "dcu+apd"          # default decoding method (CACHE or CACHE+COMMIT, see method_config)
    block_length: int = 32           # default block length; max_tokens is rounded up to a multiple of it
    max_tokens: int = 256            # default max_tokens of a request that sends none
    max_queue: int = 256             # requests waiting beyond this get 503
    max_batch: int | None = None     # requests decoded together; None: the engines' limit on CUDA, 1 on the CPU
    cuda_graphs: bool = False        # torch backend on CUDA: replay captured CUDA graphs of whole steps and layers
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        for name, enum_cls in (("source", Source), ("backend", Backend), ("dtype", DType)):
            try:
                object.__setattr__(self, name, enum_cls(getattr(self, name)))
            except ValueError:
                choices = ", ".join(e.value for e in enum_cls)
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of {choices}") from None
        if self.source == Source.CHECKPOINT and self.backend != Backend.TORCH:
            raise ConfigError(f"--checkpoint runs on --backend torch, not {self.backend.value}; export the "
                              f"checkpoint with `dllm-export {self.path} OUT` to serve it on other backends")
        if not self.model_name:
            object.__setattr__(self, "model_name", self.path.resolve().name or "dllm")
        for name, low in (("threads", 0), ("block_length", 1), ("max_tokens", 1), ("max_queue", 1),
                          ("port", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ConfigError(f"--max-batch must be an integer >= 1, got {self.max_batch!r}")
        if self.cuda_graphs and (self.backend != Backend.TORCH or not self.device.startswith("cuda")):
            raise ConfigError(f"--cuda-graphs captures the torch backend's steps on a GPU, not --backend "
                              f"{self.backend.value} on --device {self.device}; use --backend torch (or --checkpoint) "
                              "with --device cuda, or drop --cuda-graphs")
        if self.port > 65535:
            raise ConfigError(f"--port must be at most 65535, got {self.port}")
        self.default_decode_config()      # the method name and block length must make a config

    def default_decode_config(self) -> DecodeConfig:
        """The decoding of a request that sets nothing: ``method`` at ``block_length``, greedy, seed 0,
        ``max_tokens`` rounded up to whole blocks, one token per step for the ``schedule`` commit."""
        gen = round_up(self.max_tokens, self.block_length)
        return method_config(self.method, DecodeConfig(gen_length=gen, block_length=self.block_length, steps=gen))


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (both >= 1)."""
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """A Ray Serve deployment of the same app: replicas, the resources each one holds, autoscaling."""
    replicas: int | None = 1                       # fixed replica count (None with autoscaling)
    autoscaling: Mapping[str, Any] | None = None   # Ray Serve autoscaling_config, passed through as given
    num_cpus: float = 1.0                          # CPUs each replica reserves
    num_gpus: float = 0.0                          # GPUs each replica reserves (1: its own GPU)
    max_ongoing_requests: int | None = None        # Ray Serve's per-replica limit (None: Ray's default)
    address: str | None = None                     # an existing cluster ("auto", "ray://..."); None starts one

    def __post_init__(self):
        if self.autoscaling is not None:
            if not isinstance(self.autoscaling, Mapping):
                raise ConfigError(f"--autoscaling must be a JSON object such as "
                                  f"'{{\"min_replicas\": 1, \"max_replicas\": 4}}', got {self.autoscaling!r}")
            if self.replicas is not None:
                raise ConfigError("pass --replicas or --autoscaling, not both (autoscaling sets the replica count)")
            object.__setattr__(self, "autoscaling", dict(self.autoscaling))
        elif isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('num_', '')}-per-replica must be a number >= 0, got {value!r}")
        if self.max_ongoing_requests is not None and (not isinstance(self.max_ongoing_requests, int)
                                                      or self.max_ongoing_requests < 1):
            raise ConfigError(f"--max-ongoing-requests must be an integer >= 1, got {self.max_ongoing_requests!r}")

"""``parse_device``: a ``--device`` string checked against this machine, with an error that names the fix.

``torch.device("bogus")`` raises a bare RuntimeError and ``torch.device("cuda")`` succeeds on a CPU
build of torch (the failure comes later, deep inside a backend); every tool and loader goes through
this one function instead.
"""

from __future__ import annotations

import torch

from dllm.errors import BackendError, ConfigError

DEVICE_HINT = "use cpu, cuda or cuda:N"


def parse_device(device: "str | torch.device", what: str = "--device", check_available: bool = True) -> torch.device:
    """``device`` as a torch.device that exists here: cpu, or a CUDA device torch can see.

    ConfigError for what is not a device at all, BackendError for a CUDA device this machine lacks
    (skipped with ``check_available=False``, for backends that say so themselves).
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        if not isinstance(device, str):
            raise ConfigError(f"{what} must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}; "
                              f"{DEVICE_HINT}")
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise ConfigError(f"{what} {device!r} is not a device; {DEVICE_HINT}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"{what} {device!r}: device type {dev.type!r} is not supported; {DEVICE_HINT}")
    if not check_available:
        return dev
    if not torch.cuda.is_available():
        raise BackendError(f"{what} {device!r} asked for a CUDA device, but this torch build ({torch.__version__}) "
                           "sees none (a CPU-only build, or no NVIDIA driver); use --device cpu, or install the "
                           "torch build for your CUDA version")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise BackendError(f"{what} {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                           "pick one of those")
    return dev

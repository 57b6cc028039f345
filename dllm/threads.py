"""CPU threads: one ``threads`` setting for every tool (``--threads``) and the Python API.

``threads`` is how many CPU threads one generation may use:

- ONNX Runtime on the CPU: the intra-op threads of every session (their pools never spin, see
  ``dllm.engines.ort_backend.OrtOptions.allow_spinning``); torch's own small ops between engine calls
  run on one thread.
- torch on the CPU: ``torch.set_num_threads(threads)`` while a generation runs (restored afterwards).
- CUDA and TensorRT: the GPU does the work; torch's CPU threads are left alone.

The defaults are fast for small models and do not collapse when other processes load the machine:

- ONNX Runtime (and TensorRT, whose CPU side is small): ``min(DEFAULT_MAX_THREADS, usable cores)``; the
  pools sleep instead of spinning, so idle threads cost nothing. On a 2-core machine under load, two
  threads ran a step of the shipped model in 8-9 ms against 22-27 ms with one.
- torch: 1. Its OpenMP pool spins between operators; with 2 threads on a loaded 2-core machine a step
  of the shipped model took 410 ms against 26-38 ms with one thread.

Raise ``threads`` for models of hundreds of millions of parameters on a CPU with idle cores.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from dllm.errors import ConfigError

DEFAULT_MAX_THREADS = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, else every core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(backend: str = "onnxruntime") -> int:
    """The default thread count of ``backend`` (see the module docstring)."""
    return 1 if str(getattr(backend, "value", backend)) == "torch" else min(DEFAULT_MAX_THREADS, usable_cores())


def resolve_threads(threads: int | None, backend: str = "onnxruntime") -> int:
    """``threads`` checked, or ``backend``'s default for None."""
    if threads is None:
        return default_threads(backend)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be a positive integer (CPU threads per generation), got {threads!r}; "
                          f"leave it out for the default ({default_threads(backend)} here)")
    return threads


def torch_threads_for(backend: str, device_type: str, threads: int) -> int | None:
    """Torch's CPU threads while engines of ``backend`` on ``device_type`` decode (None: leave them)."""
    if device_type != "cpu":
        return None
    return threads if backend == "torch" else 1   # other backends: torch only orchestrates (small ops)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count (None: no change)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)

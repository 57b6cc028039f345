"""Choosing the kernel path."""

import pytest
import torch

from dllm.errors import ConfigError
from dllm.kernels import KernelPath, make_ops, resolve_kernel_path
from dllm.kernels._triton import HAVE_TRITON


def test_auto_resolves_by_device():
    assert resolve_kernel_path("auto", "cpu") == KernelPath.TORCH
    assert resolve_kernel_path("plain", "cpu") == KernelPath.PLAIN
    assert make_ops("plain", "cpu") is None
    assert make_ops("torch", "cpu").path == KernelPath.TORCH


def test_bad_path_names_the_choices():
    with pytest.raises(ConfigError, match="auto, triton, torch, plain"):
        resolve_kernel_path("fast", "cpu")


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        resolve_kernel_path("triton", "cpu")

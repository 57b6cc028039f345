"""dllm.threads: one thread setting, its defaults per backend, and torch's count restored after a generation."""

import pytest
import torch

from dllm.errors import ConfigError
from dllm.threads import (DEFAULT_MAX_THREADS, default_threads, resolve_threads, torch_threads, torch_threads_for,
                          usable_cores)


def test_defaults_per_backend():
    assert default_threads("torch") == 1                     # torch's pool spins: one thread never collapses
    assert default_threads("onnxruntime") == min(DEFAULT_MAX_THREADS, usable_cores()) >= 1
    assert resolve_threads(None, "torch") == 1 and resolve_threads(3) == 3


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_counts_name_the_flag(bad):
    with pytest.raises(ConfigError, match="--threads must be a positive integer"):
        resolve_threads(bad)


def test_torch_threads_while_engines_decode():
    assert torch_threads_for("onnxruntime", "cpu", 4) == 1      # torch only orchestrates around ONNX Runtime
    assert torch_threads_for("torch", "cpu", 3) == 3
    assert torch_threads_for("torch", "cuda", 3) is None        # GPU runs leave torch alone


def test_torch_threads_context_restores():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before

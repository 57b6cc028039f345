"""Cosine change scores + copy: kernel vs twin."""

import pytest
import torch

from dllm.kernels.scores import cosine_distance_copy_torch, cosine_distance_copy_triton
from tests.kernels.conftest import rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 64), (2, 9, 4, 8)])
def test_kernel_matches_twin(device, dtype, shape):
    big = rand(shape[0], shape[1] + 5, *shape[2:], dtype=dtype, seed=1)
    a = big[:, 5:]                                                        # strided rows, like h[:, P:]
    prev = rand(*shape, dtype=dtype, seed=2)
    prev[:, 0] = a[:, 0]                                                  # an unchanged row: distance ~0
    p1, p2 = prev.clone(), prev.clone()
    want = cosine_distance_copy_torch(a, p1)
    got = cosine_distance_copy_triton(a, p2)
    assert got.dtype == torch.float32 and got.shape == shape[:2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[:, 0].abs().max() < 1e-6
    assert torch.equal(p2, a) and torch.equal(p1, a)

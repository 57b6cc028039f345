"""RMSNorm kernel vs its twin; the twin vs the exported layer's RMSNorm module."""

import pytest
import torch

from dllm.exporter.models.layers import RMSNorm
from dllm.kernels.rmsnorm import rms_norm_torch, rms_norm_triton
from tests.kernels.conftest import assert_close_ulps, rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 64), (1, 5, 96), (1, 1, 128)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_kernel_matches_twin(device, dtype, shape, with_delta):
    x = rand(*shape, dtype=dtype, seed=1, scale=3.0)
    w = rand(shape[-1], dtype=dtype, seed=2)
    delta = rand(*shape, dtype=dtype, seed=3) if with_delta else None
    want = rms_norm_torch(x, w, 1e-5, delta)
    got = rms_norm_triton(x, w, 1e-5, delta)
    assert got.dtype == dtype and got.shape == x.shape
    # the rsqrt may differ by a unit, then the normalised value and its product with the weight round
    assert_close_ulps(got, want, ulps=4 if got.is_cuda or dtype != torch.bfloat16 else 8)
    if dtype != torch.float32 and got.is_cuda:
        assert (got == want).float().mean() > 0.95                      # almost every element bit-equal


def test_strided_rows(device):
    x = rand(1, 10, 64, seed=4)[:, 3:]                                 # a row slice, as the executor passes
    w = rand(64, seed=5)
    assert_close_ulps(rms_norm_triton(x, w, 1e-6), rms_norm_torch(x, w, 1e-6), ulps=4)


def test_twin_is_the_module_math():
    norm = RMSNorm(48, 1e-5, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(3, 4, 48).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(rms_norm_torch(x, norm.weight, 1e-5), norm(x))
        d = torch.randn(3, 4, 48).to(torch.bfloat16)
        assert torch.equal(rms_norm_torch(x, norm.weight, 1e-5, d), norm(x + d))

"""silu(gate) * up kernel vs its twin."""

import pytest
import torch

from dllm.kernels.mlp import silu_mul_torch, silu_mul_triton
from tests.kernels.conftest import assert_close_ulps, rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 96), (2, 3, 4100)])
def test_kernel_matches_twin(device, dtype, shape):
    g, u = rand(*shape, dtype=dtype, seed=1, scale=4.0), rand(*shape, dtype=dtype, seed=2)
    got, want = silu_mul_triton(g, u), silu_mul_torch(g, u)
    assert got.shape == g.shape and got.dtype == dtype
    # the GPU's fast exponential and division err by a few units of fp32; bf16 rounding hides most of it
    assert_close_ulps(got, want, ulps=16 if dtype == torch.float32 else 8)


def test_strided_halves_of_one_product(device):
    gu = rand(2, 3, 2 * 100, seed=3, scale=3.0)
    gate, up = gu.chunk(2, dim=-1)                                      # views, rows strided by 200
    assert_close_ulps(silu_mul_triton(gate, up), silu_mul_torch(gate, up), ulps=16)

"""Delta scatter + residual update: the kernel equals the twin bit for bit and consumes the slot map."""

import pytest
import torch

from dllm.kernels.residual import residual_update_torch, residual_update_triton
from dllm.kernels.select import gather_rows_triton
from tests.kernels.conftest import assert_bit_equal, rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D,start,rows", [(1, 20, 64, 0, None), (1, 20, 64, 6, [6, 9, 13, 19]),
                                               (2, 33, 40, 5, [7, 8]), (1, 12, 16, 0, [0, 3, 11])])
def test_kernel_equals_twin(device, dtype, B, N, D, start, rows):
    h, ac, mc = rand(B, N, D, dtype=dtype, seed=1), rand(B, N, D, dtype=dtype, seed=2), rand(B, N, D, dtype=dtype, seed=3)
    want = [t.clone() for t in (h, ac, mc)]
    got = [t.clone() for t in (h, ac, mc)]
    kw_t, kw_g = {}, {}
    if rows is not None:
        r = torch.tensor(rows, device=device).expand(B, -1).contiguous()
        ar, mr = rand(B, len(rows), D, dtype=dtype, seed=4), rand(B, len(rows), D, dtype=dtype, seed=5)
        slot = torch.full((B, N), -1, dtype=torch.int32, device=device)
        gather_rows_triton(got[0], r, slot)                              # marks each row's slot
        kw_t = dict(rows=r, attn_rows=ar, mlp_rows=mr)
        kw_g = dict(rows=r, attn_rows=ar, mlp_rows=mr, slot=slot)
    residual_update_torch(*want, start, **kw_t)
    residual_update_triton(*got, start, **kw_g)
    for g, w in zip(got, want):
        assert_bit_equal(g, w)
    assert torch.equal(got[0][:, :start], h[:, :start])                  # rows below start untouched
    if rows is not None:
        assert (kw_g["slot"] == -1).all()                                 # consumed: clean for the next layer

"""RoPE + cache write: the kernel equals the twin bit for bit; the twin is the exported layer's math."""

import pytest
import torch

from dllm.exporter.models.layers import apply_rope, rope_cos_sin
from dllm.kernels.rope import rope_table, rope_to_cache_torch, rope_to_cache_triton
from tests.kernels.conftest import assert_bit_equal, rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,k,N,H,Hkv,hd", [(1, 5, 40, 4, 4, 16), (2, 3, 17, 6, 2, 32), (1, 40, 40, 2, 2, 8)])
def test_kernel_equals_twin(device, dtype, B, k, N, H, Hkv, hd):
    theta = 10000.0
    q, key, v = rand(B, k, H, hd, dtype=dtype, seed=1), rand(B, k, Hkv, hd, dtype=dtype, seed=2), \
        rand(B, k, Hkv, hd, dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    pos = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]).to(torch.int32).to(device)
    kc, vc = rand(B, N, Hkv, hd, dtype=dtype, seed=5), rand(B, N, Hkv, hd, dtype=dtype, seed=6)
    kc2, vc2 = kc.clone(), vc.clone()
    q_want, k_want = rope_to_cache_torch(q, key, v, pos, kc, vc, theta)
    q_got, k_got = rope_to_cache_triton(q, key, v, pos, kc2, vc2, theta, rope_table(N, hd, theta, device))
    assert_bit_equal(q_got, q_want)
    assert_bit_equal(k_got, k_want)
    assert_bit_equal(kc2, kc)                                        # same rows written, the rest untouched
    assert torch.equal(vc2, vc)


def test_twin_is_the_layer_math():
    q, key, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    pos = torch.tensor([[0, 5, 2, 9]], dtype=torch.int32)
    kc, vc = torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    keys = kc.clone()
    q_rot, k_rot = rope_to_cache_torch(q, key, v, pos, kc, vc, 500000.0)
    cos, sin = rope_cos_sin(pos, 8, 500000.0)
    assert torch.equal(q_rot, apply_rope(q, cos, sin)) and torch.equal(k_rot, apply_rope(key, cos, sin))
    keys[0, pos[0].long()] = k_rot[0]
    assert torch.equal(kc, keys) and torch.equal(vc[0, pos[0].long()], v[0])


def test_table_matches_the_layer_formula():
    cos, sin = rope_table(50, 16, 10000.0, torch.device("cpu"))
    c2, s2 = rope_cos_sin(torch.arange(50)[None], 16, 10000.0)
    torch.testing.assert_close(cos, c2[0, :, :8], rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, s2[0, :, 8:], rtol=0, atol=1e-7)


def test_strided_rows_of_one_qkv_product(device):
    B, k, N, H, Hkv, hd = 1, 6, 30, 4, 2, 16
    qkv = rand(B, k, (H + 2 * Hkv) * hd, seed=7)
    q, key, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    q, key, v = q.view(B, k, H, hd), key.view(B, k, Hkv, hd), v.view(B, k, Hkv, hd)
    pos = torch.tensor([[1, 4, 9, 20, 21, 29]], dtype=torch.int32, device=device)
    kc, vc = rand(B, N, Hkv, hd, seed=8), rand(B, N, Hkv, hd, seed=9)
    kc2, vc2 = kc.clone(), vc.clone()
    want = rope_to_cache_torch(q, key, v, pos, kc, vc, 10000.0)
    got = rope_to_cache_triton(q, key, v, pos, kc2, vc2, 10000.0, rope_table(N, hd, 10000.0, device))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)

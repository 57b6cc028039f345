"""Split-KV attention kernel vs its twin (the layer's own attention)."""

import pytest
import torch

from dllm.exporter.models.layers import DecoderLayer, key_valid
from dllm.exporter.models.writer import tiny_spec
from dllm.kernels.attention import MAX_ROWS, attention_torch, attention_triton, split_plan
from dllm.kernels.config import KernelPath
from dllm.kernels.ops import KernelOps
from tests.kernels.conftest import rand


def close(got, want):
    """fp32: products in full precision, sums in another order; bf16: the probabilities are rounded to bf16
    before they meet the values on the GPU (as flash attention does), a unit or two of the result."""
    assert got.shape == want.shape and got.dtype == want.dtype and not torch.isnan(got).any()
    err = (got.float() - want.float()).abs().max().item()
    scale = max(want.float().abs().max().item(), 1.0)
    tol = 1e-5 * scale if want.dtype == torch.float32 else 2 * torch.finfo(torch.bfloat16).eps * scale
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,k,N,H,Hkv,hd,lens,per_range", [
    (1, 5, 40, 4, 4, 16, None, 128),               # one key range
    (2, 3, 150, 6, 2, 32, [150, 77], 64),          # grouped heads, a padded sequence, several ranges
    (1, 40, 200, 2, 2, 16, None, 64),              # a range per 64 keys, the last one partial
    (3, 17, 130, 4, 1, 16, [1, 130, 64], 64),      # one key only; ranges past a sequence's length stay empty
    (1, 65, 1280, 32, 32, 128, None, 128),         # a DCU step of LLaDA-8B (prompt 1024 + gen 256)
])
def test_kernel_matches_twin(device, dtype, B, k, N, H, Hkv, hd, lens, per_range):
    q = rand(B, k, H, hd, dtype=dtype, seed=1)
    kc, vc = rand(B, N, Hkv, hd, dtype=dtype, seed=2), rand(B, N, Hkv, hd, dtype=dtype, seed=3)
    kv_len = torch.tensor(lens or [N] * B, dtype=torch.int32, device=device)
    want = attention_torch(q, kc, vc, kv_len, padded=lens is not None)
    close(attention_triton(q, kc, vc, kv_len, keys_per_range=per_range), want)


def test_padding_keys_are_never_read(device):
    B, k, N, H, hd = 2, 4, 100, 2, 16
    q, kc, vc = rand(B, k, H, hd, seed=1), rand(B, N, H, hd, seed=2), rand(B, N, H, hd, seed=3)
    kv_len = torch.tensor([100, 37], dtype=torch.int32, device=device)
    want = attention_torch(q, kc, vc, kv_len)
    kc[1, 37:], vc[1, 37:] = float("nan"), float("nan")      # a padded sequence's tail: garbage, never read
    close(attention_triton(q, kc, vc, kv_len, keys_per_range=64), want)


def test_a_longer_canvas_changes_nothing(device):
    """The key ranges do not depend on the canvas: a sequence in a batch's longer canvas (its rows past
    kv_len padding) gets bit for bit what it gets on its own canvas."""
    k, n, H, hd = 7, 150, 2, 16
    q, kc, vc = rand(1, k, H, hd, seed=1), rand(1, n, H, hd, seed=2), rand(1, n, H, hd, seed=3)
    alone = attention_triton(q, kc, vc, torch.tensor([n], dtype=torch.int32, device=device), keys_per_range=64)
    pad = torch.full((1, 100, H, hd), float("nan"), device=device)
    kc2, vc2 = torch.cat([kc, pad], 1), torch.cat([vc, pad], 1)
    batched = attention_triton(q, kc2, vc2, torch.tensor([n], dtype=torch.int32, device=device), keys_per_range=64)
    assert torch.equal(batched, alone)


def test_split_plan():
    assert split_plan(rows=65, n=1280) == (128, 10)       # LLaDA-8B: 32 heads x 10 ranges = 320 programs
    assert split_plan(rows=5, n=40) == (16, 1)
    assert split_plan(rows=5, n=129, keys_per_range=64) == (16, 3)
    with pytest.raises(ValueError, match="multiple of 64"):
        split_plan(rows=5, n=40, keys_per_range=100)


def test_head_dim_must_be_a_power_of_two(device):
    q, kc = rand(1, 2, 2, 24, seed=1), rand(1, 8, 2, 24, seed=2)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        attention_triton(q, kc, kc, torch.tensor([8], dtype=torch.int32, device=device))


def test_twin_is_the_layers_attention():
    spec = tiny_spec("dream")                                   # grouped heads
    layer = DecoderLayer(spec)
    H, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    q, kc, vc = torch.randn(2, 3, H, hd), torch.randn(2, 10, Hkv, hd), torch.randn(2, 10, Hkv, hd)
    kv_len = torch.tensor([10, 6], dtype=torch.int32)
    want = layer.attend(q, kc, vc, key_valid(kv_len, 10))
    assert torch.equal(layer.o_proj(attention_torch(q, kc, vc, kv_len)), want)


def test_ops_use_the_kernel_when_asked_and_for_few_rows_only(device, monkeypatch):
    """split_kv on the Triton path: up to MAX_ROWS query rows go to the kernel, a full recompute keeps torch's
    attention; without split_kv (the default) and on the torch path, torch's attention always."""
    calls = []
    twin = lambda *a: calls.append("torch") or attention_torch(*a)              # noqa: E731
    kernel = lambda *a: calls.append("triton") or attention_triton(*a)          # noqa: E731
    monkeypatch.setattr("dllm.kernels.ops._KERNELS", {"attention": (twin, kernel)})
    kc = rand(1, MAX_ROWS + 1, 1, 16, seed=2)
    kv_len = torch.tensor([MAX_ROWS + 1], dtype=torch.int32, device=device)
    for ops in (KernelOps(KernelPath.TRITON, device, split_kv=True), KernelOps(KernelPath.TRITON, device),
                KernelOps(KernelPath.TORCH, device, split_kv=True)):
        for k in (MAX_ROWS, MAX_ROWS + 1):
            ops.attention(rand(1, k, 1, 16, seed=k), kc, kc, kv_len)
    assert calls == ["triton", "torch"] + ["torch"] * 4

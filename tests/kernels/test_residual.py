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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,D,G,gen_start,start,rows", [
    (1, 24, 64, 16, [8], 8, [8, 11, 20]),           # one sequence, DCU: rows and scores over the gen rows
    (2, 30, 40, 12, [18, 10], 4, [11, 21]),          # padded batch: each sequence's gen rows start elsewhere
    (1, 20, 16, 20, [0], 0, None),                   # a full layer, the whole canvas generated
])
@pytest.mark.parametrize("with_scores", [True, False])
def test_next_layer_scores_in_the_same_pass(device, dtype, B, N, D, G, gen_start, start, rows, with_scores):
    """With prev/gen_start the update also takes the next layer's change scores of the rows it wrote: bit
    for bit what the residual kernel then the scores kernel give, to rounding what the twins give."""
    from dllm.kernels.scores import cosine_distance_copy_triton

    h, ac, mc = rand(B, N, D, dtype=dtype, seed=1), rand(B, N, D, dtype=dtype, seed=2), rand(B, N, D, dtype=dtype, seed=3)
    prev = rand(B, G, D, dtype=dtype, seed=6)
    gs = torch.tensor(gen_start, dtype=torch.int32, device=device)
    kw = {}
    if rows is not None:
        r = torch.tensor(rows, device=device).expand(B, -1).contiguous()
        kw = dict(rows=r, attn_rows=rand(B, len(rows), D, dtype=dtype, seed=4),
                  mlp_rows=rand(B, len(rows), D, dtype=dtype, seed=5))

    def run(fn, fused):
        hh, a, m, p = h.clone(), ac.clone(), mc.clone(), prev.clone()
        slot = torch.full((B, N), -1, dtype=torch.int32, device=device)
        if rows is not None:
            gather_rows_triton(hh, kw["rows"], slot)
        d = torch.full((B, G), float("nan"), device=device) if with_scores else None
        extra = dict(slot=slot) if fn is residual_update_triton else {}
        if fused:
            fn(hh, a, m, start, **kw, **extra, prev=p, gen_start=gs, d=d)
        else:                                         # the two passes it replaces
            fn(hh, a, m, start, **kw, **extra)
            idx = gs.long()[:, None] + torch.arange(G, device=device)
            gen = torch.gather(hh, 1, idx[..., None].expand(-1, -1, D))
            if with_scores:
                d = cosine_distance_copy_triton(gen, p)
            else:
                p.copy_(gen)
        return hh, p, d

    got_h, got_p, got_d = run(residual_update_triton, True)
    two_h, two_p, two_d = run(residual_update_triton, False)
    twin_h, twin_p, twin_d = run(residual_update_torch, True)
    assert torch.equal(got_h, two_h) and torch.equal(got_p, two_p)
    assert_bit_equal(got_h, twin_h)
    assert_bit_equal(got_p, twin_p)
    for b, s in enumerate(gen_start):
        assert torch.equal(got_p[b], got_h[b, s:s + G])           # prev now holds each sequence's gen rows
    if with_scores:
        assert torch.equal(got_d, two_d) and not torch.isnan(got_d).any()
        torch.testing.assert_close(got_d, twin_d, rtol=1e-5, atol=2e-6 if dtype == torch.float32 else 2e-2)

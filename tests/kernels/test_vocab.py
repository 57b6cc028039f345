"""Per-row vocabulary statistics: kernel vs the float64 twin."""

import pytest
import torch

from dllm.kernels.vocab import vocab_stats_torch, vocab_stats_triton
from tests.kernels.conftest import rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,R,V", [(1, 5, 100), (2, 3, 5000), (1, 2, 9000)])
@pytest.mark.parametrize("with_prev", [False, True])
def test_kernel_matches_twin(device, dtype, B, R, V, with_prev):
    logits = rand(B, R, V, dtype=dtype, seed=V + R, scale=4.0)
    logits[0, 0, 7] = logits[0, 0].max() + 3                              # a peaked row
    if R > 1:
        logits[0, 1, 3] = logits[0, 1, 11] = logits[0, 1].max() + 1      # a tied maximum: first index, c = 1 - p_max
    prev = rand(B, R, V, dtype=dtype, seed=V + R + 1, scale=4.0) if with_prev else None
    want = vocab_stats_torch(logits, prev, want_c=True)
    got = vocab_stats_triton(logits, prev, want_c=True)
    assert torch.equal(got.x0, want.x0)
    for name in ("conf", "c") + (("H",) if with_prev else ()):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-11, atol=1e-13)
    if R > 1:
        assert got.x0[0, 1] == 3
    assert got.H is None if not with_prev else got.H.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_previous_rows_read_from_a_table_equal_those_passed_alone(device, dtype):
    """prev_rows: each row against its own row of a [B, G, V] table (a batch's sequences at different rows
    of their tables, repeated rows included) gives exactly what passing those rows gathered gives, on both paths."""
    B, R, G, V = 3, 4, 9, 700
    logits = rand(B, R, V, dtype=dtype, seed=5, scale=4.0)
    table = rand(B, G, V, dtype=dtype, seed=6, scale=4.0)
    rows = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 7], [8, 8, 8, 8]], device=device)
    gathered = torch.stack([table[b, rows[b]] for b in range(B)])
    for fn in (vocab_stats_torch, vocab_stats_triton):
        want, got = fn(logits, gathered, want_c=True), fn(logits, table, want_c=True, prev_rows=rows)
        for name in ("x0", "conf", "c", "H"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (fn.__name__, name)

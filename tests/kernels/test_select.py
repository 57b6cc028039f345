"""DCU row selection and row gather: kernel == twin, ties to the lower row, windows at the edges."""

import pytest
import torch

from dllm.kernels.select import (gather_rows_torch, gather_rows_triton, select_rows_batched_torch,
                                 select_rows_batched_triton, select_rows_torch, select_rows_triton)
from tests.kernels.conftest import DEVICE, rand


def _window(start, size, device=DEVICE):
    return torch.arange(start, start + size, device=device)


@pytest.mark.parametrize("G,win_start,win,k", [(32, 10, 5, 4), (32, 0, 5, 6), (32, 27, 5, 6), (40, 3, 9, 31),
                                              (64, 20, 33, 0), (200, 50, 33, 32), (16, 0, 0, 5)])
def test_select_kernel_equals_twin(device, G, win_start, win, k):
    d = rand(G, seed=G + k).abs()
    window = _window(win_start, win) if win else None
    want = select_rows_torch(d, window, k, prompt_len=11)
    got = select_rows_triton(d, window, k, prompt_len=11)
    assert torch.equal(got, want)
    assert got.numel() == win + k and bool((got[1:] > got[:-1]).all())   # sorted, no duplicates


def test_ties_go_to_the_lower_row(device):
    d = torch.tensor([0.5, 0.2, 0.5, 0.5, 0.1, 0.2, 0.5, 0.0], device=device)
    for k in range(0, 7):
        want = select_rows_torch(d, _window(7, 1), k, 0)
        assert torch.equal(select_rows_triton(d, _window(7, 1), k, 0), want)
    assert select_rows_torch(d, _window(7, 1), 2, 0).tolist() == [0, 2, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernel_equals_twin_and_marks_slots(device, dtype):
    B, N, D = 2, 30, 48
    h = rand(B, N, D, dtype=dtype, seed=3)
    rows = torch.tensor([[2, 5, 17, 29], [0, 3, 3, 3]], device=device)          # each sequence its own rows
    slot = torch.full((B, N), -1, dtype=torch.int32, device=device)
    h_want, pos_want = gather_rows_torch(h, rows)
    h_got, pos_got = gather_rows_triton(h, rows, slot)
    assert torch.equal(h_got, h_want) and torch.equal(pos_got, pos_want) and pos_got.dtype == torch.int32
    assert torch.equal(h_got[1, 1], h[1, 3]) and torch.equal(h_got[0, 2], h[0, 17])
    assert slot[0].cpu().tolist() == [-1 if r not in (2, 5, 17, 29) else [2, 5, 17, 29].index(r) for r in range(N)]
    assert slot[1, 0] == 0 and slot[1, 3] in (1, 2, 3) and int((slot[1] >= 0).sum()) == 2   # a repeated row: any copy


@pytest.mark.parametrize("G,win,k", [(32, 5, 4), (40, 9, 31), (64, 33, 0), (200, 33, 32), (16, 0, 5), (24, 4, 40)])
def test_batched_selection_equals_each_sequence_alone(device, G, win, k):
    """One launch for a batch: row b is exactly what select_rows gives sequence b alone, on both paths, with
    each sequence's own window start (edges included) and first gen row."""
    B = 5
    d = rand(B, G, seed=G + win + k).abs()
    d[1, ::3] = d[1, 0]                                                      # ties inside one sequence
    starts = [0, G - win, min(3, G - win), (G - win) // 2, 1 if G - win >= 1 else 0]
    win_start = torch.tensor(starts, dtype=torch.int32, device=device)
    gen_start = torch.tensor([11, 7, 30, 11, 0], dtype=torch.int32, device=device)
    alone = torch.stack([select_rows_torch(d[b], _window(starts[b], win) if win else None, k, int(gen_start[b]))
                         for b in range(B)])
    for fn in (select_rows_batched_torch, select_rows_batched_triton):
        got = fn(d, win_start, win, k, gen_start)
        assert got.dtype == torch.long and torch.equal(got, alone), fn.__name__


def _nan_scores(device, seed):
    """Three sequences' scores [3, 32], one all NaN and one partly (an idle slot's garbage), their window
    starts (both edges) and their first gen row (10)."""
    d = rand(3, 32, seed=seed).abs()
    d[2] = float("nan")
    d[1, 7:20] = float("nan")
    win_start = torch.tensor([0, 3, 27], dtype=torch.int32, device=device)
    return d, win_start, torch.full((3,), 10, dtype=torch.int32, device=device)


def test_batched_selection_stays_inside_its_rows_when_scores_are_nan(device):
    """Garbage scores (an idle slot's) may be NaN: each sequence still gets win + k valid rows of its own."""
    B, G, win, k = 3, 32, 5, 4
    d, win_start, gen_start = _nan_scores(device, seed=1)
    for fn in (select_rows_batched_torch, select_rows_batched_triton):
        got = fn(d, win_start, win, k, gen_start)
        assert got.shape == (B, win + k)
        assert bool(((got >= 10) & (got < 10 + G)).all())
        assert bool((got[:, 1:] > got[:, :-1]).all()), fn.__name__                 # sorted, no duplicates
    alone = select_rows_torch(d[0], _window(0, win), k, 10)
    assert torch.equal(select_rows_batched_triton(d, win_start, win, k, gen_start)[0], alone)


@pytest.mark.parametrize("G,win,k", [(32, 5, 4), (40, 9, 31), (64, 33, 0), (200, 33, 32), (24, 4, 40), (16, 1, 15)])
def test_batched_selection_with_a_k_per_sequence(device, G, win, k):
    """Each sequence its own k (DCU's proportional budgets): row b is select_rows of sequence b alone with
    its k, then its last row repeated up to win + k, on both paths."""
    B = 5
    d = rand(B, G, seed=G + win + k + 1).abs()
    d[2, ::2] = d[2, 1]                                                      # ties inside one sequence
    cap = max(0, min(k, G - win))
    ks = [cap, 0, cap // 2, max(0, cap - 1), k + 7]                          # above k: held to k
    starts = [0, G - win, min(3, G - win), (G - win) // 2, 1 if G - win >= 1 else 0]
    win_start = torch.tensor(starts, dtype=torch.int32, device=device)
    gen_start = torch.tensor([11, 7, 30, 11, 0], dtype=torch.int32, device=device)
    k_slot = torch.tensor(ks, dtype=torch.int32, device=device)
    want = []
    for b in range(B):
        own = select_rows_torch(d[b], _window(starts[b], win), min(ks[b], cap), int(gen_start[b]))
        want.append(torch.cat([own, own[-1:].expand(win + cap - own.numel())]))
    want = torch.stack(want)
    for fn in (select_rows_batched_torch, select_rows_batched_triton):
        got = fn(d, win_start, win, k, gen_start, k_slot)
        assert got.shape == (B, win + cap) and torch.equal(got, want), fn.__name__
    with pytest.raises(ValueError, match="needs a window"):
        select_rows_batched_torch(d, win_start, 0, k, gen_start, k_slot)


def test_a_k_per_sequence_with_nan_scores_stays_inside_its_rows(device):
    B, G, win, k = 3, 32, 5, 6
    d, win_start, gen_start = _nan_scores(device, seed=2)
    k_slot = torch.tensor([6, 2, 0], dtype=torch.int32, device=device)
    for fn in (select_rows_batched_torch, select_rows_batched_triton):
        got = fn(d, win_start, win, k, gen_start, k_slot)
        assert got.shape == (B, win + k)
        assert bool(((got >= 10) & (got < 10 + G)).all()) and bool((got[:, 1:] >= got[:, :-1]).all())
        for b, n in enumerate((win + 6, win + 2, win)):                       # its own rows, then repeats
            assert got[b, :n].unique().numel() == n and bool((got[b, n - 1:] == got[b, n - 1]).all())

"""Kernel tests run every Triton kernel against its torch twin: on CUDA when present, else in Triton's
CPU interpreter (set up by tests/conftest.py)."""

import pytest
import torch

from dllm.kernels._triton import HAVE_TRITON, triton_usable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed (pip install triton)")
    ok, why = triton_usable(DEVICE)
    if not ok:
        pytest.skip(why)
    return DEVICE


def rand(*shape, dtype=torch.float32, seed=0, device=DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or -7 (ints) so an unwritten element fails the comparison."""
    return t.fill_(float("nan") if t.is_floating_point() else -7)


def assert_close_ulps(got, want, ulps=1):
    """Equal up to ``ulps`` units in the last place of ``want``'s dtype (and never NaN)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any()
    finfo = torch.finfo(want.dtype)
    tol = ulps * finfo.eps * want.float().abs().clamp(min=finfo.tiny)
    assert ((got.float() - want.float()).abs() <= tol).all(), (got.float() - want.float()).abs().max()


def assert_bit_equal(got, want, ulps_interpreted=2):
    """Bit-identical, except bf16 under Triton's CPU interpreter: its float32 -> bfloat16 cast truncates
    instead of rounding to nearest even (compiled Triton rounds like torch), so allow a few units there."""
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        # a truncated intermediate errs by up to one unit of the intermediate, which cancellation can
        # make larger than a unit of the result: bound by the tensor's scale instead
        tol = ulps_interpreted * torch.finfo(torch.bfloat16).eps * max(want.float().abs().max().item(), 1.0)
        assert not torch.isnan(got).any() and (got.float() - want.float()).abs().max() <= tol
    else:
        assert torch.equal(got, want)

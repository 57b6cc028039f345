"""Feed and output-buffer checks of the Engine base class: every message names what arrived and what was expected."""

from __future__ import annotations

import pytest
import torch

from dllm.errors import BackendError
from dllm.engines.base import Engine
from dllm.exporter.models.writer import tiny_spec
from dllm.exporter.subgraphs import declare

SIZES = {"B": 1, "k": 3, "N": 8}


class EchoEngine(Engine):
    """Minimal real backend: zeros of the declared outputs (the checks are what is under test)."""

    def _run(self, feeds, out):
        out = out if out is not None else self.allocate_outputs(self.dim_sizes(feeds))
        for t in out.values():
            t.zero_()
        return out


@pytest.fixture
def layer():
    decl = next(d for d in declare(tiny_spec("dream"), "fp32") if d.name == "layer_00")
    return EchoEngine(decl)


def feeds_for(engine, **sizes):
    return engine.decl.dummy_inputs({**SIZES, **sizes})


def test_good_feeds_run_and_allocate(layer):
    out = layer.run(feeds_for(layer))
    assert set(out) == {"k_rows", "v_rows", "attn_rows", "mlp_rows"}
    assert out["attn_rows"].shape == (1, 3, 64) and out["k_rows"].shape == (1, 3, 2, 16)


def test_wrong_names(layer):
    feeds = feeds_for(layer)
    feeds["rows"] = feeds.pop("h_rows")
    with pytest.raises(BackendError, match=r"feeds \[.*'rows'.*\] do not match the declared inputs \[.*'h_rows'"):
        layer.run(feeds)


def test_wrong_dtype(layer):
    feeds = feeds_for(layer)
    feeds["pos"] = feeds["pos"].long()
    with pytest.raises(BackendError, match=r"layer_00.pos: dtype torch.int64, expected torch.int32"):
        layer.run(feeds)


def test_wrong_rank(layer):
    feeds = feeds_for(layer)
    feeds["h_rows"] = feeds["h_rows"][0]
    with pytest.raises(BackendError, match=r"h_rows: shape \[3, 64\], expected rank 3 \['B', 'k', 64\]"):
        layer.run(feeds)


def test_wrong_static_dim(layer):
    feeds = feeds_for(layer)
    feeds["h_rows"] = torch.zeros(1, 3, 32)
    with pytest.raises(BackendError, match=r"h_rows: shape \[1, 3, 32\], expected \['B', 'k', 64\]"):
        layer.run(feeds)


def test_inconsistent_dynamic_dims(layer):
    feeds = feeds_for(layer)
    feeds["pos"] = torch.arange(4, dtype=torch.int32)[None]
    with pytest.raises(BackendError, match=r"layer_00.pos: dim k=4 disagrees with k=3 of an earlier input"):
        layer.run(feeds)
    feeds = feeds_for(layer)
    feeds["v_cache"] = torch.zeros(1, 9, 2, 16)
    with pytest.raises(BackendError, match=r"v_cache: dim N=9 disagrees with N=8"):
        layer.run(feeds)


def test_not_a_tensor(layer):
    feeds = feeds_for(layer)
    feeds["pos"] = [[0, 1, 2]]
    with pytest.raises(BackendError, match=r"pos: expected a torch.Tensor, got list"):
        layer.run(feeds)


def test_wrong_device(layer):
    feeds = {k: v.to("meta") for k, v in feeds_for(layer).items()}
    with pytest.raises(BackendError, match=r"h_rows: on meta, the engine runs on cpu"):
        layer.run(feeds)


def test_checked_once_per_signature_but_device_is_part_of_it(layer):
    feeds = feeds_for(layer)
    layer.run(feeds)
    assert len(layer._checked) == 1
    layer.run(feeds_for(layer))          # same signature: no new check
    assert len(layer._checked) == 1
    meta = {k: v.to("meta") for k, v in feeds.items()}
    with pytest.raises(BackendError, match="on meta"):
        layer.run(meta)


def test_output_buffers_checked(layer):
    feeds = feeds_for(layer)
    good = layer.allocate_outputs(SIZES)
    assert layer.run(feeds, good) is good
    bad = dict(good, attn_rows=torch.zeros(1, 4, 64))
    with pytest.raises(BackendError, match=r"'attn_rows' has shape \[1, 4, 64\], expected \[1, 3, 64\]"):
        layer.run(feeds, bad)
    bad = dict(good, mlp_rows=torch.zeros(1, 3, 64, dtype=torch.float16))
    with pytest.raises(BackendError, match=r"'mlp_rows' has dtype torch.float16, expected torch.float32"):
        layer.run(feeds, bad)
    bad = {k: v for k, v in good.items() if k != "v_rows"}
    with pytest.raises(BackendError, match=r"lack 'v_rows'"):
        layer.run(feeds, bad)
    bad = dict(good, attn_rows=torch.zeros(1, 64, 3).transpose(1, 2))
    with pytest.raises(BackendError, match=r"'attn_rows' is not contiguous"):
        layer.run(feeds, bad)

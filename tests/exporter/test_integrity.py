"""Integrity of an engine directory: manifest consistency, sizes, the verified stamp and full hashes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dllm.errors import EngineDirError, IntegrityError
from dllm.exporter.config import ExportConfig
from dllm.exporter.export import export_checkpoint
from dllm.exporter.integrity import STAMP, check_consistency, onnx_checks, verify_files
from dllm.exporter.manifest import MANIFEST, read_manifest
from dllm.exporter.models import write_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llada", "llada")
    return export_checkpoint(ExportConfig(ckpt, tmp_path_factory.mktemp("out") / "engines", max_seq_len=64,
                                          validate=False))


@pytest.fixture
def copy(exported, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(exported, out)
    verify_files(out, onnx_checks(read_manifest(out)))            # a copy is hashed once, then stamped
    return out


def check(out, full=False):
    m = read_manifest(out)
    check_consistency(out, m)
    return verify_files(out, onnx_checks(m), full=full)


def flip(path, offset, mask, keep_mtime=True):
    """Flip bits in place; put the modification time back, as a careless copy tool might."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def edit_manifest(out, edit):
    data = json.loads((out / MANIFEST).read_text())
    edit(data)
    (out / MANIFEST).write_text(json.dumps(data))


# -- the stamp --------------------------------------------------------------------------------------
def test_export_writes_a_stamp_so_loading_reads_no_file(exported):
    report = check(exported)
    assert (exported / STAMP).is_file()
    assert report.hashed_files == 0 and report.files == len(read_manifest(exported).files) > 10
    full = check(exported, full=True)
    assert full.hashed_files == full.files and full.hashed_bytes == full.bytes > 0


def test_a_copy_is_hashed_once_and_a_touched_file_again(exported, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported, out)                                  # new inodes: the stamp vouches for nothing
    assert check(out).hashed_files == check(out, full=True).files
    assert check(out).hashed_files == 0
    os.utime(out / "onnx" / "layer_01.onnx.data")
    assert check(out).hashed_files == 1


def test_an_unwritable_stamp_goes_to_the_cache(copy, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (copy / STAMP).unlink()
    (copy / STAMP).mkdir()                                          # the directory's stamp cannot be written
    first = check(copy)
    assert first.hashed_files == first.files
    assert list((tmp_path / "cache" / "dllm" / "verified").glob("*.json"))
    assert check(copy).hashed_files == 0
    os.utime(copy / "onnx" / "head.onnx")
    assert check(copy).hashed_files == 1


# -- corrupted files --------------------------------------------------------------------------------
@pytest.mark.parametrize("where, mask", [(3, 0x40), (0, 0x01), (2, 0x80)])   # exponent, mantissa (fp32, little-endian)
def test_a_flipped_bit_in_weights_is_caught_by_default(copy, where, mask):
    flip(copy / "onnx" / "layer_01.onnx.data", 4 * 1000 + where, mask)
    with pytest.raises(IntegrityError, match=r"\['onnx/layer_01.onnx.data'\] differ from the sha256 recorded"):
        check(copy)
    with pytest.raises(IntegrityError):
        check(copy, full=True)


def test_swapped_files_are_caught(copy):
    a, b = copy / "onnx" / "layer_00.onnx.data", copy / "onnx" / "layer_01.onnx.data"
    assert a.stat().st_size == b.stat().st_size                     # sizes alone cannot tell them apart
    os.rename(a, copy / "x")
    os.rename(b, a)
    os.rename(copy / "x", b)
    with pytest.raises(IntegrityError, match=r"layer_00.onnx.data.*layer_01.onnx.data.*files swapped"):
        check(copy)


def test_a_truncated_file_is_caught_by_its_size(copy):
    path = copy / "onnx" / "head.onnx.data"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(IntegrityError, match=r"head.onnx.data is \d+ bytes, the manifest recorded \d+"):
        check(copy)


def test_an_edited_tokenizer_is_caught(copy):
    path = copy / "tokenizer" / "tokenizer.json"
    text = path.read_text()
    path.write_text(text.replace('"!"', '"?"', 1) if '"!"' in text else text[:-1] + " ")   # same size
    with pytest.raises(IntegrityError, match="tokenizer/tokenizer.json"):
        check(copy)


def test_missing_files_are_named(copy):
    (copy / "onnx" / "vproj_01.onnx.data").unlink()
    with pytest.raises(EngineDirError, match=r"lacks files \['onnx/vproj_01.onnx.data'\].*re-run dllm-export"):
        check(copy)


# -- a tampered manifest ----------------------------------------------------------------------------
def _drop_layer_1(d):
    d["model"]["n_layers"] = 1
    d["subgraphs"] = [s for s in d["subgraphs"] if s["name"] not in ("layer_01", "vproj_01")]
    d["files"] = {k: v for k, v in d["files"].items() if "_01" not in k}


def _set_all_dtypes(d):
    d["dtype"] = "fp16"
    for s in d["subgraphs"]:
        for t in s["inputs"] + s["outputs"]:
            t["dtype"] = "fp16" if t["dtype"] == "fp32" else t["dtype"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(n_layers=3), r"model.n_layers is 3 but the manifest lists 2 layer subgraphs"),
    (lambda d: d["model"].update(n_layers=1), r"model.n_layers is 1 but the manifest lists 2"),
    (lambda d: d.update(dtype="fp16"), r"declares output 'h' as fp32, but the manifest's dtype 'fp16' implies fp16"),
    (lambda d: d["model"].update(d_model=128, head_dim=32), r"dims \['B', 'k', 64\], but the model spec implies"),
    (lambda d: d["model"].update(vocab_size=200), r"head declares output 'logits' with dims"),
    (lambda d: d.update(max_seq_len=4096), r"max_seq_len 4096 exceeds the model's limit"),
    (lambda d: d["subgraphs"][1].update(onnx="../../elsewhere.onnx"), r"not inside the engine directory"),
    (lambda d: d["files"].pop("onnx/head.onnx"), r"'files' lacks \['onnx/head.onnx'\]"),
    (_drop_layer_1, r"does not list \['layer_01.onnx', 'layer_01.onnx.data', 'vproj_01.onnx'"),
    (lambda d: d.update(schema_version=1), r"subgraph layer_00 has inputs \['h_rows', 'pos', 'kv_len', 'k_cache', "
                                           r"'v_cache'\], but schema version 1 implies \['h_rows', 'pos', 'k_cache'"),
    (lambda d: d.update(max_batch=4), r"max_batch is 4 but the profiles admit batches up to \[8\]"),
])
def test_a_tampered_manifest_is_caught(copy, edit, message):
    edit_manifest(copy, edit)
    with pytest.raises(EngineDirError, match=message):
        check(copy)


def _as_schema_1(d):
    d.update(schema_version=1)
    for s in d["subgraphs"]:
        s["inputs"] = [t for t in s["inputs"] if t["name"] != "kv_len"]


def test_a_schema_1_manifest_over_padded_graphs_is_caught_by_the_onnx_files(copy):
    from dllm.engines import open_engine_dir

    edit_manifest(copy, _as_schema_1)
    check(copy)                                                     # a consistent schema-1 manifest ...
    with pytest.raises(EngineDirError, match=r"layer_00: .*layer_00.onnx has inputs .*'kv_len'.* the manifest declares"):
        open_engine_dir(copy, "onnxruntime")                        # ... that the layer graphs contradict


def test_a_consistent_dtype_edit_is_caught_by_the_onnx_files(copy):
    from dllm.engines import open_engine_dir

    edit_manifest(copy, _set_all_dtypes)
    check(copy)                                                     # the manifest agrees with itself ...
    with pytest.raises(EngineDirError, match=r"embed: .*embed.onnx has outputs .*float.* the manifest declares"):
        open_engine_dir(copy, "onnxruntime")                        # ... but not with the graphs

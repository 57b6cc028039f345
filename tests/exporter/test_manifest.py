"""read_manifest: every malformed manifest is an EngineDirError that names the part, never a KeyError."""

from __future__ import annotations

import json
import os

import pytest

from dllm.errors import EngineDirError
from dllm.exporter.config import ExportConfig
from dllm.exporter.export import export_checkpoint
from dllm.exporter.manifest import MANIFEST, read_manifest
from dllm.exporter.models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def manifest_data(tmp_path_factory) -> dict:
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "dream", "dream")
    out = export_checkpoint(ExportConfig(ckpt, tmp_path_factory.mktemp("out") / "e", max_seq_len=32, validate=False,
                                         with_vproj=False))
    return json.loads((out / MANIFEST).read_text())


def write(tmp_path, data) -> object:
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    return tmp_path


def edited(data, edit):
    d = json.loads(json.dumps(data))
    edit(d)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.clear() or d.update(x=[1]), r"not a dllm engine manifest \(format None\)"),
    (lambda d: d.pop("subgraphs"), r"lacks the keys \['subgraphs'\]"),
    (lambda d: d.pop("model"), r"lacks the keys \['model'\]"),
    (lambda d: d.pop("profiles"), r"lacks the keys \['profiles'\]"),
    (lambda d: d.update(subgraphs=[]), r"'subgraphs' must be a non-empty list"),
    (lambda d: d.update(subgraphs={"a": 1}), r"'subgraphs' must be a non-empty list, got a JSON dict"),
    (lambda d: d.update(model=[1, 2]), r"'model' must be an object"),
    (lambda d: d["model"].update(n_layers="two"), r"'model' is not a valid model spec"),
    (lambda d: d["model"].update(n_heads=0), r"'model' is not a valid model spec"),
    (lambda d: d["model"].update(colour="red"), r"unknown ModelSpec keys \['colour'\]"),
    (lambda d: d.update(dtype="int8"), r"'dtype' must be one of \['fp32', 'fp16', 'bf16'\], got 'int8'"),
    (lambda d: d.update(max_seq_len="64"), r"'max_seq_len' must be a positive integer"),
    (lambda d: d["subgraphs"][0].pop("sha256"), r"subgraphs\[0\] \(embed\) lacks the keys \['sha256'\]"),
    (lambda d: d["subgraphs"][1].pop("onnx"), r"subgraphs\[1\] \(layer_00\) lacks the keys \['onnx'\]"),
    (lambda d: d["subgraphs"][1].update(sha256="abc"), r"'sha256' must be 64 lowercase hex digits"),
    (lambda d: d["subgraphs"].__setitem__(0, "embed"), r"subgraphs\[0\] must be an object"),
    (lambda d: d["subgraphs"][0].update(kind="conv"), r"subgraphs\[0\] \(embed\) has a malformed declaration"),
    (lambda d: d["subgraphs"][0]["inputs"][0].pop("dims"), r"has a malformed declaration \(KeyError"),
    (lambda d: d.update(profiles=[{"name": "x"}]), r"'profiles' must be a list of \{name, min, opt, max\}"),
    (lambda d: d.update(plans=[]), r"'plans' must be an object"),
    (lambda d: d["files"].update({"onnx/x": {"size": -1, "sha256": "0" * 64}}), r"files\['onnx/x'\] must be"),
    (lambda d: d.update(schema_version=3), r"schema version 3, this toolkit reads versions 1 and 2; it was written "
                                           r"by a newer dllm-export: upgrade dllm-deploy"),
    (lambda d: d.update(schema_version=0), r"schema version 0, this toolkit reads versions 1 and 2; re-export"),
    (lambda d: d.update(schema_version="2"), r"schema version '2', this toolkit reads versions 1 and 2; re-export"),
    (lambda d: d.update(schema_version=True), r"schema version True, this toolkit reads"),
    (lambda d: d.pop("schema_version"), r"schema version None, this toolkit reads"),
    (lambda d: d.pop("max_batch"), r"lacks the keys \['max_batch'\]"),
    (lambda d: d.update(max_batch=0), r"'max_batch' must be a positive integer, got 0"),
    (lambda d: d.update(max_batch=2.5), r"'max_batch' must be a positive integer, got 2.5"),
])
def test_malformed_manifests(manifest_data, tmp_path, edit, message):
    with pytest.raises(EngineDirError, match=message):
        read_manifest(write(tmp_path, edited(manifest_data, edit)))


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", r"malformed: expected a JSON object, got a JSON list"),
    (b'"text"', r"expected a JSON object, got a JSON str"),
    (b"{", r"is corrupt .*re-run dllm-export"),
    (b"\xff\xfe{}", r"is corrupt .*utf-8"),
])
def test_manifest_that_is_not_an_object(tmp_path, content, message):
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(EngineDirError, match=message):
        read_manifest(tmp_path)


def test_manifest_that_cannot_be_read(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / MANIFEST).mkdir()
    with pytest.raises(EngineDirError, match=r"cannot read .*manifest.json \(Is a directory\)"):
        read_manifest(tmp_path / "a")
    (tmp_path / "b").mkdir()
    os.symlink(MANIFEST, tmp_path / "b" / MANIFEST)
    with pytest.raises(EngineDirError, match=r"cannot read .*\(Too many levels of symbolic links\)"):
        read_manifest(tmp_path / "b")
    (tmp_path / "c").write_text("x")
    with pytest.raises(EngineDirError, match=r"is a file, not an engine directory"):
        read_manifest(tmp_path / "c")


def test_round_trip_keeps_files(manifest_data, tmp_path):
    m = read_manifest(write(tmp_path, manifest_data))
    assert m.files and m.to_dict()["files"] == manifest_data["files"]
    assert set(m.files) >= {s.onnx for s in m.subgraphs}


def as_schema_1(data: dict) -> dict:
    """The manifest as the first release wrote it: layers without kv_len, no max_batch, batch 1 profiles."""
    d = edited(data, lambda d: d.update(schema_version=1))
    del d["max_batch"]
    for s in d["subgraphs"]:
        s["inputs"] = [t for t in s["inputs"] if t["name"] != "kv_len"]
    for p in d["profiles"]:
        p["max"]["B"] = 1
    return d


def test_schema_2_records_max_batch_and_padded_layers(manifest_data, tmp_path):
    assert manifest_data["schema_version"] == 2 and manifest_data["max_batch"] == 8      # the default
    assert "max_batch" not in manifest_data["build"]                                    # recorded once, at the top
    m = read_manifest(write(tmp_path, manifest_data))
    assert m.padded and m.max_batch == 8
    layer = m.subgraph("layer_00").decl
    assert [t.name for t in layer.inputs] == ["h_rows", "pos", "kv_len", "k_cache", "v_cache"]
    assert layer.inputs[2].to_dict() == {"name": "kv_len", "dtype": "int32", "dims": ["B"]}
    assert m.to_dict()["max_batch"] == 8


def test_schema_1_is_read_as_one_unpadded_sequence(manifest_data, tmp_path):
    data = as_schema_1(manifest_data)
    m = read_manifest(write(tmp_path, data))
    assert m.schema_version == 1 and not m.padded and m.max_batch == 1
    assert not m.subgraph("layer_00").decl.takes_kv_len
    again = m.to_dict()                     # rewritten (e.g. by build_plans) it stays a schema-1 manifest
    assert again["schema_version"] == 1 and "max_batch" not in again
    assert again["subgraphs"] == data["subgraphs"]

"""Bad checkpoints through dllm-export: one line naming the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.exporter.cli import main
from dllm.exporter.models import write_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"llada": write_tiny_checkpoint(root / "llada", "llada"),
            "dream": write_tiny_checkpoint(root / "dream", "dream")}


def config(**changes):
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        c.update(changes)
        (d / "config.json").write_text(json.dumps(c))
    return edit


def write(name, content: bytes):
    return lambda d: (d / name).write_bytes(content)


def symlink_loop(d):
    (d / "config.json").unlink()
    os.symlink("config.json", d / "config.json")


def as_dtype(dtype, name="model.transformer.blocks.0.q_proj.weight"):
    def edit(d):
        tensors = load_file(str(d / "model.safetensors"))
        tensors[name] = tensors[name].to(dtype)
        save_file(tensors, str(d / "model.safetensors"))
    return edit


def extra_layer(d):
    c = json.loads((d / "config.json").read_text())
    c["n_layers"] = 1                                                # the weights hold two
    (d / "config.json").write_text(json.dumps(c))


CASES = [
    ("llada", config(n_heads=0), r"'n_heads' must be a positive integer, got 0; fix config.json"),
    ("llada", config(n_heads="4"), r"'n_heads' must be a positive integer, got '4'"),
    ("llada", config(d_model=[64]), r"'d_model' must be a positive integer, got \[64\]"),
    ("llada", config(d_model=66), r"d_model 66 is not a multiple of n_heads 4"),
    ("llada", config(n_layers=True), r"'n_layers' must be a positive integer, got True"),
    ("llada", config(rms_norm_eps="small"), r"'rms_norm_eps' must be a positive number"),
    ("llada", config(rope_theta=float("nan")), r"'rope_theta' must be a positive number, got nan"),
    ("llada", config(include_qkv_bias="false"), r"'include_qkv_bias' must be true or false, got 'false'"),
    ("llada", config(eos_token_id="eos"), r"'eos_token_id' must be an integer or a list of integers"),
    ("llada", config(mask_token_id=10_000), r"mask id 10000 is outside the vocabulary"),
    ("llada", config(model_type="gpt2"), r"model_type 'gpt2' is not supported"),
    ("dream", config(num_attention_heads=0), r"'num_attention_heads' must be a positive integer, got 0"),
    ("dream", config(vocab_size=None), r"lacks the key 'vocab_size'"),
    ("llada", write("config.json", b"[1, 2]"), r"config.json holds an array, not a JSON object"),
    ("llada", write("config.json", b'"llada"'), r"config.json holds a string, not a JSON object"),
    ("llada", write("config.json", bytes(range(256))), r"config.json is not text \(not UTF-8\)"),
    ("llada", write("config.json", b"{"), r"config.json is not valid JSON"),
    ("llada", symlink_loop, r"cannot read .*config.json \(Too many levels of symbolic links\)"),
    ("llada", extra_layer, r"config.json says 1 layers, but the safetensors files hold layers up to 1"),
    ("llada", as_dtype(torch.int8), r"is stored as I8; weights must be floating point .*export from the original"),
    ("llada", as_dtype(torch.int32), r"is stored as I32; weights must be floating point"),
    ("llada", write("tokenizer.json", b"{not json"),
     r"tokenizer file .*tokenizer.json is damaged \(JSONDecodeError.*re-download it"),
    ("dream", write("model.safetensors", b"\x07\x00\x00\x00\x00\x00\x00\x00[1,2,3]"),
     r"malformed safetensors header"),
]


@pytest.mark.parametrize("arch, edit, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_checkpoint_is_one_line(ckpts, tmp_path, capsys, arch, edit, message):
    import re

    broken = tmp_path / "ckpt"
    shutil.copytree(ckpts[arch], broken, symlinks=True)
    edit(broken)
    out = tmp_path / "out"
    assert main([str(broken), "-o", str(out), "--no-validate", "--max-seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dllm-export: error:") and re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()


def test_tokenizer_json_that_is_json_but_not_a_tokenizer(ckpts, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpts["llada"], broken)
    (broken / "tokenizer.json").write_text('{"model": 5}')
    assert main([str(broken), "-o", str(tmp_path / "out"), "--no-validate"]) == 2
    assert "tokenizer.json is damaged" in capsys.readouterr().err

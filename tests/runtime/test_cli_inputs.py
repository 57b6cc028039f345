"""dllm-run with hostile input: each ends in one line naming the problem and the fix, exit code 2."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from dllm.runtime.cli import main

SMALL = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]


def damaged(engine_dir, tmp_path, edit):
    out = tmp_path / "engines"
    shutil.copytree(engine_dir, out)
    edit(out)
    return out


def manifest(change):
    def edit(out):
        data = json.loads((out / "manifest.json").read_text())
        change(data)
        (out / "manifest.json").write_text(json.dumps(data))
    return edit


def flip_byte(out):
    with open(out / "onnx" / "layer_01.onnx.data", "r+b") as f:
        f.seek(203)
        b = f.read(1)[0]
        f.seek(203)
        f.write(bytes([b ^ 0x10]))


CASES = [
    # flags and prompts
    (None, ["--prompt-ids", "6,7", "--commit", "apd", "--tau0", "2.0"], r"--tau0 \(tau0\) must be in \[0, 1\]"),
    (None, ["--prompt-ids", "6,7", "--commit", "apd", "--tau0", "-1"], r"--tau0 \(tau0\) must be in \[0, 1\]"),
    (None, ["--prompt-ids", "6,7", "--tau-max", "1.5"], r"--tau-max \(tau_max\) must be in \[0, 1\]"),
    (None, ["--prompt-ids", "6,7", "--chat"], r"--chat wraps --prompt text .* cannot apply to --prompt-ids"),
    (None, ["--prompt-ids", "6,7", "--device", "bogus"], r"--device 'bogus' is not a device; use cpu, cuda"),
    (None, ["--prompt-ids", "6,7", "--device", "cuda:abc"], r"--device 'cuda:abc' is not a device"),
    (None, ["--prompt-ids", "6,7", "--device", "cuda:99"], r"--device 'cuda:99'"),
    (None, ["--prompt-ids", "6,7", "--device", "cuda:99", "--backend", "torch"], r"--device 'cuda:99'"),
    (None, ["--prompt-ids", "99999999999999999999999"], r"prompt id 9+ \(position 0\) is outside the vocabulary"),
    (None, ["--prompt-ids", "6,-3"], r"prompt id -3 \(position 1\) is outside the vocabulary"),
    (None, ["--prompt-ids", ""], r"the prompt is empty"),
    (None, ["--prompt-ids", "6,7", "--temperature", "nan"], r"--temperature \(temperature\) must be a finite"),
    (None, ["--prompt", "abc\udcff"], r"the prompt is not valid UTF-8 \(bytes b'\\xff' at character 3\)"),
    (None, ["--prompt", ""], r"the prompt is empty"),
    # damaged engine directories
    (manifest(lambda d: d.clear() or d.update(format="dllm-engine-dir", schema_version=1)),
     ["--prompt-ids", "6"], r"manifest.json is malformed: it lacks the keys \['model', 'dtype', 'max_seq_len'"),
    (lambda out: (out / "manifest.json").write_text("[]"), ["--prompt-ids", "6"],
     r"malformed: expected a JSON object, got a JSON list"),
    (manifest(lambda d: d["subgraphs"][2].pop("sha256")), ["--prompt-ids", "6"], r"lacks the keys \['sha256'\]"),
    (manifest(lambda d: d["model"].update(n_layers=4)), ["--prompt-ids", "6"], r"model.n_layers is 4 but"),
    (manifest(lambda d: d.update(dtype="bf16")), ["--prompt-ids", "6"], r"declares output 'h' as fp32"),
    (flip_byte, ["--prompt-ids", "6"], r"layer_01.onnx.data'\] differ from the sha256 recorded"),
    (lambda out: (out / "tokenizer" / "tokenizer.json").write_text("{"), ["--prompt", "hi"],
     r"tokenizer/tokenizer.json is 1 bytes, the manifest recorded"),
    (lambda out: (out / "onnx" / "head.onnx").unlink(), ["--prompt-ids", "6"], r"lacks files \['onnx/head.onnx'\]"),
    (manifest(lambda d: d["source"].update(checkpoint="/nonexistent/ckpt")), ["--prompt-ids", "6", "--backend",
                                                                              "torch"], r"which is gone"),
]


@pytest.mark.parametrize("edit, argv, message", CASES, ids=[c[2][:50] for c in CASES])
def test_hostile_input_is_one_line(engine_dirs, tmp_path, capsys, edit, argv, message):
    path = engine_dirs["llada"] if edit is None else damaged(engine_dirs["llada"], tmp_path, edit)
    assert main([str(path), *argv, *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dllm-run: error: ") and re.search(message, err), err


def test_verify_and_unknown_characters(engine_dirs, capsys):
    assert main([str(engine_dirs["llada"]), "--prompt", "ça va?", "--verify", *SMALL]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("dllm-run: warning: the prompt has 1 character(s) the tokenizer does not know, replaced by "
                      "['<|endoftext|>']: ['ç']; the model sees the replacement token instead, so rephrase without "
                      "them for a faithful answer")

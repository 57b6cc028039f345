"""Prompts at the edge (dllm.runtime.prompts through Pipeline.encode): one prompt, valid ids and text."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from dllm.errors import ConfigError, DllmWarning, EngineDirError
from dllm.runtime import DecodeConfig, Pipeline
from dllm.runtime.prompts import check_ids, check_text

SMALL = DecodeConfig(gen_length=8, block_length=8, steps=8)


@pytest.fixture(scope="module")
def pipe(engine_dirs):
    return Pipeline.from_dir(engine_dirs["llada"], "onnxruntime", intra_op_threads=1)


@pytest.mark.parametrize("prompt, message", [
    (torch.tensor([[5, 6], [7, 8]]), r"shape \[2, 2\], a batch in one tensor; pass one \[P\] or \[1, P\] tensor per prompt"),
    (torch.zeros(1, 1, 3, dtype=torch.long), r"shape \[1, 1, 3\], a batch"),
    (torch.tensor([5.0, 6.0]), r"prompt ids must be integers, got a torch.float32 tensor"),
    (torch.tensor([True]), r"must be integers, got a torch.bool tensor"),
    ([5, [6, 7]], r"the prompt mixes token ids and lists"),
    ([5, 10**30], r"prompt id 10{30} \(position 1\) is outside the vocabulary \[0, 102\)"),
    ([5, -1], r"prompt id -1 \(position 1\) is outside the vocabulary"),
    ([5, True], r"prompt id 1 is True \(bool\); token ids are integers"),
    ([5, "6"], r"prompt id 1 is '6' \(str\)"),
    (torch.tensor([5, 400]), r"prompt id 400 \(position 1\) is outside"),
    ([], r"the prompt is empty"),
    ("bad \udcff bytes", r"the prompt is not valid UTF-8 \(bytes b'\\xff' at character 4\)"),
    ([{"role": "user", "content": 5}], r"chat message 0: 'content' must be a string, got int"),
    ([{"role": "user"}], r"chat message 0 needs 'role' and 'content' keys, got \['role'\]"),
    ([{"role": "user", "content": "\udcfe"}], r"chat message 0's content is not valid UTF-8"),
    ([{"role": "user", "content": "hi"}, 5], r"a prompt is text, a list of token ids"),
    (3.5, r"a prompt is text, a list of token ids, a tensor of ids or a list of chat messages"),
])
def test_bad_prompts_are_config_errors(pipe, prompt, message):
    with pytest.raises(ConfigError, match=message):
        pipe.generate(prompt, SMALL)


def test_good_prompts_agree(pipe):
    ids = pipe.encode("What is 1+2?")
    assert pipe.encode(torch.tensor(ids)) == pipe.encode(torch.tensor([ids])) == pipe.encode(ids) == ids
    assert check_ids(torch.tensor(ids, dtype=torch.int32), 102) == ids
    assert check_text("héllo") == "héllo"


def test_unknown_characters_warn_and_name_them(pipe):
    with pytest.warns(DllmWarning, match=r"the prompt has 3 character\(s\) the tokenizer does not know, replaced by "
                                         r"\['<\|endoftext\|>'\]: \['é', '€'\]"):
        ids = pipe.encode("café €€")
    assert len(ids) == len("café €€")
    with pytest.warns(DllmWarning, match=r"chat message 1 has 1 character"):
        pipe.encode([{"role": "user", "content": "hi"}, {"role": "user", "content": "naïve"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # known characters: no warning
        pipe.encode("What is 12+7?\n")
        pipe.encode("<|endoftext|>")                                     # a special token typed out: no replacement


def test_chat_without_template_and_broken_tokenizer(engine_dirs, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(engine_dirs["dream"], out)
    cfg = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (out / "tokenizer" / extra).unlink(missing_ok=True)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("files")                                                # as if exported by the first release
    (out / "manifest.json").write_text(json.dumps(manifest))
    p = Pipeline.from_dir(out, "onnxruntime", intra_op_threads=1)
    with pytest.raises(ConfigError, match=r"the tokenizer in .* has no chat template.*drop --chat"):
        p.generate([{"role": "user", "content": "hi"}], SMALL)
    assert p.generate("hi", SMALL).ids                                   # plain text still works
    (out / "tokenizer" / "tokenizer.json").write_text("{")
    with pytest.raises(EngineDirError, match=r"the tokenizer in .* does not load \(.*\); re-run dllm-export to copy"):
        Pipeline.from_dir(out, "onnxruntime", intra_op_threads=1).generate("hi", SMALL)


def test_bad_pipeline_construction(engine_dirs, tiny_checkpoints, tmp_path):
    from dllm.errors import BackendError

    with pytest.raises(ConfigError, match=r"device 'bogus' is not a device; use cpu, cuda or cuda:N"):
        Pipeline.from_dir(engine_dirs["llada"], "onnxruntime", "bogus")
    with pytest.raises(ConfigError, match=r"device 'cuda:abc' is not a device"):
        Pipeline.from_checkpoint(tiny_checkpoints["llada"], device="cuda:abc")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match=r"asked for a CUDA device, but this torch build"):
            Pipeline.from_dir(engine_dirs["llada"], "torch", "cuda")
    with pytest.raises(ConfigError, match=r"backend 'tflite' is not one of"):
        Pipeline.from_dir(engine_dirs["llada"], "tflite")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EngineDirError, match=r"is a file, not an engine directory"):
        Pipeline.from_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"config must be a DecodeConfig, got dict"):
        Pipeline.from_dir(engine_dirs["llada"], intra_op_threads=1, verify_hashes=True).generate([5], {"steps": 2})

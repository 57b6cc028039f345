"""The shipped tiny-llada checkpoint loads and answers fresh test problems with the reference decoder."""

from __future__ import annotations

import torch

from dllm.exporter.models.checkpoint import Checkpoint
from dllm.runtime.reference import LladaConfig, llada_generate
from dllm.tools.assets import shipped_model_dir
from dllm.tools.tasks import generate, is_correct


def test_shipped_model_loads():
    path = shipped_model_dir()
    assert (path / "tokenizer.json").is_file() and (path / "model.safetensors").stat().st_size < 8_000_000
    spec = Checkpoint(path).spec
    assert spec.arch.value == "llada" and spec.mask_id == 2


def test_shipped_model_accuracy_with_reference_decoder():
    torch.set_num_threads(1)
    ckpt = Checkpoint(shipped_model_dir())
    model, tok = ckpt.load_model().eval(), ckpt.tokenizer()
    cfg = LladaConfig(gen_length=32, block_length=32, steps=32)
    problems = generate("arithmetic", 10, seed=99) + generate("sorting", 10, seed=99)
    correct = 0
    with torch.no_grad():
        for p in problems:
            ids = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            gen = llada_generate(model, torch.tensor([ids]), cfg).gen_ids[0].tolist()
            cut = next((i for i, t in enumerate(gen) if t in model.spec.eos_ids), len(gen))
            correct += is_correct(p.task, tok.decode(gen[:cut], skip_special_tokens=True), p.answer)
    assert correct >= 16, f"{correct}/20 correct"

"""dllm.generation: a checkpoint's generation defaults, as dllm-export records them and the runtime uses them."""

import json

import pytest

from dllm.errors import ConfigError
from dllm.generation import GenerationDefaults, generation_defaults_from_checkpoint, has_chat_template
from dllm.runtime.config import DecodeConfig
from dllm.tools.assets import shipped_model_dir


def test_shipped_model_from_its_training_config():
    g = generation_defaults_from_checkpoint(shipped_model_dir())
    assert (g.gen_length, g.block_length, g.steps, g.max_gen_length, g.chat) == (64, 64, 64, 64, True)
    assert g.source == "train_config.json"
    cfg = DecodeConfig(**g.decode_values())
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (64, 64, 64)


def test_generation_config_json_wins(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 128, "steps": 128,
                                                                  "eos_token_id": 7}))
    (tmp_path / "train_config.json").write_text(json.dumps({"max_canvas": 64}))
    g = generation_defaults_from_checkpoint(tmp_path)
    assert (g.gen_length, g.steps, g.block_length, g.chat) == (128, 128, None, False)
    assert g.decode_values() == {"gen_length": 128, "steps": 128} and g.source == "generation_config.json"


def test_nothing_found_means_runtime_defaults(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    g = generation_defaults_from_checkpoint(tmp_path)
    assert g.decode_values() == {} and g.chat and has_chat_template(tmp_path)
    assert GenerationDefaults.from_dict({}) == GenerationDefaults()          # older engine directories
    assert GenerationDefaults.from_dict({"gen_length": 32, "future_key": 1}).gen_length == 32


def test_values_that_do_not_fit_the_runtime_are_left_out():
    assert GenerationDefaults(gen_length=20).decode_values() == {"gen_length": 20, "block_length": 20}
    assert GenerationDefaults(gen_length=64, block_length=32, steps=63).decode_values() == {
        "gen_length": 64, "block_length": 32}


def test_length_warning_and_validation():
    g = GenerationDefaults(gen_length=64, max_gen_length=64, source="train_config.json")
    assert g.length_warning(64) is None
    assert "--gen-length 128 is beyond the 64 positions" in g.length_warning(128)
    with pytest.raises(ConfigError, match="gen_length must be a positive integer"):
        GenerationDefaults(gen_length=0)

"""dllm-run: flags -> DecodeConfig -> Pipeline; --json output; clean errors with exit code 2."""

import json

import pytest

from dllm.runtime import DecodeConfig
from dllm.runtime.cli import build_parser, config_from_args, main

SMALL = ["--gen-length", "16", "--block-length", "8", "--steps", "16"]


def test_flags_map_onto_the_config():
    args = build_parser().parse_args(["d", "--prompt-ids", "1,2", "--cache", "dcu-reference", "--commit", "apd",
                                      "--apd-mode", "per_token", "--budget", "7", "--window", "5", "--tau0", "0.8",
                                      "--prompt-interval", "3", "--apd-block-reset"])
    cfg = config_from_args(args)
    assert cfg == DecodeConfig(cache="dcu-reference", commit="apd", apd_mode="per-token", budget=7, window=5,
                               tau0=0.8, prompt_interval=3, apd_block_reset=True)
    assert cfg.apd_mode.value == "per-token" and cfg.to_dict()["cache"] == "dcu-reference"   # one spelling shown


def test_model_defaults_fill_what_the_flags_leave_out():
    defaults = {"gen_length": 64, "block_length": 64, "steps": 64}
    cfg = config_from_args(build_parser().parse_args(["d", "--prompt", "x"]), defaults)
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (64, 64, 64)
    cfg = config_from_args(build_parser().parse_args(["d", "--prompt", "x", "--gen-length", "32"]), defaults)
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (32, 32, 32)          # one block follows the length
    cfg = config_from_args(build_parser().parse_args(["d", "--prompt", "x", "--block-length", "16"]), defaults)
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (64, 16, 64)


def test_choices_show_one_spelling_and_reject_others(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["d", "--prompt-ids", "1", "--cache", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--cache" in err and "'dllm-cache'" in err and "dllm_cache" not in err
    help_text = build_parser().format_help()
    assert "per-token" in help_text and "per_token" not in help_text and "low-confidence" in help_text
    assert "Kind." not in help_text and "Proxy." not in help_text        # defaults as users type them


def test_sampling_guidance_and_port_flags():
    args = build_parser().parse_args(["d", "--prompt-ids", "1", "--cache", "dual", "--commit", "threshold",
                                      "--fastdllm-dream", "--top-p", "0.9", "--top-k", "50", "--alg", "entropy",
                                      "--alg-temp", "0.2", "--cfg-scale", "1.5", "--temperature", "0.7"])
    assert config_from_args(args) == DecodeConfig(cache="dual", commit="threshold", fastdllm_dream=True, top_p=0.9,
                                                  top_k=50, alg="entropy", alg_temp=0.2, cfg_scale=1.5,
                                                  temperature=0.7)


def test_json_output(engine_dirs, capsys):
    rc = main([str(engine_dirs["llada"]), "--prompt-ids", "6,7,8", "--json", *SMALL, "--cache", "dcu",
               "--commit", "apd"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) == 16 and out["steps"] == out["nfe"] >= 2
    assert len(out["rows_per_layer"]) == 2 and out["tokens_per_second"] > 0
    assert isinstance(out["text"], str)


def test_text_prompt_and_stream(engine_dirs, capsys):
    assert main([str(engine_dirs["dream"]), "--prompt", "Hello", *SMALL, "--stream"]) == 0
    captured = capsys.readouterr()
    assert "steps" in captured.err and "NFE" in captured.err


def test_checkpoint_with_torch_backend(tiny_checkpoints, capsys):
    assert main([str(tiny_checkpoints["llada"]), "--backend", "torch", "--prompt-ids", "6,7", *SMALL,
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"]) == 16


@pytest.mark.parametrize("argv, needle", [
    (["--prompt-ids", "6,7", "--gen-length", "30"], "--block-length"),
    (["--prompt-ids", "6,7", "--budget", "-1"], "--budget"),
    (["--prompt-ids", ",".join(["6"] * 120), *SMALL], "max_seq_len"),
    (["--prompt-ids", "6,x"], "--prompt-ids"),
    (["--prompt-ids", "6,7", "--warmup", "-1"], "--warmup"),
])
def test_errors_are_one_clean_line(engine_dirs, capsys, argv, needle):
    assert main([str(engine_dirs["llada"]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dllm-run: error:") and needle in err and "\n" not in err


def test_checkpoint_needs_export_or_torch(tiny_checkpoints, capsys):
    assert main([str(tiny_checkpoints["llada"]), "--prompt-ids", "6,7", *SMALL]) == 2
    assert "dllm-export" in capsys.readouterr().err


def test_tensorrt_without_plans_is_a_clean_error(engine_dirs, capsys):
    rc = main([str(engine_dirs["llada"]), "--backend", "tensorrt", "--prompt-ids", "6,7", *SMALL])
    assert rc == 2
    assert "dllm-run: error:" in capsys.readouterr().err

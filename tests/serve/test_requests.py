"""Request fields -> DecodeConfig, the answer's ids (EOS, max_tokens), and committed-prefix deltas."""

from __future__ import annotations

import pytest

from dllm.runtime import DecodeConfig, method_config

pytest.importorskip("fastapi")

from dllm.serve.config import ServeConfig  # noqa: E402
from dllm.serve.jobs import FinishReason, GenerationRequest, IncrementalText  # noqa: E402
from dllm.serve.requests import ModelInfo, RequestError, decode_config  # noqa: E402


def model(method="dcu+apd", block=32, max_tokens=64) -> ModelInfo:
    default = ServeConfig("eng", method=method, block_length=block, max_tokens=max_tokens).default_decode_config()
    return ModelInfo("m", 512, 102, 2, default, max_tokens)


def test_max_tokens_rounds_up_to_whole_blocks_and_steps_follow():
    cfg, canvas = decode_config(model(), 33, None, None, None)
    assert (cfg.gen_length, cfg.block_length, cfg.steps, canvas) == (64, 32, 64, False)
    assert cfg == method_config("dcu+apd", DecodeConfig(gen_length=64, block_length=32, steps=64))
    cfg, _ = decode_config(model(), 5, 0.7, 11, {"block_length": 8, "method": "full", "steps": 16})
    assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.temperature, cfg.seed) == (8, 8, 16, 0.7, 11)
    assert cfg.cache.value == "full" and cfg.commit.value == "schedule"


def test_method_then_knobs_and_canvas():
    cfg, canvas = decode_config(model("full"), 32, None, None, {"method": "dcu-reference", "budget": 8,
                                                                 "canvas": True})
    assert canvas and cfg.cache.value == "dcu-reference" and cfg.proxy.value == "value" and cfg.budget == 8


@pytest.mark.parametrize("dllm,param", [
    ({"method": 3}, "dllm.method"), ({"canvas": "yes"}, "dllm.canvas"), ({"seed": 1}, "dllm.seed"),
    ({"temperature": 1.0}, "dllm.temperature"), ({"block_length": 2.5}, "dllm.block_length"),
    ({"window": -1}, "dllm"), ({"proxy": "cosine"}, "dllm"), ({"nope": 1}, "dllm"),
])
def test_bad_knobs_name_the_field(dllm, param):
    with pytest.raises(RequestError) as e:
        decode_config(model(), 32, None, None, dllm)
    assert e.value.status == 400 and e.value.param == param


def test_deltas_never_split_a_character_and_add_up_to_the_answer(byte_tokenizer):
    tok = byte_tokenizer
    eos, mask = tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<mask>")
    ids = tok("déjà vu ✓", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("déjà vu ✓")                      # multi-byte characters span several tokens
    answer = ids + [eos, eos]
    req = GenerationRequest((0,), DecodeConfig(gen_length=32, block_length=32), 32, stream=True, canvas=True)
    text = IncrementalText(tok, mask, [eos], req)
    canvas, sent = [mask] * len(answer), []
    for step, pos in enumerate([3, 0, 1, 2] + list(range(4, len(answer))), start=1):   # out of order
        canvas[pos] = answer[pos]
        progress = text.step(step, list(canvas))
        assert progress.canvas.pieces[pos] is not None and progress.canvas.ids == canvas
        assert "\ufffd" not in progress.text
        sent.append(progress.text)
        if step == 1:
            assert progress.text == ""                          # position 0 is still masked
    done = text.finish(answer, 1, len(answer), 0.1, 0.0)
    assert "".join(sent) + done.text == done.full_text == "déjà vu ✓"
    assert done.finish_reason == FinishReason.STOP and done.completion_tokens == len(ids)


def test_stop_takes_a_string_or_up_to_four_non_empty_ones():
    from dllm.serve.protocol import CompletionRequest
    from dllm.serve.requests import completion_request

    def stops(stop):
        body = CompletionRequest(model="m", prompt=[6, 7], max_tokens=8, stop=stop)
        return completion_request(body, model(), encode=None).stop

    assert stops("\n") == ("\n",) and stops(["a", "bc"]) == ("a", "bc") and stops([]) == () and stops(None) == ()
    for bad, word in ((["a"] * 5, "at most 4"), (["a", ""], "empty"), ("", "empty")):
        with pytest.raises(RequestError, match=word) as e:
            stops(bad)
        assert e.value.param == "stop"

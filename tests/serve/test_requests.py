"""Request fields -> DecodeConfig, the answer's ids (EOS, max_tokens), and committed-prefix deltas."""

from __future__ import annotations

import pytest

from dllm.runtime import DecodeConfig, method_config

pytest.importorskip("fastapi")

from dllm.serve.config import ServeConfig  # noqa: E402
from dllm.serve.jobs import FinishReason, GenerationRequest, IncrementalText, content_ids  # noqa: E402
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


def test_content_ids_cut_at_eos_and_max_tokens():
    eos = (1, 5)
    assert content_ids([7, 8, 5, 9], eos, 10) == ([7, 8], FinishReason.STOP)
    assert content_ids([7, 8, 5, 9], eos, 2) == ([7, 8], FinishReason.STOP)        # EOS right at the limit
    assert content_ids([7, 8, 9, 5], eos, 2) == ([7, 8], FinishReason.LENGTH)
    assert content_ids([7, 8, 9], eos, 10) == ([7, 8, 9], FinishReason.LENGTH)     # the canvas ran out


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real byte-level BPE tokenizer, where one character can span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["plain ascii words only"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", mask_token="<mask>")


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


def test_a_stop_string_cuts_the_answer_the_same_mid_generation_and_at_the_end(byte_tokenizer):
    """A stop string split over several tokens: the streamed text never shows its start, the committed prefix
    that first holds it ends the answer, and the final canvas gives the same answer and token count."""
    tok = byte_tokenizer
    eos, mask = tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<mask>")
    ids = tok("plain ✓ words", add_special_tokens=False)["input_ids"]
    answer = ids + [eos, eos]
    cut = next(k for k in range(len(ids) + 1) if "✓" in tok.decode(ids[:k]))      # the token that completes it
    req = GenerationRequest((0,), DecodeConfig(gen_length=32, block_length=32), 32, stream=True, stop=("✓ w", "z"))
    text = IncrementalText(tok, mask, [eos], req)
    canvas, sent = [mask] * len(answer), []
    for step, pos in enumerate(range(len(answer)), start=1):                      # left to right
        canvas[pos] = answer[pos]
        progress = text.step(step, list(canvas))
        sent.append(progress.text if progress else "")
        assert "✓" not in "".join(sent) and "\ufffd" not in "".join(sent)
        if text.stopped is not None:
            break
    assert "".join(sent) == "plain "                                              # " ✓ w" held back, then cut
    early = text.finish(None, 1, step, 0.1, 0.0)
    late = IncrementalText(tok, mask, [eos], req).finish(answer, 1, len(answer), 0.1, 0.0)
    stop_tokens = next(k for k in range(len(ids) + 1) if "✓ w" in tok.decode(ids[:k]))
    assert step == stop_tokens > cut
    for done in (early, late):
        assert done.full_text == "plain " and done.finish_reason == FinishReason.STOP
        assert done.completion_tokens == stop_tokens
    assert early.text == ""                                                       # all of it was streamed


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

"""Pipeline: ids, text and chat prompts; text cut at EOS; streaming; engine directories."""

import pytest
import torch

from dllm.errors import ConfigError
from dllm.runtime import DecodeConfig, Pipeline, method_config
from dllm.runtime import reference as R

CFG = DecodeConfig(gen_length=32, block_length=8, steps=32)


@pytest.fixture(scope="module")
def pipes(tiny_checkpoints):
    return {arch: Pipeline.from_checkpoint(path) for arch, path in tiny_checkpoints.items()}


def test_generate_from_ids_matches_the_reference(pipes, tiny_models):
    res = pipes["llada"].generate([6, 7, 8, 9], CFG)
    ref = R.llada_generate(tiny_models["llada"], torch.tensor([[6, 7, 8, 9]]),
                           R.LladaConfig(gen_length=32, block_length=8, steps=32))
    assert res.ids == ref.gen_ids[0].tolist()
    assert res.prompt_ids == [6, 7, 8, 9]
    assert res.steps == res.nfe == 32 and sum(res.tokens_per_step) == 32
    assert len(res.rows_per_layer) == 2 and res.rows_per_layer == [36.0, 36.0]
    assert res.wall_s > 0 and res.tokens_per_second > 0
    assert isinstance(res.text, str)


def test_text_is_cut_at_the_first_eos(pipes):
    pipe = pipes["llada"]
    eos = pipe.spec.eos_ids[0]
    ids = pipe.encode("ab") + [eos] + pipe.encode("cd")
    assert pipe.decode_text(ids) == "ab"


def test_text_and_chat_prompts_go_through_the_tokenizer(pipes):
    pipe = pipes["dream"]
    assert pipe.encode("hi") == pipe.tokenizer("hi")["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    ids = pipe.encode(msgs)
    text = pipe.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhi") and text.endswith("<|im_start|>assistant\n")
    res = pipe.generate(msgs, CFG)
    assert res.prompt_ids == ids
    with pytest.raises(ConfigError, match="role"):
        pipe.encode([{"text": "hi"}])
    with pytest.raises(ConfigError, match="prompt"):
        pipe.encode(3.5)


@pytest.mark.parametrize("method", ["full", "dcu+apd"])
def test_stream_yields_the_final_text(pipes, method):
    pipe = pipes["llada"]
    cfg = method_config(method, CFG)
    parts = list(pipe.stream("Hello", cfg))
    assert "".join(parts) == pipe.last_result.text
    assert pipe.generate("Hello", cfg).ids == pipe.last_result.ids


def test_ids_only_without_a_tokenizer(torch_engines):
    pipe = Pipeline(torch_engines["llada"])
    res = pipe.generate(torch.tensor([6, 7, 8]), CFG)
    assert res.text is None and len(res.ids) == 32
    with pytest.raises(ConfigError, match="tokenizer"):
        pipe.generate("text needs a tokenizer", CFG)


def test_prompt_longer_than_the_canvas(pipes):
    with pytest.raises(ConfigError, match="max_seq_len"):
        pipes["llada"].generate(list(range(6, 100)) * 2, CFG)


@pytest.mark.parametrize("sizes, fix", [        # sizes(L) -> (prompt length, gen length, block length), L the canvas
    (lambda L: (L - 27, 32, 8), "lower --gen-length to at most 24 or shorten the prompt to at most {L-32} tokens$"),
    (lambda L: (L - 2, 32, 8), "lower --gen-length and --block-length to at most 2 or shorten the prompt to at most {L-32}"),
    (lambda L: (4, L, L), "lower --gen-length and --block-length to at most {L-4}$"),    # the gen length fills the canvas
    (lambda L: (L, L, L), r"shorten the prompt and lower --gen-length \(together at most {L} tokens"),  # neither alone fits
])
def test_a_canvas_overflow_offers_only_fixes_that_work(pipes, sizes, fix):
    """Each fix the error offers fits the canvas as given: whole blocks of gen length, a prompt of one token or more."""
    pipe = pipes["llada"]
    L = pipe.max_seq_len
    P, gen, block = sizes(L)
    fix = fix.replace("{L-32}", str(L - 32)).replace("{L-4}", str(L - 4)).replace("{L}", str(L))
    with pytest.raises(ConfigError, match=fix):
        pipe.generate([6] * P, DecodeConfig(gen_length=gen, block_length=block, steps=gen))


def test_from_dir_onnxruntime_matches_torch(engine_dirs, pipes):
    pipe = Pipeline.from_dir(engine_dirs["dream"], backend="onnxruntime", device="cpu")
    a = pipe.generate("Hi", CFG)
    b = pipes["dream"].generate("Hi", CFG)
    assert a.ids == b.ids and a.text == b.text
    assert pipe.max_seq_len <= 128


def test_honest_speed_numbers(pipes):
    pipe = pipes["llada"]
    res = pipe.generate([6, 7, 8, 9], CFG)
    eos = set(pipe.spec.eos_ids)
    answer = next((i for i, t in enumerate(res.ids) if t in eos), len(res.ids))
    assert res.answer_tokens == res.decode.answer_length == answer
    assert res.latency_s == res.wall_s > 0
    assert res.tokens_per_second == pytest.approx(answer / res.wall_s)              # EOS padding not counted
    assert res.canvas_tokens_per_second == pytest.approx(32 / res.wall_s)          # every position counted
    step = res.decode.commit_step[0]                                               # the answer's first token
    assert res.first_token_s == res.decode.step_end_s[step] <= res.wall_s
    assert res.decode.step_end_s == sorted(res.decode.step_end_s) and len(res.decode.step_end_s) == res.steps
    assert {"latency_s", "first_token_s", "answer_tokens", "canvas_tokens_per_second"} <= set(res.to_dict())


def test_generation_defaults_chat_and_length_warning(tiny_models, tiny_checkpoints):
    from dllm.engines.engine_set import torch_engine_set
    from dllm.generation import GenerationDefaults
    from dllm.runtime.pipeline import GenerationWarning

    engines = torch_engine_set(tiny_models["llada"], "fp32", tokenizer_dir=tiny_checkpoints["llada"])
    pipe = Pipeline(engines, generation=GenerationDefaults(gen_length=16, block_length=8, chat=True,
                                                            max_gen_length=16, source="test"))
    cfg = pipe.default_config()
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (16, 8, 16)               # steps follow the length
    assert pipe.default_config(cache="dcu", commit="apd").cache.value == "dcu"
    chat_ids = pipe.encode([{"role": "user", "content": "hi"}])
    assert pipe.generate("hi").prompt_ids == chat_ids                                # text goes through the template
    assert pipe.generate("hi", chat=False).prompt_ids == pipe.encode("hi")
    with pytest.warns(GenerationWarning, match="--gen-length 32 is beyond the 16 positions"):
        pipe.generate([6, 7], pipe.default_config(gen_length=32, block_length=8))
    assert Pipeline(engines).default_config() == DecodeConfig()                    # no defaults: the runtime's


def test_more_steps_than_positions_warns_once_and_decodes_as_asked(pipes):
    import warnings

    from dllm.runtime.pipeline import GenerationWarning

    pipe = pipes["llada"]
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=24)                    # 12 steps per block of 8
    with pytest.warns(GenerationWarning, match="--steps 24 gives 12 steps to each block of 8 positions, so at "
                                               "least 4 steps .* --steps 16 or fewer"):
        res = pipe.generate([6, 7], cfg)
    assert res.steps == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenerationWarning)
        pipe.generate([6, 7], cfg)                                                 # once per setting
        pipe.generate([6, 7], cfg.replace(steps=16))
        pipe.generate([6, 7], cfg.replace(commit="apd"))                           # adaptive: no schedule


def test_older_engine_directories_without_generation_defaults(engine_dirs, tmp_path):
    import json
    import shutil

    from dllm.generation import GenerationDefaults

    old = tmp_path / "old"
    shutil.copytree(engine_dirs["llada"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["generation"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_dir(old, threads=1)
    assert pipe.generation == GenerationDefaults()
    assert len(pipe.generate([6, 7, 8], CFG).ids) == 32


def test_threads_are_set_around_a_generation_and_restored(engine_dirs):
    pipe = Pipeline.from_dir(engine_dirs["llada"], threads=2)
    assert pipe.engines.threads == 2 and pipe.engines.torch_threads == 1
    seen = []
    before = torch.get_num_threads()
    for _ in pipe.stream([6, 7, 8], CFG):
        seen.append(torch.get_num_threads())
    assert pipe.last_result is not None and torch.get_num_threads() == before
    assert all(n == 1 for n in seen)                 # torch orchestrates on one thread around ONNX Runtime


def test_replace_keeps_steps_following_the_length():
    cfg = DecodeConfig(gen_length=64, block_length=32)
    assert cfg.steps == 64 and cfg.replace(gen_length=32).steps == 32
    assert DecodeConfig(gen_length=64, steps=32).replace(gen_length=128).steps == 32   # set on purpose: kept


def test_on_step_sees_every_step_and_can_stop_the_generation(pipes):
    pipe = pipes["llada"]
    cfg = method_config("dual+threshold", CFG.replace(gen_length=32, block_length=8))
    full = pipe.generate([6, 7, 8, 9], cfg)
    seen = []

    def record(canvas, view, committed):
        seen.append((view.step, int((canvas[0, 4:] == pipe.spec.mask_id).sum()), list(committed)))

    assert pipe.generate([6, 7, 8, 9], cfg, on_step=record).ids == full.ids
    assert [s for s, _, _ in seen] == list(range(1, full.steps + 1))
    assert [len(c) for _, _, c in seen] == full.tokens_per_step and seen[-1][1] == 0
    assert any(len(c) > 1 for _, _, c in seen)            # several tokens commit per step here

    class Stop(Exception):
        pass

    def stop_at_two(canvas, view, committed):
        if view.step == 2:
            raise Stop

    with pytest.raises(Stop):
        list(pipe.stream([6, 7, 8, 9], cfg, on_step=stop_at_two))
    assert pipe.generate([6, 7, 8, 9], cfg).ids == full.ids    # a stopped generation leaves nothing behind


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_a_list_of_prompts_is_a_batch(arch, pipes):
    """Texts, id lists and chats in one batch: each result is what the prompt gives alone, and the stream
    of a batch is (index, delta) pairs whose joined deltas are each sequence's text."""
    pipe = pipes[arch]
    cfg = method_config("dcu+apd", CFG)
    prompts = ["hello there", [6, 7, 8], [{"role": "user", "content": "hi"}], "a much longer prompt of text"]
    solo = [pipe.generate(p, cfg) for p in prompts]
    batch = pipe.generate(prompts, cfg, batch_size=3)
    assert [b.ids for b in batch] == [s.ids for s in solo]
    assert [b.text for b in batch] == [s.text for s in solo]
    assert [b.prompt_ids for b in batch] == [s.prompt_ids for s in solo]
    events = list(pipe.stream(prompts, cfg, batch_size=2))
    assert {i for i, _ in events} <= set(range(len(prompts)))
    for i, s in enumerate(solo):
        assert "".join(d for j, d in events if j == i) == s.text
    assert [r.ids for r in pipe.last_results] == [s.ids for s in solo]


def test_bad_prompts_in_a_batch_are_named(pipes):
    pipe = pipes["llada"]
    with pytest.raises(ConfigError, match=r"prompt 1: the prompt is empty"):
        pipe.generate([[6, 7], [], [8]], CFG)
    with pytest.raises(ConfigError, match=r"prompt 2: .*exceeds the canvas limit"):
        pipe.generate([[6, 7], [8], [6] * 120], CFG)
    with pytest.raises(ConfigError, match="batch_size applies to a list of prompts"):
        pipe.generate([6, 7], CFG, batch_size=2)


def test_stop_drops_one_prompt_of_a_batch(pipes):
    pipe = pipes["llada"]
    prompts = [[6, 7, 8], [9, 10], [11, 12, 13, 14]]
    alone = [pipe.generate(p, CFG) for p in prompts]
    got = pipe.generate(prompts, CFG, stop=lambda i: i == 1)
    assert got[1] is None and [got[0].ids, got[2].ids] == [alone[0].ids, alone[2].ids]
    streamed = list(pipe.stream(prompts, CFG, stop=lambda i: i == 0))
    assert {i for i, _ in streamed} <= {1, 2} and pipe.last_results[0] is None
    with pytest.raises(ConfigError, match="stop applies to a list of prompts"):
        pipe.generate([6, 7], CFG, stop=lambda i: False)


def test_on_result_reports_each_prompt_when_it_ends(pipes):
    """A sequence's result arrives as soon as it ends, before the batch is over, and is the final one."""
    pipe = pipes["llada"]
    prompts = [[6, 7, 8], [9, 10], [11, 12, 13, 14], [6, 9]]
    cfg = method_config("dcu+apd", CFG)
    seen, steps_left = {}, []

    def on_step(index, canvas, view, committed):
        steps_left.append(index)

    def on_result(index, result):
        seen[index] = (result, len(steps_left))

    got = pipe.generate(prompts, cfg, batch_size=2, on_step=on_step, on_result=on_result)
    assert sorted(seen) == [0, 1, 2, 3] and all(seen[i][0] is got[i] for i in range(4))
    assert min(n for _, n in seen.values()) < len(steps_left)          # someone finished before the last step
    with pytest.raises(ConfigError, match="on_result applies to a list of prompts"):
        pipe.generate([6, 7], CFG, on_result=lambda i, r: None)

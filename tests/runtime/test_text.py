"""CommittedText: the final text of a generation step by step, on a byte-level tokenizer where one
character spans several tokens: pieces that add up to the answer, EOS / max_tokens / stop-string cuts."""

from __future__ import annotations

import pytest

from dllm.runtime.text import Answer, CommittedText, Ending

TEXT = "déjà vu ✓ plain words"


@pytest.fixture
def tok(byte_tokenizer):
    return byte_tokenizer


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def special(tok):
    return tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<mask>")


def commit_in_order(text: CommittedText, answer: list[int], order, mask: int) -> list[str]:
    """Commit ``answer``'s positions in ``order``; the piece handed out after each step."""
    canvas, pieces = [mask] * len(answer), []
    for pos in order:
        canvas[pos] = answer[pos]
        pieces.append(text.advance(canvas))
    return pieces


@pytest.mark.parametrize("order", ["left-to-right", "right-to-left", "interleaved"])
def test_pieces_never_split_a_character_and_add_up_to_the_answer(tok, order):
    eos, mask = special(tok)
    ids = ids_of(tok, TEXT)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(len(ids)))     # a character spans tokens
    answer = ids + [eos, eos]
    n = len(answer)
    positions = {"left-to-right": range(n), "right-to-left": range(n - 1, -1, -1),
                 "interleaved": list(range(0, n, 2)) + list(range(1, n, 2))}[order]
    text = CommittedText(tok, mask, [eos])
    pieces = commit_in_order(text, answer, positions, mask)
    assert all("\ufffd" not in p for p in pieces)
    final = text.answer(answer)
    assert final == Answer(ids, TEXT, Ending.EOS)
    assert "".join(pieces) + text.rest(final.text) == TEXT
    if order == "right-to-left":
        assert pieces[:-1] == [""] * (n - 1)          # nothing is final until position 0 commits


def test_answers_end_at_eos_or_max_tokens(tok):
    eos, mask = special(tok)
    ids = ids_of(tok, "plain words")
    cases = [(ids + [eos, 7], None, ids, Ending.EOS), (ids + [eos], len(ids), ids, Ending.EOS),  # EOS at the limit
             (ids + [eos], len(ids) - 1, ids[:-1], Ending.LENGTH), (ids, None, ids, Ending.LENGTH)]   # canvas full
    for gen, max_tokens, want, ending in cases:
        answer = CommittedText(tok, mask, [eos], max_tokens=max_tokens).answer(gen)
        assert (answer.ids, answer.text, answer.ending) == (want, tok.decode(want), ending)
    capped = CommittedText(tok, mask, [eos], max_tokens=3)
    assert capped.advance(ids + [mask]) == tok.decode(ids[:3])            # nothing past the cap is streamed


def test_a_stop_string_ends_the_answer_the_same_mid_generation_and_at_the_end(tok):
    """A stop string over several tokens: no piece shows its start, the committed prefix that first holds it
    makes the answer final (``stopped``), and the final row gives the same answer and token count."""
    eos, mask = special(tok)
    ids = ids_of(tok, TEXT)
    answer = ids + [eos]
    stop = ("✓ p", "zz")
    completes = next(k for k in range(len(ids) + 1) if "✓ p" in tok.decode(ids[:k]))
    text = CommittedText(tok, mask, [eos], stop=stop)
    canvas, pieces = [mask] * len(answer), []
    for pos in range(len(answer)):
        canvas[pos] = answer[pos]
        pieces.append(text.advance(canvas))
        assert "✓" not in "".join(pieces)
        if text.stopped is not None:
            break
    assert pos + 1 == completes                       # stopped at the token that completes the stop string
    assert "".join(pieces) == "déjà vu "
    late = CommittedText(tok, mask, [eos], stop=stop).answer(answer)
    assert text.stopped == late == Answer(ids[:completes], "déjà vu ", Ending.STOP)
    assert text.advance(answer) == "" and text.rest(late.text) == ""          # final: nothing more to hand out
    assert CommittedText(tok, mask, [eos], stop=("nowhere",)).answer(answer).ending == Ending.EOS


def test_a_held_back_tail_that_is_no_stop_string_comes_out_later(tok):
    eos, mask = special(tok)
    ids = ids_of(tok, "plain words")
    text = CommittedText(tok, mask, [eos], stop=("s!",))
    pieces = commit_in_order(text, ids + [eos], range(len(ids) + 1), mask)
    assert "".join(pieces) == "plain words"           # "s" waited for the next token, which was no "!"
    assert text.stopped is None and text.answer(ids + [eos]).ending == Ending.EOS

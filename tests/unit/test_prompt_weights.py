"""A1111 prompt weighting: the parser, and what the text encoder does with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.contracts import EncodeRequest
from models.prompt_weights import BREAK_WEIGHT, parse_prompt
from models.snapshot import open_snapshot
from models.text_encoder import TextEncoderStage


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("a cat on a mat", [("a cat on a mat", 1.0)]),
        ("a (cat:1.5) on a [mat]", [("a ", 1.0), ("cat", 1.5), (" on a ", 1.0), ("mat", 1 / 1.1)]),
        ("((bird))", [("bird", pytest.approx(1.21))]),
        ("(cat) (cat:1.1)", [("cat", pytest.approx(1.1)), (" ", 1.0), ("cat", 1.1)]),
        ("a (red (cat", [("a ", 1.0), ("red ", pytest.approx(1.1)), ("cat", pytest.approx(1.21))]),
        (r"\(x\) and \[y\]", [("(x) and [y]", 1.0)]),
        ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", BREAK_WEIGHT), ("a dog", 1.0)]),
        ("time: 5 o'clock", [("time: 5 o'clock", 1.0)]),
        ("sun)set", [("sun)set", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse(text: str, fragments: list) -> None:
    assert parse_prompt(text) == fragments


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> TextEncoderStage:
    return TextEncoderStage("tiny", open_snapshot(str(tiny_model_dir)), torch.device("cpu"), torch.float32)


def embed(encoder: TextEncoderStage, prompt: str) -> torch.Tensor:
    return encoder.encode([EncodeRequest("tiny", prompt, None, False)])[0].positive[0]


def test_weight_one_everywhere_is_the_plain_prompt(encoder: TextEncoderStage) -> None:
    assert torch.equal(embed(encoder, "a (cat:1.0) on a mat"), embed(encoder, "a cat on a mat"))


def test_a_weight_scales_its_tokens_against_the_rest(encoder: TextEncoderStage) -> None:
    plain, weighted = embed(encoder, "a cat on a mat"), embed(encoder, "a (cat:1.5) on a mat")
    cat = 1 + len(encoder.token_ids("a "))  # after the start token
    ratio = weighted / plain
    others = torch.cat([ratio[:cat], ratio[cat + 1 :]])
    # every hidden state of the chunk is rescaled alike (back to the chunk's mean); the weighted token 1.5x more
    assert torch.allclose(others, others[0, 0].expand_as(others), rtol=1e-4)
    assert torch.allclose(ratio[cat], 1.5 * others[0, 0].expand_as(ratio[cat]), rtol=1e-4)
    assert abs(weighted.mean().item() - plain.mean().item()) < 1e-5  # A1111 keeps the chunk's mean


def test_break_starts_a_new_chunk(encoder: TextEncoderStage) -> None:
    assert embed(encoder, "a cat, a dog").shape[0] == 77
    split = embed(encoder, "a cat BREAK a dog")
    assert split.shape[0] == 2 * 77
    assert torch.equal(split[77:], embed(encoder, "(a dog:1.0)")[:77])  # the second chunk stands alone


def test_cache_is_keyed_by_the_parsed_prompt(encoder: TextEncoderStage) -> None:
    embed(encoder, "a (cozy:1.1) cabin")
    hits = encoder.cache_hits
    embed(encoder, "a (cozy) cabin")  # parses to the same fragments
    assert encoder.cache_hits == hits + 2  # the prompt and the empty text
    assert not torch.equal(embed(encoder, "a (cozy:1.2) cabin"), embed(encoder, "a (cozy) cabin"))


def test_weighting_syntax_counts_toward_the_token_limit(encoder: TextEncoderStage) -> None:
    from models.errors import PromptTooLongError

    long = " ".join(["(astronaut:1.2)"] * (encoder.max_prompt_tokens + 1))
    with pytest.raises(PromptTooLongError):
        embed(encoder, long)


def test_a_full_chunk_is_cut_after_its_last_comma(encoder: TextEncoderStage) -> None:
    """A1111's comma back-tracking: a chunk that fills up within 20 tokens of a comma ends at that comma, and the
    phrase since starts the next chunk; with no comma that near, the chunk is cut at 75 tokens."""
    word = encoder.token_ids("cat")
    assert len(word) == 1
    tail = ["dog"] * 10
    _, (chunks, _) = encoder.tokens(" ".join(["cat"] * 68) + ", " + " ".join(tail), "prompt")
    comma = encoder.comma_token
    first, second = chunks[0][1:-1], chunks[1][1:]
    assert first[:69] == word * 68 + [comma] and set(first[69:]) == {encoder.tokenizer.pad_token_id}
    assert second[:10] == encoder.token_ids(" ".join(tail))
    _, (far, _) = encoder.tokens(" ".join(["cat"] * 40) + ", " + " ".join(["dog"] * 40), "prompt")
    assert far[0][1:76] == (word * 40 + [comma] + encoder.token_ids(" ".join(["dog"] * 34)))

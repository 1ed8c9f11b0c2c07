"""The incremental detokenizer: multi-byte characters and stop strings that span tokens."""

from __future__ import annotations

import pytest

from controller.tokenizer import ModelTokenizer
from tests.factories import smollm2_dir

TEXT = "Grüße aus Zürich 😀🚀 — 日本語のテキスト, and then the END marker appears here."


@pytest.fixture(scope="module")
def tokenizer():
    return ModelTokenizer(smollm2_dir())


def stream(tokenizer, ids, stop=None):
    detok = tokenizer.detokenizer(stop, [])
    deltas = []
    for token_id in ids:
        detok.add([token_id])
        deltas.append(detok.delta(final=False))
        if detok.stopped:
            break
    deltas.append(detok.delta(final=True))
    return detok, deltas


def test_token_by_token_deltas_equal_the_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.hf.decode(ids, skip_special_tokens=True) == TEXT
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    assert detok.num_tokens == len(ids)


def test_a_stop_string_spanning_tokens_never_leaks(tokenizer):
    ids = tokenizer.encode(TEXT)
    stop = "END marker"
    assert len(tokenizer.encode(" " + stop)) > 1  # the stop string spans several tokens
    detok, deltas = stream(tokenizer, ids, stop=[stop, "never-seen"])
    assert "".join(deltas) == TEXT[: TEXT.index(stop)]
    assert detok.stopped and all("END" not in d for d in deltas)
    # Tokens up to the one completing the stop string count as output; later ones do not.
    assert detok.num_tokens < len(ids)


def test_stop_string_inside_one_multibyte_run(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok, deltas = stream(tokenizer, ids, stop=["🚀"])
    assert "".join(deltas) == "Grüße aus Zürich 😀"


def test_chat_template_and_eos(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tokenizer.hf.decode(ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids({"eos_token_id": 2}) == [2]


MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again"}],
]


@pytest.mark.parametrize("which", ["smollm2", "synthetic"])
def test_the_controllers_tokenizer_matches_transformers_auto_tokenizer(which, tmp_path):
    """The controller loads tokenizers without AutoTokenizer (which imports torch): same ids, same chat text."""
    from transformers import AutoTokenizer

    from workers.weights.synthetic_tokenizer import synthetic_tokenizer_dir

    directory = smollm2_dir() if which == "smollm2" else synthetic_tokenizer_dir(1000, tmp_path)
    ours, reference = ModelTokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert ours.vocab_size == len(reference) and ours.hf.eos_token_id == reference.eos_token_id
    assert ours.encode(TEXT) == reference.encode(TEXT, add_special_tokens=True)
    for messages in MESSAGES:
        text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == reference.encode(text, add_special_tokens=False)

"""Tokenizer loading, prompt templates and left-padding."""

import numpy as np
import pytest

from aapo_jax import data
from tests import hf_fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = hf_fixtures.make_tokenizer(tmp_path_factory.mktemp("tok"))
    return data.load_tokenizer(path)


def test_load_tokenizer_sets_left_padding(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load_tokenizer(tmp_path / "nope")


def test_plain_and_chat_templates(tokenizer):
    plain = data.format_prompt(tokenizer, "2+2?", template="Q: {question}\nA:")
    assert plain == "Q: 2+2?\nA:"
    assert data.format_prompt(tokenizer, "2+2?", system_prompt="Be brief.") == "Be brief.\n2+2?"
    chat = data.format_prompt(tokenizer, "2+2?", system_prompt="Be brief.", use_chat_template=True)
    assert chat == "<|system|>Be brief.<|user|>2+2?<|assistant|>"


def test_chat_template_required(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        data.format_prompt(tokenizer, "x", use_chat_template=True)


def test_left_pad_buckets():
    ids, mask = data.left_pad([[5, 6, 7], [8]], pad_id=0, buckets=(2, 4, 8))
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert ids.dtype == mask.dtype == np.int32
    ids, _ = data.left_pad([[1, 2]], pad_id=9, buckets=None)
    assert ids.shape == (1, 2)
    with pytest.raises(ValueError, match="does not fit"):
        data.left_pad([[1, 2, 3]], pad_id=0, length=2)
    with pytest.raises(ValueError, match="largest bucket 4"):
        data.bucket_length(5, (2, 4))


def test_tokenize_prompts_round_trip(tokenizer):
    prompts = ["What is 12 + 7?", "Calculate 5 - 3."]
    ids, mask = data.tokenize_prompts(tokenizer, prompts, buckets=(8, 16, 32))
    assert ids.shape[1] in (8, 16, 32)
    for row, text in enumerate(prompts):
        assert tokenizer.decode(ids[row][mask[row] == 1]) == text

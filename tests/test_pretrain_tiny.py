"""The shipped quickstart checkpoint: files, size, task.json, tokenizer, held-out accuracy."""

import json
from pathlib import Path

import numpy as np
import pytest

from aapo_jax import evaluation, models
from aapo_jax.data.sources import Example, gym_splits
from aapo_jax.data.tokenize import load_tokenizer, tokenize_prompts
from experiments import pretrain_tiny

ASSETS = Path(__file__).resolve().parent.parent / "aapo_jax" / "assets" / "quickstart"
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "task.json",
    "README.md",
)
MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def spec():
    return json.loads((ASSETS / "task.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS)


@pytest.fixture(scope="module")
def eval_split(spec):
    _, evaluation_set = gym_splits(
        spec["name"],
        train_size=spec["train_size"],
        eval_size=spec["eval_size"],
        seed=spec["split_seed"],
        **spec["kwargs"],
    )
    return evaluation_set


def test_assets_exist_and_are_small():
    for name in FILES:
        assert (ASSETS / name).is_file(), name
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"quickstart assets are {total} bytes"


def test_task_json_fields(spec):
    assert spec["name"] == pretrain_tiny.TASK_NAME
    assert spec["kwargs"] == pretrain_tiny.TASK_KWARGS
    for key in ("train_size", "eval_size", "split_seed", "max_new_tokens", "max_prompt_length"):
        assert isinstance(spec[key], int), key
    assert spec["eval_size"] >= 500
    assert "{question}" in spec["prompt_template"]
    warm = spec["warmup"]
    low, high = warm["band_first100"]
    assert low <= warm["eval_accuracy_first100"] <= high
    assert 0.25 <= warm["eval_accuracy"] <= 0.45
    for key in ("advantage", "group_size", "prompts_per_step", "learning_rate", "steps"):
        assert key in spec["rl"], key


def test_checkpoint_and_tokenizer_load(spec, tokenizer):
    model = models.load_hf_checkpoint(ASSETS)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert 0.2e6 < model.config.num_params < 1e6
    # Every digit is its own token; decoding gives the answer text back.
    ids = tokenizer("-103", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["-", "1", "0", "3"]
    assert tokenizer.decode(ids) == "-103"
    question = "State the final answer to the following arithmetic problem: 15 - 43 - 75 ="
    prompt = spec["prompt_template"].format(question=question)
    ids, _ = tokenize_prompts(tokenizer, [prompt], buckets=None)
    assert ids.shape[1] <= spec["max_prompt_length"]
    assert tokenizer.decode(ids[0]) == prompt


def test_answer_targets_and_sft_encoding(tokenizer):
    targets, lengths = pretrain_tiny.encode_answers(tokenizer, ["7", "-42"])
    np.testing.assert_array_equal(lengths, [1, 3])
    assert targets[0, 1:].tolist() == [-1, -1]
    examples = [Example(question="1 + 6 =", answer="7"), Example(question="8 - 50 =", answer="-42")]
    data = pretrain_tiny.encode_sft(tokenizer, examples)
    eos = tokenizer.eos_token_id
    assert data["completion_ids"][0, :2].tolist() == [targets[0, 0], eos]
    assert data["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert data["completion_ids"][1].tolist() == [*targets[1].tolist(), eos]
    assert data["prompt_mask"][:, -1].tolist() == [1, 1]  # left-padded


def test_shipped_model_accuracy_is_in_the_documented_band(spec, tokenizer, eval_split):
    model = models.load_hf_checkpoint(ASSETS)
    report = evaluation.evaluate(
        model,
        tokenizer,
        eval_split[:100],
        score_fn=evaluation.gym_score_fn(spec["name"]),
        prompt_fn=evaluation.template_prompt_fn(spec["prompt_template"]),
        n_samples=0,
        max_new_tokens=spec["max_new_tokens"],
        batch_size=100,
        progress=False,
    )
    low, high = spec["warmup"]["band_first100"]
    assert low <= report["greedy_accuracy"] <= high, (report["greedy_accuracy"], (low, high))

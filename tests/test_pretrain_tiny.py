"""The shipped quickstart checkpoint: files, size, task.json, tokenizer, held-out accuracy."""

import json
from pathlib import Path

import numpy as np
import pytest

from aapo_jax import data, evaluation, models
from aapo_jax.data.sources import Example, gym_splits
from aapo_jax.data.tokenize import load_tokenizer, tokenize_prompts
from aapo_jax.sampling import SamplerSettings
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
    assert "band_first100" not in warm
    assert 0.25 <= warm["eval_accuracy"] <= 0.45
    assert 0.0 <= warm["eval_accuracy_first100"] <= 1.0
    assert warm["steps"] == warm["history"][-1]["step"]
    assert warm["eval_accuracy"] == warm["history"][-1]["eval_accuracy"]
    assert spec["rl"] == pretrain_tiny.SUGGESTED_RL
    assert spec["rl"]["algorithm"] == "aapo"
    assert not {"advantage", "loss"} & set(spec["rl"])
    readme = (ASSETS / "README.md").read_text()
    assert f"**{warm['eval_accuracy']:.1%}** on the {spec['eval_size']} eval problems" in readme
    assert "band" not in readme


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
    targets, lengths = data.encode_targets(tokenizer, ["7", "-42"])
    np.testing.assert_array_equal(lengths, [1, 3])
    assert targets[0, 1:].tolist() == [-1, -1]
    examples = [Example(question="1 + 6 =", answer="7"), Example(question="8 - 50 =", answer="-42")]
    assert tokenizer.decode(targets[1].tolist()) == "-42"
    sft = pretrain_tiny.encode_sft(tokenizer, examples)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert sft["completion_ids"][0].tolist() == [targets[0, 0], eos, pad, pad]
    assert sft["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert sft["completion_ids"][1].tolist() == [*targets[1].tolist(), eos]
    assert sft["prompt_mask"][:, -1].tolist() == [1, 1]  # left-padded


def test_shipped_model_reproduces_the_recorded_accuracy(spec, tokenizer, eval_split):
    # The whole eval split, greedy, through the evaluation every report uses: the numbers
    # that task.json and the README record (35.0%, the quickstart's starting accuracy) must
    # come back within one problem.
    assert len(eval_split) == spec["eval_size"] == 500
    model = models.load_hf_checkpoint(ASSETS)
    with evaluation.make_scorer(f"gym:{spec['name']}", num_workers=0) as scorer:
        report = evaluation.evaluate(
            model,
            tokenizer,
            eval_split,
            scorer=scorer,
            prompt_fn=evaluation.template_prompt_fn(spec["prompt_template"]),
            settings=SamplerSettings(max_new_tokens=spec["max_new_tokens"]),
            n_samples=0,
            batch_size=len(eval_split),
            details=True,
            progress=False,
        )
    warm = spec["warmup"]
    assert (report["scorer_timeouts"], report["scorer_errors"]) == (0, 0)
    assert report["greedy_accuracy"] == pytest.approx(warm["eval_accuracy"], abs=0.002)
    first100 = np.mean([p["greedy_score"] >= 1.0 for p in report["problems"][:100]])
    assert first100 == pytest.approx(warm["eval_accuracy_first100"], abs=0.01)

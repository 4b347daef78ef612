"""Problem sources (reasoning-gym, jsonl, parquet, TFDS), prompt encoding and the grain loader."""

import json

import numpy as np
import pytest

from aapo_jax import data
from tests import hf_fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return data.load_tokenizer(hf_fixtures.make_tokenizer(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}


def math_rows(n, question="problem", answer="answer", start=0):
    return [{question: f"What is {i} + 1?", answer: i + 1, "level": i % 3} for i in range(start, n)]


# --- reasoning-gym ------------------------------------------------------------


def test_gym_splits_disjoint_and_deterministic():
    config = data.DataConfig(
        name="basic_arithmetic", train_size=40, eval_size=15, seed=3, gym_kwargs={"max_terms": 3}
    )
    assert config.gym_kwargs == (("max_terms", 3),)
    hash(config)
    train, evaluation = data.load_splits(config)
    assert (len(train), len(evaluation)) == (40, 15)
    assert not {e.question for e in train} & {e.question for e in evaluation}
    again = data.load_splits(config)
    assert (train, evaluation) == again
    assert train[0].entry["question"] == train[0].question
    assert isinstance(train[0].answer, str)
    other, _ = data.load_splits(data.DataConfig(name="basic_arithmetic", train_size=40, seed=4))
    assert [e.question for e in other] != [e.question for e in train]
    _, none = data.load_splits(dataclass_replace(config, eval_size=0))
    assert none == []


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# --- files --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize(
    "question,answer",
    [("problem", "solution"), ("question", "gt_answer"), ("prompt", "answer")],
)
def test_read_records_detects_columns(tmp_path, fmt, question, answer):
    path = WRITERS[fmt](tmp_path / f"d.{fmt}", math_rows(4, question, answer))
    examples = data.read_records(path)
    assert [e.question for e in examples] == [f"What is {i} + 1?" for i in range(4)]
    assert [e.answer for e in examples] == ["1", "2", "3", "4"]
    assert examples[2].entry == {question: "What is 2 + 1?", answer: 3, "level": 2}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_read_records_prefers_answer_and_takes_explicit_keys(tmp_path, fmt):
    rows = [{"problem": "p", "solution": "worked: 7", "answer": "7", "q": "other", "a": 1.5}]
    path = WRITERS[fmt](tmp_path / f"d.{fmt}", rows)
    (example,) = data.read_records(path)
    assert (example.question, example.answer) == ("p", "7")
    (example,) = data.read_records(path, question_key="q", answer_key="a")
    assert (example.question, example.answer) == ("other", "1.5")


def test_read_records_chat_list_and_empty_question_kept(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}],
            "answer": 4,
        },
        {"prompt": "", "answer": 1},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = data.read_records(path)
    assert [e.question for e in examples] == ["2+2?", ""]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_read_records_missing_column(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"d.{fmt}", [{"problem": "p", "level": 1}])
    with pytest.raises(
        ValueError, match=r"d\.\w+.*answer.*columns present: \['level', 'problem'\]"
    ):
        data.read_records(path)
    with pytest.raises(ValueError, match=r"no column 'query' \(question_key\).*'level', 'problem'"):
        data.read_records(path, question_key="query", answer_key="level")


def test_read_records_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": 1}\n\n{"problem": "b", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: invalid JSON"):
        data.read_records(path)
    path.write_text('{"problem": "a", "answer": 1}\n{"problem": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: no column 'answer'"):
        data.read_records(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        data.read_records(path)
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        data.read_records(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        data.read_records(tmp_path / "nope.jsonl")


def test_load_splits_holds_out_eval_from_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", math_rows(30))
    config = data.DataConfig(source="jsonl", path=str(path), eval_size=8, train_size=100, seed=1)
    train, evaluation = data.load_splits(config)
    assert (len(train), len(evaluation)) == (22, 8)
    assert not {e.question for e in train} & {e.question for e in evaluation}
    questions = [e.question for e in train]
    assert questions == sorted(questions, key=lambda q: int(q.split()[2]))  # file order kept
    assert data.load_splits(config) == (train, evaluation)
    train_small, evaluation_2 = data.load_splits(dataclass_replace(config, train_size=5))
    assert (train_small, evaluation_2) == (train[:5], evaluation)
    other = data.load_splits(dataclass_replace(config, seed=2))[1]
    assert [e.question for e in other] != [e.question for e in evaluation]
    with pytest.raises(ValueError, match=r"30 records; data\.eval_size=30"):
        data.load_splits(dataclass_replace(config, eval_size=30))


def test_load_splits_with_eval_file(tmp_path):
    train_path = write_parquet(tmp_path / "train.parquet", math_rows(10, "question", "gt_answer"))
    eval_path = write_parquet(tmp_path / "eval.parquet", math_rows(20, "problem", "solution", 5))
    config = data.DataConfig(
        source="parquet", path=str(train_path), eval_path=str(eval_path), eval_size=4
    )
    train, evaluation = data.load_splits(config)
    assert len(train) == 10
    assert [e.answer for e in evaluation] == ["6", "7", "8", "9"]
    # eval_size=0 with an eval file: every row of it.
    _, every = data.load_splits(dataclass_replace(config, eval_size=0))
    assert [e.answer for e in every] == [str(i + 1) for i in range(5, 20)]


def test_load_splits_without_eval_trains_on_every_row_in_order(tmp_path):
    """eval_size=0 and no eval file (the paper configs): nothing held out, nothing reordered."""
    path = write_jsonl(tmp_path / "train.jsonl", math_rows(30))
    config = data.DataConfig(source="jsonl", path=str(path), eval_size=0, seed=1)
    train, evaluation = data.load_splits(config)
    assert train == data.read_records(path) and evaluation == []
    train, evaluation = data.load_splits(dataclass_replace(config, train_size=5))
    assert train == data.read_records(path)[:5] and evaluation == []


# --- TFDS (array_record, no TensorFlow) ---------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    class AapoTinyMath(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # dataset_info_from_configs() fails for builders defined outside a package.
            features = tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "level": tfds.features.Scalar(dtype=np.int32),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(12, 0),
                "test": self._generate_examples(3, 100),
            }

        def _generate_examples(self, n, offset):
            for i in range(offset, offset + n):
                yield i, {"problem": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3}

    path = tmp_path_factory.mktemp("tfds")
    AapoTinyMath(data_dir=path, file_format="array_record").download_and_prepare()
    return path


def test_tfds_examples(tfds_dir):
    examples = data.tfds_examples("aapo_tiny_math", data_dir=tfds_dir, split="train")
    assert len(examples) == 12
    by_answer = {e.answer: e for e in examples}
    assert by_answer["6"].question == "What is 5 + 1?"
    assert by_answer["6"].entry == {"problem": "What is 5 + 1?", "answer": "6", "level": 2}
    assert isinstance(by_answer["6"].entry["level"], int)
    explicit = data.tfds_examples(
        "aapo_tiny_math", data_dir=tfds_dir, split="test", answer_key="level"
    )
    assert sorted(e.answer for e in explicit) == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"aapo_tiny_math.*Unknown split .validation."):
        data.tfds_examples("aapo_tiny_math", data_dir=tfds_dir, split="validation")
    with pytest.raises(ValueError, match="not found in data_dir"):
        data.tfds_examples("aapo_no_such_set", data_dir=tfds_dir, split="train")


def test_tfds_load_splits(tfds_dir):
    config = data.DataConfig(source="tfds", name="aapo_tiny_math", path=str(tfds_dir))
    train, evaluation = data.load_splits(config)
    assert (len(train), len(evaluation)) == (12, 3)
    held = dataclass_replace(config, eval_split="", eval_size=4)
    train, evaluation = data.load_splits(held)
    assert (len(train), len(evaluation)) == (8, 4)
    assert not {e.question for e in train} & {e.question for e in evaluation}
    # eval_size=0: the whole eval split, or with none, nothing held out.
    assert len(data.load_splits(dataclass_replace(config, eval_size=0))[1]) == 3
    train, evaluation = data.load_splits(dataclass_replace(held, eval_size=0))
    assert evaluation == []
    assert train == data.tfds_examples("aapo_tiny_math", data_dir=tfds_dir, split="train")


# --- encoding -----------------------------------------------------------------


def test_encode_examples_counts_drops(tokenizer, caplog):
    examples = [
        data.Example("What is 12 + 7?", "19"),
        data.Example("   ", "0"),
        data.Example("Calculate 5 - 3 - 6. " * 20, "-4"),
        data.Example("", "1"),
        data.Example("What is 1 + 1?", "2"),
    ]
    encoded, stats = data.encode_examples(
        examples, tokenizer, template="Q: {question}\nA:", max_prompt_length=24
    )
    assert stats == data.PromptStats(kept=2, dropped_too_long=1, dropped_empty=2)
    assert [p.example.answer for p in encoded] == ["19", "2"]
    assert "dropped 1 longer than max_prompt_length=24" in caplog.text
    first = encoded[0]
    assert first.text == "Q: What is 12 + 7?\nA:"
    assert list(first.ids) == tokenizer(first.text, add_special_tokens=False)["input_ids"]

    chat, _ = data.encode_examples(
        examples[:1], tokenizer, use_chat_template=True, system_prompt="S", max_prompt_length=64
    )
    assert chat[0].text == "<|system|>S<|user|>What is 12 + 7?<|assistant|>"
    assert chat[0].ids[0] == tokenizer.convert_tokens_to_ids("<|system|>")


def test_encode_examples_truncates_overlong_prompts_on_the_left(tokenizer):
    # TRL (the AAPO authors' trainer) keeps an over-long prompt's LAST max_prompt_length tokens.
    long_q = "Calculate 5 - 3 - 6. " * 20
    examples = [data.Example("What is 1 + 1?", "2"), data.Example(long_q, "-4")]
    encoded, stats = data.encode_examples(
        examples, tokenizer, max_prompt_length=24, overlong="truncate_left"
    )
    assert stats == data.PromptStats(kept=2, dropped_too_long=0, dropped_empty=0, truncated=1)
    full = tokenizer(long_q, add_special_tokens=False)["input_ids"]
    assert len(full) > 24 and list(encoded[1].ids) == full[-24:]
    short = tokenizer("What is 1 + 1?", add_special_tokens=False)["input_ids"]
    assert list(encoded[0].ids) == short
    with pytest.raises(ValueError, match="overlong='cut'"):
        data.encode_examples(examples, tokenizer, max_prompt_length=24, overlong="cut")


def test_encode_examples_nothing_left(tokenizer):
    examples = [data.Example("", "1"), data.Example("What is 12 + 7? " * 10, "19")]
    with pytest.raises(
        ValueError, match=r"of 2 examples, 1 are longer than max_prompt_length=8.*1"
    ):
        data.encode_examples(examples, tokenizer, max_prompt_length=8)


# --- loader -------------------------------------------------------------------


def fake_prompts(n, max_len=20):
    rng = np.random.default_rng(0)
    return [
        data.EncodedPrompt(
            ids=tuple(int(t) for t in rng.integers(3, 90, size=1 + i % max_len)),
            example=data.Example(f"q{i}", f"a{i}", {"id": i}),
            text=f"q{i}",
        )
        for i in range(n)
    ]


def loader(prompts, **kwargs):
    kwargs = {"batch_size": 4, "seed": 0, "pad_id": 0, "shard_index": 0, "shard_count": 1} | kwargs
    return data.PromptLoader(prompts, **kwargs)


def test_loader_batches_are_left_padded_into_buckets():
    prompts = fake_prompts(10)
    batch = next(loader(prompts, buckets=(4, 8, 16, 32)))
    lengths = [len(prompts[i].ids) for i in batch.indices]
    assert (
        batch.ids.shape == batch.mask.shape == (4, data.bucket_length(max(lengths), (4, 8, 16, 32)))
    )
    assert batch.ids.dtype == batch.mask.dtype == np.int32
    for row, i in enumerate(batch.indices):
        n = len(prompts[i].ids)
        assert batch.mask[row].sum() == n and batch.mask[row, -n:].all()
        assert tuple(batch.ids[row, -n:]) == prompts[i].ids
        assert (batch.ids[row, :-n] == 0).all()
    assert batch.answers == [f"a{i}" for i in batch.indices]
    assert batch.questions == [f"q{i}" for i in batch.indices]
    assert batch.entries == [{"id": int(i)} for i in batch.indices]


def test_loader_shuffles_deterministically_and_repeats():
    prompts = fake_prompts(10)
    take = lambda it, k: [next(it).indices.tolist() for _ in range(k)]
    a = take(loader(prompts), 6)
    assert a == take(loader(prompts), 6)
    assert a != take(loader(prompts, seed=1), 6)
    # 10 prompts, batches of 4: 2 batches per epoch, the 2 left over are dropped.
    for epoch in range(3):
        seen = a[2 * epoch] + a[2 * epoch + 1]
        assert len(set(seen)) == 8
    assert a[:2] != a[2:4]
    ordered = take(loader(prompts, shuffle=False), 4)
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    finite = list(loader(prompts, num_epochs=2))
    assert [b.indices.tolist() for b in finite] == a[:4]


def test_loader_shards_disjointly():
    prompts = fake_prompts(20)
    full = loader(prompts, batch_size=8)
    shards = [loader(prompts, batch_size=8, shard_index=i, shard_count=2) for i in range(2)]
    for _ in range(5):
        whole = next(full)
        parts = [next(s) for s in shards]
        assert all(p.ids.shape == (4, whole.ids.shape[1]) for p in parts)
        assert not set(parts[0].indices) & set(parts[1].indices)
        np.testing.assert_array_equal(np.concatenate([p.indices for p in parts]), whole.indices)
        np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), whole.ids)
    with pytest.raises(ValueError, match="batch_size=7"):
        loader(prompts, batch_size=7, shard_index=0, shard_count=2)


def test_loader_resumes_exactly():
    prompts = fake_prompts(11)
    reference = loader(prompts, seed=5)
    expected = [next(reference).indices.tolist() for _ in range(9)]
    first = loader(prompts, seed=5)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = loader(prompts, seed=5)
    resumed.set_state(state)
    assert [next(resumed).indices.tolist() for _ in range(6)] == expected[3:]
    # The position is global, so a resume on two hosts continues the same batches.
    half = loader(prompts, seed=5, batch_size=4, shard_index=1, shard_count=2)
    half.set_state(state)
    assert next(half).indices.tolist() == expected[3][2:]
    with pytest.raises(ValueError, match="seed"):
        loader(prompts, seed=6).set_state(state)


def test_loader_errors():
    prompts = fake_prompts(6, max_len=40)
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        loader(prompts, batch_size=8)
    with pytest.raises(ValueError, match="largest bucket 4"):
        loader(prompts, buckets=(4,))


# --- config -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(source="csv"), "data.source"),
        (dict(name=""), "data.name"),
        (dict(name="x", path="a.jsonl"), "data.path"),
        (dict(source="jsonl"), "data.path"),
        (dict(source="jsonl", path="a.parquet"), "data.path"),
        (dict(source="parquet", path="a.parquet", eval_path="b.jsonl"), "data.eval_path"),
        (dict(source="tfds", path="/d"), "data.name"),
        (dict(source="tfds", name="t"), "data.path"),
        (dict(source="tfds", name="t", path="/d", eval_path="e.jsonl"), "data.eval_path"),
        (dict(name="x", train_size=0), "data.train_size"),
        (dict(name="x", eval_size=-1), "data.eval_size"),
        (dict(name="x", gym_kwargs=(("a",),)), "data.gym_kwargs"),
        (dict(name="x", question_key="q"), "data.question_key"),
        (dict(source="jsonl", path="a.jsonl", gym_kwargs={"a": 1}), "data.gym_kwargs"),
    ],
)
def test_data_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        data.DataConfig(**kwargs)

"""Problem sources: reasoning-gym tasks, jsonl / parquet files and TFDS array_record sets."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from aapo_jax import fields

# Eval problems are drawn with a seed far from the train seed, then any question
# also present in the train split is dropped, so the splits never overlap.
EVAL_SEED_OFFSET = 1_000_003

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: the question text, the gold answer and its raw record.

    `entry` is the source's own record (for reasoning-gym: the dataset entry that
    its `score_answer` needs; for files: the row).
    """

    question: str
    answer: str
    entry: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def _check_gym_task(name: str, prefix: str) -> None:
    import reasoning_gym  # deferred: slow import (sympy, matplotlib)

    if name not in reasoning_gym.factory.DATASETS:
        import difflib

        close = difflib.get_close_matches(name, reasoning_gym.factory.DATASETS, n=3)
        raise ValueError(f"{prefix}unknown reasoning-gym task {name!r}; did you mean {close}?")


def gym_splits(
    name: str,
    *,
    train_size: int,
    eval_size: int,
    seed: int = 0,
    **dataset_kwargs: Any,
) -> tuple[list[Example], list[Example]]:
    """Seeded, disjoint train and eval problems from a reasoning-gym task.

    Args:
      name: a reasoning-gym dataset name, e.g. "chain_sum".
      train_size, eval_size: number of problems in each split.
      seed: the train seed; eval uses `seed + EVAL_SEED_OFFSET`.
      **dataset_kwargs: the task's config fields (e.g. min_terms=2, max_digits=2).

    Raises:
      ValueError: unknown task name, or too few distinct eval problems exist
        outside the train split.
    """
    import reasoning_gym  # deferred: slow import (sympy, matplotlib)

    _check_gym_task(name, "")

    def draw(size: int, split_seed: int) -> list[Example]:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=split_seed, **dataset_kwargs)
        return [
            Example(question=e["question"], answer=str(e["answer"]), entry=dict(e)) for e in dataset
        ]

    train = draw(train_size, seed)
    seen = {e.question for e in train}
    pool = draw(4 * eval_size + 64, seed + EVAL_SEED_OFFSET)
    evaluation, taken = [], set()
    for example in pool:
        if example.question in seen or example.question in taken:
            continue
        taken.add(example.question)
        evaluation.append(example)
        if len(evaluation) == eval_size:
            break
    if len(evaluation) < eval_size:
        raise ValueError(
            f"reasoning-gym task {name!r} yields only {len(evaluation)} distinct eval problems "
            f"outside the {train_size} train problems (asked for eval_size={eval_size}); "
            "widen the task's settings or lower the sizes."
        )
    return train, evaluation


# ---------------------------------------------------------------------------
# Local files (jsonl / parquet) and TFDS array_record datasets.

# Column auto-detection: the first name present wins. These cover the paper's
# files: SimpleRL-Zoo (`question`, `gt_answer`) and open-rs (`problem`,
# `solution`, `answer`). `answer` is preferred to `solution` because open-rs's
# `solution` is a worked solution while `answer` is the bare final answer.
QUESTION_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("gt_answer", "answer", "solution")
FILE_SUFFIXES = (".jsonl", ".parquet")


def _missing_key_error(where: str, key: str, role: str, columns) -> ValueError:
    return ValueError(
        f"{where}: no column {key!r} ({role}); columns present: {sorted(columns)}. "
        f"Pass data.{role} to name the column."
    )


def _pick_key(where: str, columns, key: str | None, candidates: tuple[str, ...], role: str) -> str:
    """The column of `role`: `key` ("a|b": the first of those present), else the first
    present of `candidates`; the error names the columns present."""
    if key is not None:
        for name in key.split("|"):
            if name in columns:
                return name
        raise _missing_key_error(where, key, role, columns)
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"{where}: found none of the {role.split('_')[0]} columns {list(candidates)}; "
        f"columns present: {sorted(columns)}. Pass data.{role} to name the column."
    )


def _question_text(value: Any) -> str:
    """A question cell as text; a chat list (verl-style `prompt`) gives its last user turn."""
    if value is None:
        return ""
    if isinstance(value, list | tuple) and value and all(isinstance(m, Mapping) for m in value):
        users = [m for m in value if m.get("role") == "user"] or list(value)
        return str(users[-1].get("content", ""))
    return value if isinstance(value, str) else str(value)


def _to_examples(
    rows: Sequence[Mapping[str, Any]],
    where: str,
    *,
    question_key: str | None,
    answer_key: str | None,
    row_names: Sequence[str] | None = None,
) -> list[Example]:
    """Examples from rows; keys are detected on the first row, then required of every row."""
    if not rows:
        raise ValueError(f"{where}: no records.")
    columns = set(rows[0])
    q_key = _pick_key(where, columns, question_key, QUESTION_KEYS, "question_key")
    a_key = _pick_key(where, columns, answer_key, ANSWER_KEYS, "answer_key")
    examples, null_answers = [], []
    for number, row in enumerate(rows):
        name = row_names[number] if row_names is not None else f"record {number}"
        for key, role in ((q_key, "question_key"), (a_key, "answer_key")):
            if key not in row:
                raise _missing_key_error(f"{where} {name}", key, role, row)
        answer = row[a_key]
        if answer is None:
            null_answers.append(name)
        examples.append(
            Example(
                question=_question_text(row[q_key]),
                answer="" if answer is None else str(answer),
                entry=dict(row),
            )
        )
    if null_answers:
        logger.warning(
            "%s: %d of %d records have a null %r (first: %s); their gold is empty, so "
            "every completion of theirs scores 0.",
            where,
            len(null_answers),
            len(rows),
            a_key,
            null_answers[0],
        )
    return examples


def _read_jsonl(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a .jsonl file (blank lines skipped) and their line labels."""
    import json

    rows, names = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} line {number}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} "
                    f"at column {e.start + 1}); re-encode the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: invalid JSON ({e.msg}).") from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path} line {number}: expected a JSON object, got {type(row).__name__}."
                )
            rows.append(row)
            names.append(f"line {number}")
    return rows, names


def read_records(
    path: str | os.PathLike,
    *,
    question_key: str | None = None,
    answer_key: str | None = None,
) -> list[Example]:
    """Problems from a local `.jsonl` or `.parquet` file (chosen by extension), in file order.

    Args:
      path: the file.
      question_key: the question column, or alternatives "a|b" (the first present);
        None picks the first present of `QUESTION_KEYS` ("problem", "question", "prompt").
      answer_key: the gold-answer column; None picks the first present of
        `ANSWER_KEYS` ("gt_answer", "answer", "solution"), so a file with both
        `answer` and `solution` uses `answer`.

    Returns:
      One `Example` per row: answers pass through `str()` (None gives ""), the
      raw row is `Example.entry`. Empty questions are kept (the pipeline counts
      and drops them).

    Raises:
      FileNotFoundError: no such file.
      ValueError: unknown extension, an empty file, a missing column (naming the
        file, the key and the columns present) or a bad JSON line (file, line).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; expected one of {FILE_SUFFIXES}."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist.")
    if suffix == ".jsonl":
        rows, names = _read_jsonl(path)
        return _to_examples(
            rows, path, question_key=question_key, answer_key=answer_key, row_names=names
        )
    import pyarrow.parquet as pq  # deferred: heavy import

    table = pq.read_table(path)
    if table.num_rows == 0:
        raise ValueError(f"{path}: no records (columns: {table.column_names}).")
    # Check the schema first so a missing column names every column, not one row's.
    columns = set(table.column_names)
    _pick_key(path, columns, question_key, QUESTION_KEYS, "question_key")
    _pick_key(path, columns, answer_key, ANSWER_KEYS, "answer_key")
    return _to_examples(table.to_pylist(), path, question_key=question_key, answer_key=answer_key)


def _plain(value: Any) -> Any:
    """A TFDS feature value as plain Python: bytes → str, NumPy → Python/list."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_plain(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def tfds_examples(
    name: str,
    *,
    data_dir: str | os.PathLike,
    split: str,
    question_key: str | None = None,
    answer_key: str | None = None,
) -> list[Example]:
    """Problems from a prepared TFDS dataset stored as array_record, read without TensorFlow.

    Args:
      name: the dataset name as TFDS knows it ("my_math", "my_math/config:1.0.0").
      data_dir: the directory holding `<name>/<version>/`; nothing is downloaded.
      split: a TFDS split, slicing allowed ("train", "test[:100]").
      question_key, answer_key: as in `read_records` (same auto-detection).

    Returns:
      One `Example` per record in the stored order; text features are decoded
      from bytes to str and the decoded record is `Example.entry`.

    Raises:
      ValueError: the dataset or split is not found, or a column is missing.
      NotImplementedError: (from TFDS) the dataset was prepared as tfrecord.
    """
    import tensorflow_datasets as tfds  # deferred: slow import

    data_dir = os.fspath(data_dir)
    try:
        source = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"TFDS dataset {name!r} not found in data_dir {data_dir}; prepare it there "
            "with download_and_prepare(file_format='array_record')."
        ) from e
    except ValueError as e:  # e.g. an unknown split
        raise ValueError(f"TFDS {name!r} in {data_dir}: {e}") from e
    rows = [_plain(source[i]) for i in range(len(source))]
    return _to_examples(
        rows,
        f"TFDS {name!r} split {split!r} in {data_dir}",
        question_key=question_key,
        answer_key=answer_key,
    )


# ---------------------------------------------------------------------------
# The data config and its train / eval splits.

SOURCES = ("reasoning_gym", "jsonl", "parquet", "tfds")


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    fields.check(ok, f"data.{field}", value, expected)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the problems come from and how they split into train and eval.

    source: "reasoning_gym" (procedural task `name` with `gym_kwargs`),
      "jsonl" / "parquet" (local file `path`), or "tfds" (array_record dataset
      `name` under the data_dir `path`).
    eval_path: files only. An eval file; if empty, eval is the last `eval_size`
      rows of a seeded permutation of the train file, disjoint from train.
    train_split, eval_split: TFDS only; an empty `eval_split` holds eval out
      of the train split the same way as for files.
    train_size: exact for reasoning-gym; an upper bound (the first rows, in stored
      order) for files and TFDS.
    eval_size: the eval problems. reasoning-gym, or held out of the train file / split
      (no `eval_path`, an empty `eval_split`): exactly this many, and 0 means no eval
      split at all, every train row trained on in stored order. A separate eval file /
      TFDS `eval_split`: its first `eval_size` rows, 0 meaning every row, so giving
      `eval_path` turns eval on under a config with eval_size=0 (the paper configs).
      The trainer evaluates at most `train.eval_size` of them (0: all).
    seed: the reasoning-gym seed / the hold-out permutation seed.
    question_key, answer_key: column names for files and TFDS ("a|b": the first of those
      present); None auto-detects (see `read_records`).
    """

    source: str = fields.choice("reasoning_gym", SOURCES)
    name: str = ""
    path: str = ""
    eval_path: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    gym_kwargs: tuple[tuple[str, Any], ...] = fields.config_default(dict, default=())
    train_size: int = 10000
    eval_size: int = 500
    seed: int = 0
    question_key: str | None = None
    answer_key: str | None = None

    def __post_init__(self):
        fields.check_choices(self, "data")
        # A dict is accepted and frozen into sorted pairs, so the config stays hashable.
        kwargs = self.gym_kwargs
        if isinstance(kwargs, Mapping):
            kwargs = tuple(sorted(kwargs.items()))
            object.__setattr__(self, "gym_kwargs", kwargs)
        _check(
            isinstance(kwargs, tuple)
            and all(
                isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in kwargs
            ),
            "gym_kwargs",
            kwargs,
            "(key, value) pairs with string keys",
        )
        _check(self.train_size >= 1, "train_size", self.train_size, "≥ 1")
        _check(self.eval_size >= 0, "eval_size", self.eval_size, "≥ 0")
        _check(self.seed >= 0, "seed", self.seed, "≥ 0")
        for key in ("question_key", "answer_key"):
            value = getattr(self, key)
            _check(value is None or bool(value), key, value, "None (auto-detect) or a column name")
        files = self.source in ("jsonl", "parquet")
        if self.source == "reasoning_gym":
            _check(bool(self.name), "name", self.name, "a reasoning-gym task name")
            _check(not self.path, "path", self.path, "empty for source='reasoning_gym'")
            for key in ("question_key", "answer_key"):
                value = getattr(self, key)
                _check(value is None, key, value, "None for source='reasoning_gym'")
        else:
            _check(not kwargs, "gym_kwargs", kwargs, "empty unless source='reasoning_gym'")
        if files:
            suffix = f".{self.source}"
            _check(
                bool(self.path), "path", self.path, f"a {suffix} file for source={self.source!r}"
            )
            for key in ("path", "eval_path"):
                value = getattr(self, key)
                _check(
                    not value or value.lower().endswith(suffix),
                    key,
                    value,
                    f"a file ending in {suffix} for source={self.source!r}",
                )
        else:
            _check(not self.eval_path, "eval_path", self.eval_path, "empty unless a file source")
        if self.source == "tfds":
            _check(bool(self.name), "name", self.name, "a TFDS dataset name")
            _check(bool(self.path), "path", self.path, "the TFDS data_dir for source='tfds'")
            _check(bool(self.train_split), "train_split", self.train_split, "a TFDS split")


def _hold_out(
    examples: list[Example], eval_size: int, seed: int, where: str
) -> tuple[list[Example], list[Example]]:
    """Split off `eval_size` examples by a seeded permutation; train keeps the stored order.

    eval_size=0 returns every example, in stored order, and no eval examples.
    """
    import numpy as np

    if not eval_size:
        return list(examples), []
    if len(examples) <= eval_size:
        raise ValueError(
            f"{where} has {len(examples)} records; data.eval_size={eval_size} held out for eval "
            "would leave no training problems. Lower data.eval_size or set data.eval_path."
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    held = order[len(examples) - eval_size :]
    held_set = set(held.tolist())
    train = [e for i, e in enumerate(examples) if i not in held_set]
    return train, [examples[i] for i in held]


def check_source(config: DataConfig) -> None:
    """What `load_splits` needs, checked without reading it: the reasoning-gym task is
    registered, the data files or TFDS directory exist.

    Raises:
      ValueError / FileNotFoundError naming the `data.` field.
    """
    if config.source == "reasoning_gym":
        _check_gym_task(config.name, "config field data.name: ")
        return
    if config.source == "tfds":
        if not os.path.isdir(config.path):
            raise FileNotFoundError(
                f"config field data.path={config.path!r}: no such TFDS data directory."
            )
        return
    for key in ("path", "eval_path"):
        value = getattr(config, key)
        if value and not os.path.isfile(value):
            raise FileNotFoundError(f"config field data.{key}={value!r}: no such file.")


def load_splits(config: DataConfig) -> tuple[list[Example], list[Example]]:
    """The (train, eval) problems that `config` describes.

    reasoning-gym: `gym_splits` (exact sizes, disjoint by question). Files and
    TFDS: the train file / split and the eval file / split, each capped at
    its size (`eval_size=0`: the whole eval file / split); with no eval file (or an
    empty TFDS `eval_split`), `eval_size` records are held out of the train records
    by a permutation seeded with `config.seed` (disjoint by record; 0: none, every
    record trains). A warning is logged when a separate eval source shares questions
    with train.
    """
    if config.source == "reasoning_gym":
        train, evaluation = gym_splits(
            config.name,
            train_size=config.train_size,
            eval_size=max(config.eval_size, 1),
            seed=config.seed,
            **dict(config.gym_kwargs),
        )
        return train, evaluation[: config.eval_size]

    keys = dict(question_key=config.question_key, answer_key=config.answer_key)
    if config.source == "tfds":
        where = f"TFDS {config.name!r} split {config.train_split!r}"
        records = tfds_examples(config.name, data_dir=config.path, split=config.train_split, **keys)
        held_out = not config.eval_split
        load_eval = lambda: tfds_examples(
            config.name, data_dir=config.path, split=config.eval_split, **keys
        )
    else:
        where = config.path
        records = read_records(config.path, **keys)
        held_out = not config.eval_path
        load_eval = lambda: read_records(config.eval_path, **keys)

    if held_out:
        train, evaluation = _hold_out(records, config.eval_size, config.seed, where)
        return train[: config.train_size], evaluation
    train = records[: config.train_size]
    evaluation = load_eval()[: config.eval_size or None]  # 0: every row of the eval source
    shared = {e.question for e in train} & {e.question for e in evaluation}
    if shared:
        logger.warning(
            "data: %d eval question(s) also appear in the train split (%s).", len(shared), where
        )
    return train, evaluation

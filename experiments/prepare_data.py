"""Convert the paper's released data files into the files the paper configs and --paper read.

    python -m experiments.prepare_data open-rs --input=/dl/open-rs --out=/data
    python -m experiments.prepare_data simplerl \\
        --input=/dl/SimpleRL-Zoo-Data/simplelr_qwen_level3to5 --out=/data \\
        --tokenizer=/ckpt/Qwen2.5-Math-7B --max_prompt_length=1024
    python -m experiments.prepare_data benchmarks --input=/dl/benchmarks --out=/data/bench
    python -m experiments.prepare_data benchmarks --input=/dl/test.jsonl --name=math500 \\
        --out=/data/bench

Inputs are the files as downloaded: parquet, jsonl, or Hugging Face `datasets` arrow files
(`save_to_disk` / cache shards); a directory stands for its data files (its `train` split
when it has several, shards concatenated). Every command prints what it read, kept and
dropped (and why) per output file, then the flag that points a config or
`experiments.evaluate` at it. Outputs are written to a temporary file and renamed.

- `open-rs` (knoveleng/open-rs) → `OUT/open_rs.jsonl` for configs/r1_distill_1p5b_openrs.py,
  which reads question `problem` and gold `solution`. Nothing is filtered by length: that
  config keeps the last 512 tokens of a longer prompt, as TRL does.
- `simplerl` (hkust-nlp/SimpleRL-Zoo-Data `simplelr_qwen_level3to5` / `simplelr_abel_level3to5`)
  → `OUT/<that name>.parquet` for the SimpleRL configs (question `instruction|prompt`, gold
  `target`), as the authors' `open-r1/utils/data_utils.py` prepares it: the released `prompt`
  column is renamed `instruction`, and with `--tokenizer` the rows whose prompt is longer than
  `--max_prompt_length` tokens are dropped, counted as the authors count them: the trainer's
  tokens (`pipeline.encode_examples`) plus the tokenizer's special tokens (Llama's BOS), which
  their filter counts and training does not add. Without a tokenizer nothing is dropped for
  length: the trainer drops the rows over the limit by its own count
  (`prompt.overlong="drop"`). A file without `target` gets one from `gt_answer` (or
  `reward_model.ground_truth`, or the authors' renamed `solution`).
- `benchmarks` → `OUT/{aime24,amc23,math500,minerva,olympiadbench}.jsonl`, each file matched to
  its benchmark by its path (`aime_2024`, `AMC-23`, `MATH-500`, `Minerva-Math`,
  `OlympiadBench`, …) or by `--name`; the question and gold columns that
  `evaluation.PAPER_BENCHMARKS` pins must be present (refused otherwise, naming the columns
  found). No row is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from aapo_jax.data import sources

DATA_SUFFIXES = (".parquet", ".jsonl", ".arrow")
# configs/r1_distill_1p5b_openrs.py's data.question_key / data.answer_key.
OPEN_RS_KEYS = ("problem", "solution")
# configs/base.py `_simplerl`: data.question_key / data.answer_key, sampling.max_prompt_length
# of both SimpleRL configs, and the prompt settings (the cell's string as is).
SIMPLERL_KEYS = ("instruction|prompt", "target")
SIMPLERL_MAX_PROMPT_LENGTH = 1024
SIMPLERL_PROMPT = dict(template="{question}", system_prompt=None, use_chat_template=False)
# Where a SimpleRL file's gold may be, first found wins: the released `target` (what the
# authors' reward reads, renamed `solution`), `gt_answer` (the same answer), verl's nested
# `reward_model.ground_truth`, the authors' renamed `solution`.
SIMPLERL_GOLDS = ("target", "gt_answer", "reward_model.ground_truth", "solution")
# Per `evaluation.PAPER_BENCHMARKS` name: substrings of a file's path (lower case, letters and
# digits only) that name it, and the repository the authors' lighteval task reads (its rows
# as released: `evaluation.PAPER_BENCHMARK_ROWS`).
BENCHMARKS = {
    "aime24": (("aime24", "aime2024"), "HuggingFaceH4/aime_2024"),
    "amc23": (("amc23", "amc2023"), "knoveleng/AMC-23"),
    "math500": (("math500",), "HuggingFaceH4/MATH-500"),
    "minerva": (("minerva",), "knoveleng/Minerva-Math"),
    "olympiadbench": (("olympiadbench",), "knoveleng/OlympiadBench"),
}
_SHARD = re.compile(r"-\d{5}-of-\d{5}")


@dataclasses.dataclass
class Counts:
    """What one conversion read, kept and dropped (reason → rows), and where it wrote.

    `usage` is the flag (or command) that points a config or `experiments.evaluate` at `out`.
    """

    out: str
    inputs: tuple[str, ...]
    read: int
    kept: int
    dropped: dict[str, int]
    notes: list[str]
    usage: str


# ---------------------------------------------------------------------------
# Reading.


def _read_arrow(path: str):
    """A pyarrow Table from a .parquet file or an Arrow IPC file / stream (`datasets`' .arrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        try:
            return pq.read_table(path)
        except pa.ArrowException as e:
            raise ValueError(f"{path}: not a readable parquet file ({e}).") from None
    for open_ipc in (pa.ipc.open_file, pa.ipc.open_stream):  # datasets writes streams
        try:
            with pa.memory_map(path) as source:
                return open_ipc(source).read_all()
        except pa.ArrowInvalid:
            continue
    raise ValueError(f"{path}: neither an Arrow IPC file nor an Arrow IPC stream.")


def _table(path: str):
    """`_read_arrow`, or for .jsonl a table of its rows (a column per key found in any row)."""
    import pyarrow as pa

    if not path.lower().endswith(".jsonl"):
        return _read_arrow(path)
    rows = read_table(path)
    columns = {}
    for key in _columns(rows):
        try:
            columns[key] = pa.array([row.get(key) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"{path}: column {key!r} mixes value types ({e}).") from None
    return pa.table(columns)


def _check_file(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory.")
    if not path.lower().endswith(DATA_SUFFIXES) or not os.path.isfile(path):
        raise ValueError(f"{path}: not a {'/'.join(DATA_SUFFIXES)} file.")
    return path


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a .parquet, .jsonl or .arrow (Arrow IPC file or stream) file, in order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: another extension, an unreadable file, a bad JSON line (file, line).
    """
    path = _check_file(path)
    if path.lower().endswith(".jsonl"):
        rows, _ = sources._read_jsonl(path)
        return rows
    return _read_arrow(path).to_pylist()


def _data_files(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f)
            for f in sorted(files)
            if f.lower().endswith(DATA_SUFFIXES) and not f.startswith(".")
        ]
    return found


def _one_split(files: Sequence[str], what: str) -> list[str]:
    """`files` if they are one file or the shards of one split, else an error listing them."""
    stems = {_SHARD.split(os.path.basename(f))[0] for f in files}
    if len(files) == 1 or (len(stems) == 1 and all(_SHARD.search(f) for f in files)):
        return sorted(files)
    raise ValueError(f"{what}: several data files {sorted(files)}; pass the one to convert.")


def resolve_inputs(path: str | os.PathLike) -> list[str]:
    """The data files `path` stands for: itself, or a directory's one file / one split's shards
    (its `train` split when there are several, as the authors' loader reads `train.parquet`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [_check_file(path)]
    files = _data_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files in the directory.")
    # `train.parquet`, `data/train-00000-of-00001.parquet`, `train/data-00000-of-00001.arrow`.
    train = [f for f in files if re.search(r"(^|/)train\b", os.path.relpath(f, path).lower())]
    return _one_split(train or files, path)


def _rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    rows = [row for path in paths for row in read_table(path)]
    if not rows:
        raise ValueError(f"{_where(paths)}: no records.")
    return rows


def _where(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} shards)"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _require(where: str, columns: Sequence[str], key: str, role: str, why: str) -> str:
    """The column `key` names ("a|b": the first present), else an error naming those found."""
    try:
        return sources._pick_key(where, columns, key, (), role)
    except ValueError:
        wanted = " or ".join(repr(k) for k in key.split("|"))
        raise ValueError(
            f"{where}: no column {wanted} ({role}: {why}); columns found: {sorted(columns)}."
        ) from None


def _is_empty(value: Any) -> bool:
    return value is None or not str(value).strip()


# ---------------------------------------------------------------------------
# Writing.


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a hidden temporary file beside `path`, then rename it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _json_value(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=_json_value) + "\n")

    _write_atomic(path, write)


def _out_file(out: str | os.PathLike, name: str, suffix: str) -> str:
    """`out` itself if it names a `suffix` file, else `out/name{suffix}`."""
    out = os.fspath(out)
    if out.lower().endswith(suffix):
        return os.path.abspath(out)
    if out.lower().endswith(DATA_SUFFIXES):
        raise ValueError(f"--out={out}: expected a directory or a {suffix} file.")
    return os.path.abspath(os.path.join(out, name + suffix))


# ---------------------------------------------------------------------------
# The three sources.


def prepare_open_rs(input: str | os.PathLike, out: str | os.PathLike) -> Counts:
    """open-rs (knoveleng/open-rs) → jsonl for configs/r1_distill_1p5b_openrs.py.

    Every column is kept; rows with an empty `problem` are dropped (the trainer would drop
    them too). Nothing is dropped for length: the config keeps a long prompt's last tokens.

    Args:
      input: the downloaded file, or a directory of its data files.
      out: a directory (written to `out/open_rs.jsonl`) or a .jsonl path.

    Raises:
      ValueError: `problem` or `solution` is missing (the columns found are named).
    """
    paths = resolve_inputs(input)
    rows, where = _rows(paths), _where(paths)
    columns = _columns(rows)
    why = "configs/r1_distill_1p5b_openrs.py reads it"
    q_key = _require(where, columns, OPEN_RS_KEYS[0], "question", why)
    a_key = _require(where, columns, OPEN_RS_KEYS[1], "gold", why)
    kept = [
        {**row, a_key: row.get(a_key)}
        for row in rows
        if sources._question_text(row.get(q_key)).strip()
    ]
    if not kept:
        raise ValueError(f"{where}: every row has an empty {q_key!r}.")
    path = _out_file(out, "open_rs", ".jsonl")
    _write_jsonl(path, kept)
    notes = ["no length filter: the config keeps a longer prompt's last 512 tokens (as TRL)"]
    empty_gold = sum(_is_empty(row[a_key]) for row in kept)
    if empty_gold:
        notes.append(f"{empty_gold} kept rows have an empty {a_key!r} (they score 0)")
    return Counts(
        out=path,
        inputs=tuple(paths),
        read=len(rows),
        kept=len(kept),
        dropped={"empty question": len(rows) - len(kept)},
        notes=notes,
        usage=(
            "python -m experiments.train --config=configs/r1_distill_1p5b_openrs.py "
            f"--config.data.path={path}"
        ),
    )


def _simplerl_golds(table, where: str) -> tuple[str, list[Any]]:
    """The gold column (`SIMPLERL_GOLDS`, the first found) and its values."""
    columns = table.column_names
    for name in SIMPLERL_GOLDS:
        column, _, field = name.partition(".")
        if column not in columns:
            continue
        values = table.column(column).to_pylist()
        if not field:
            return name, values
        if all(v is None or (isinstance(v, dict) and field in v) for v in values):
            golds = [None if v is None else v[field] for v in values]
            # verl allows a list of accepted answers; SimpleRL's hold one.
            return name, [g[0] if isinstance(g, list) and len(g) == 1 else g for g in golds]
    raise ValueError(
        f"{where}: no gold column (the configs read `target`; looked for "
        f"{list(SIMPLERL_GOLDS)}); columns found: {sorted(columns)}."
    )


def _simplerl_name(paths: Sequence[str]) -> str:
    found = re.findall(r"simplelr_[A-Za-z0-9_]+", " ".join(paths))
    return found[-1] if found else "simplerl"


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, str | os.PathLike):
        from aapo_jax.data.tokenize import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def prepare_simplerl(
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_prompt_length: int = SIMPLERL_MAX_PROMPT_LENGTH,
    name: str | None = None,
) -> Counts:
    """A SimpleRL-Zoo level 3-5 file → parquet for the SimpleRL configs, as the authors' loader.

    The released `prompt` column (a one-turn chat whose content is the ready prompt) is
    renamed `instruction`; `target` is kept, or made from the first gold of `SIMPLERL_GOLDS`;
    other columns are kept. Rows whose prompt string is empty are dropped. With a tokenizer,
    rows whose prompt is longer than `max_prompt_length` tokens are dropped as the authors'
    data_utils measures them: the trainer's tokens (`pipeline.encode_examples` with the
    configs' prompt settings: the string as is, no chat template) plus the tokenizer's
    special tokens (Llama's BOS), so the trainer drops none of the rest.

    Args:
      input: the downloaded file, or its directory (its `train.parquet` when it has several).
      out: a directory (written to `out/<name>.parquet`) or a .parquet path.
      tokenizer: a local Hugging Face tokenizer directory or a loaded tokenizer; None: no
        length filter.
      max_prompt_length: the longest prompt kept, in tokens (the configs' 1024).
      name: the output file's stem; default the `simplelr_*` folder in the input's path.

    Raises:
      ValueError: no `instruction` / `prompt` or no gold column (the columns found are named),
        or no usable row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = resolve_inputs(input)
    where = _where(paths)
    tables = [_table(p) for p in paths]
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    if table.num_rows == 0:
        raise ValueError(f"{where}: no records (columns: {table.column_names}).")
    why = "the SimpleRL configs read its content as the prompt"
    q_key = _require(where, table.column_names, SIMPLERL_KEYS[0], "question", why)
    gold_key, golds = _simplerl_golds(table, where)
    examples = [
        sources.Example(question=sources._question_text(cell), answer="" if g is None else str(g))
        for cell, g in zip(table.column(q_key).to_pylist(), golds, strict=True)
    ]
    dropped = {"empty question": sum(not e.question.strip() for e in examples)}
    notes = []
    if tokenizer is None:
        keep = [i for i, e in enumerate(examples) if e.question.strip()]
        notes.append(
            "over-long prompts not filtered (no --tokenizer): the trainer drops those over "
            f"sampling.max_prompt_length={max_prompt_length} tokens itself and logs the count"
        )
    else:
        from aapo_jax.data import pipeline

        tok = _load_tokenizer(tokenizer)
        try:
            encoded, stats = pipeline.encode_examples(
                examples,
                tok,
                **SIMPLERL_PROMPT,
                max_prompt_length=max_prompt_length,
                overlong="drop",
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        # The authors' get_length calls tokenizer(text) with its special tokens (Llama's BOS),
        # which the trainer (TRL's, and ours) does not add: their filter is the stricter one.
        special = len(tok("", add_special_tokens=True)["input_ids"])
        kept_ids = {id(p.example) for p in encoded if len(p.ids) + special <= max_prompt_length}
        keep = [i for i, e in enumerate(examples) if id(e) in kept_ids]
        dropped[f"longer than {max_prompt_length} tokens"] = stats.dropped_too_long
        if special:
            dropped[f"{max_prompt_length} tokens only with the {special} special token(s)"] = len(
                encoded
            ) - len(kept_ids)
        if isinstance(tokenizer, str | os.PathLike):
            notes.append(f"tokens counted with {os.fspath(tokenizer)}")
        if special:
            notes.append(
                f"lengths counted as the authors' data_utils counts them, with the tokenizer's "
                f"{special} special token(s), which training does not add"
            )
    if not keep:
        raise ValueError(f"{where}: every row has an empty {q_key!r} prompt.")
    table = table.take(pa.array(keep, type=pa.int64()))
    if q_key == "prompt":
        table = table.rename_columns(
            ["instruction" if c == "prompt" else c for c in table.column_names]
        )
        notes.append("`prompt` renamed `instruction` (the authors' data_utils rename)")
    if gold_key == "target":
        notes.append("gold `target` as released")
    else:
        values = pa.array([None if golds[i] is None else str(golds[i]) for i in keep], pa.string())
        table = table.append_column("target", values)
        notes.append(f"gold `{gold_key}` copied to `target` (the column the configs read)")
    empty_gold = sum(not examples[i].answer.strip() for i in keep)
    if empty_gold:
        notes.append(f"{empty_gold} kept rows have an empty gold (kept, as the authors do)")
    path = _out_file(out, name or _simplerl_name(paths), ".parquet")
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    config = "configs/llama32_simplerl.py:size=3b" if "abel" in path else None
    config = config or "configs/qwen25_math_7b_simplerl.py"
    return Counts(
        out=path,
        inputs=tuple(paths),
        read=len(examples),
        kept=len(keep),
        dropped=dropped,
        notes=notes,
        usage=f"python -m experiments.train --config={config} --config.data.path={path}",
    )


def prepare_benchmark(
    input: str | os.PathLike | Sequence[str], out_dir: str | os.PathLike, name: str
) -> Counts:
    """One benchmark's file(s) → `out_dir/<name>.jsonl` with the columns `--paper=name` reads.

    Every row and column is kept; the question and gold columns of
    `evaluation.PAPER_BENCHMARKS[name]` must be present.

    Args:
      input: the downloaded file, its directory, or the shards of one split.
      out_dir: the output directory.
      name: a `PAPER_BENCHMARKS` name (aime24, amc23, math500, minerva, olympiadbench).

    Raises:
      ValueError: an unknown name, or a pinned column missing (the columns found are named).
    """
    from aapo_jax.evaluation import PAPER_BENCHMARK_ROWS, PAPER_BENCHMARKS  # deferred: jax

    if name not in PAPER_BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {sorted(PAPER_BENCHMARKS)}")
    if isinstance(input, str | os.PathLike):
        paths = resolve_inputs(input)
    else:
        paths = _one_split([_check_file(p) for p in input], name)
    rows, where = _rows(paths), _where(paths)
    columns = _columns(rows)
    question_key, gold_key, _ = PAPER_BENCHMARKS[name]
    _, repo = BENCHMARKS[name]
    released = PAPER_BENCHMARK_ROWS[name]
    why = f"the authors' {name} task reads it from {repo}"
    _require(where, columns, question_key, "question", why)
    _require(where, columns, gold_key, "gold", why)
    rows = [
        {**row, question_key: row.get(question_key), gold_key: row.get(gold_key)} for row in rows
    ]
    path = os.path.abspath(os.path.join(os.fspath(out_dir), f"{name}.jsonl"))
    _write_jsonl(path, rows)
    notes = []
    if len(rows) != released:
        notes.append(f"{len(rows)} rows read; {repo} as released has {released}")
    for key, what in ((question_key, "question"), (gold_key, "gold")):
        empty = sum(_is_empty(row[key]) for row in rows)
        if empty:
            notes.append(f"{empty} rows have an empty {what} {key!r} (kept)")
    return Counts(
        out=path,
        inputs=tuple(paths),
        read=len(rows),
        kept=len(rows),
        dropped={},
        notes=notes,
        usage=f"python -m experiments.evaluate --model=MODEL --task={path} --paper={name}",
    )


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def match_benchmarks(
    inputs: Sequence[str | os.PathLike],
) -> tuple[dict[str, list[str]], list[str]]:
    """Each benchmark's files among `inputs` (files or directories), matched by path.

    A file matches a benchmark when its path (below the input directory's parent, or as
    given for a file) contains one of the benchmark's names (`BENCHMARKS`), ignoring case
    and punctuation. Returns {benchmark: files} and the data files that matched none.

    Raises:
      ValueError: a file matches two benchmarks, or a benchmark gets several files that
        are not the shards of one split.
    """
    found: dict[str, list[str]] = {}
    unmatched = []
    for given in map(os.fspath, inputs):
        if os.path.isdir(given):
            base = os.path.dirname(os.path.abspath(given))
            files = [(f, os.path.relpath(f, base)) for f in _data_files(given)]
        else:
            files = [(_check_file(given), given)]
        for path, label in files:
            text = _normalised(label)
            names = [b for b, (aliases, _) in BENCHMARKS.items() if any(a in text for a in aliases)]
            if len(names) > 1:
                raise ValueError(f"{path} matches several benchmarks {names}; pass it with --name.")
            if names:
                found.setdefault(names[0], []).append(path)
            else:
                unmatched.append(path)
    return {b: _one_split(files, f"benchmark {b}") for b, files in found.items()}, unmatched


def prepare_benchmarks(
    inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, name: str | None = None
) -> tuple[list[Counts], list[str]]:
    """`prepare_benchmark` for every benchmark among `inputs`, matched by path (or, with
    `name`, all of `inputs` as that one benchmark). Returns the counts and the data files
    that matched no benchmark."""
    if name is not None:
        paths = [p for given in inputs for p in resolve_inputs(given)]
        return [prepare_benchmark(paths, out_dir, name)], []
    matched, unmatched = match_benchmarks(inputs)
    if not matched:
        raise ValueError(
            f"no benchmark recognised among {[os.fspath(i) for i in inputs]} (data files: "
            f"{unmatched}); name one with --name={'|'.join(BENCHMARKS)}."
        )
    counts = [prepare_benchmark(matched[b], out_dir, b) for b in BENCHMARKS if b in matched]
    return counts, unmatched


# ---------------------------------------------------------------------------
# Command line.


def format_summary(counts: Sequence[Counts], skipped: Sequence[str] = ()) -> str:
    """The counts as a table (file, rows read, kept, dropped by reason), then each file's
    notes and the line that uses it."""
    header = ("file", "read", "kept", "dropped")
    table = [
        (
            c.out,
            str(c.read),
            str(c.kept),
            ", ".join(f"{n} {why}" for why, n in c.dropped.items()) or "0",
        )
        for c in counts
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(3)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"
        for row in [header, *table]
    ]
    for c in counts:
        lines.append(f"\n{c.out}  (from {_where(c.inputs)})")
        lines += [f"  note: {note}" for note in c.notes]
        lines.append(f"  use:  {c.usage}")
    if skipped:
        lines.append(f"\nskipped (no benchmark in the name): {', '.join(skipped)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    open_rs = commands.add_parser("open-rs", help="knoveleng/open-rs → jsonl")
    simplerl = commands.add_parser("simplerl", help="SimpleRL-Zoo level 3-5 → parquet")
    benchmarks = commands.add_parser("benchmarks", help="the five benchmarks → jsonl")
    for command in (open_rs, simplerl):
        command.add_argument("--input", required=True, help="the file, or its directory")
        command.add_argument("--out", required=True, help="output directory (or file)")
    benchmarks.add_argument(
        "--input", required=True, nargs="+", action="extend", help="files and/or directories"
    )
    benchmarks.add_argument("--out", required=True, help="output directory")
    benchmarks.add_argument("--name", choices=tuple(BENCHMARKS), help="the inputs' benchmark")
    simplerl.add_argument("--name", default=None, help="output stem (default: simplelr_* dir)")
    simplerl.add_argument("--tokenizer", default=None, help="local HF tokenizer directory")
    simplerl.add_argument(
        "--max_prompt_length",
        type=int,
        default=SIMPLERL_MAX_PROMPT_LENGTH,
        help="with --tokenizer: drop prompts longer than this many tokens",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    skipped: list[str] = []
    try:
        if args.command == "open-rs":
            counts = [prepare_open_rs(args.input, args.out)]
        elif args.command == "simplerl":
            counts = [
                prepare_simplerl(
                    args.input,
                    args.out,
                    tokenizer=args.tokenizer,
                    max_prompt_length=args.max_prompt_length,
                    name=args.name,
                )
            ]
        else:
            counts, skipped = prepare_benchmarks(args.input, args.out, args.name)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"prepare_data: {e}") from None
    print(format_summary(counts, skipped))
    if args.command == "benchmarks":
        where = sorted({os.path.dirname(c.out) for c in counts})
        print(
            f"\nall of them, every checkpoint and seed: python -m experiments.paper_eval "
            f"--model=MODEL --benchmarks={where[0] if len(where) == 1 else 'DIR'} --out=RESULTS"
        )


if __name__ == "__main__":
    main()

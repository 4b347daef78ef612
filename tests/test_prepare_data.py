"""experiments/prepare_data.py: released files (parquet, jsonl, arrow) → what the configs read."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aapo_jax import data
from aapo_jax.data import pipeline, sources
from experiments import prepare_data
from tests import hf_fixtures

QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
ABEL_PROMPT = "Question:\n{q}\nAnswer:\nLet's think step by step.\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return data.load_tokenizer(hf_fixtures.make_tokenizer(tmp_path_factory.mktemp("tok")))


def write(path, rows, fmt=None):
    """`rows` as a .jsonl, .parquet, or .arrow file (`fmt`: "stream", as `datasets` writes
    them, or "file", an Arrow IPC file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        table = pa.Table.from_pylist(rows)
        new = pa.ipc.new_file if fmt == "file" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def simplerl_rows(questions, template=QWEN_PROMPT, name="simplelr_qwen_level3to5"):
    """Rows with the released columns: those the authors' rename map names
    (JianxXiong/AAPO open-r1/utils/data_utils.py) and `level`; `reward_model` and
    `extra_info` as verl writes them."""
    return [
        {
            "gt_answer": str(i),
            "subject": "Algebra",
            "level": 3 + i % 3,
            "question": q,
            "target": str(i),
            "data_source": name,
            "prompt": [{"content": template.format(q=q) if q else "", "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": str(i), "style": "rule"},
            "extra_info": {"index": i, "question": q, "answer": str(i), "split": "train"},
        }
        for i, q in enumerate(questions)
    ]


def open_rs_rows(n):
    return [
        {
            "problem": f"What is {i} + 7?",
            "solution": f"Add: $\\boxed{{{i + 7}}}$.",
            "answer": str(i + 7),
            "level": "Level 3",
        }
        for i in range(n)
    ]


def paper_data_config(module, path):
    """The `DataConfig` a paper config builds for `path` (eval_size 0: every row trains)."""
    import importlib

    c = importlib.import_module(f"configs.{module}").get_config().data
    return sources.DataConfig(
        source=c.source,
        path=str(path),
        question_key=c.question_key,
        answer_key=c.answer_key,
        eval_size=0,
    )


def test_read_table_reads_every_format_alike(tmp_path):
    rows = open_rs_rows(3)
    paths = [
        write(tmp_path / "a.jsonl", rows),
        write(tmp_path / "a.parquet", rows),
        write(tmp_path / "stream.arrow", rows, "stream"),
        write(tmp_path / "file.arrow", rows, "file"),
    ]
    for path in paths:
        assert prepare_data.read_table(path) == rows, path
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(ValueError, match=r"bad\.arrow"):
        prepare_data.read_table(tmp_path / "bad.arrow")


def test_constants_match_the_paper_configs():
    import importlib

    from aapo_jax.evaluation import PAPER_BENCHMARKS

    open_rs = importlib.import_module("configs.r1_distill_1p5b_openrs").get_config()
    assert (open_rs.data.question_key, open_rs.data.answer_key) == prepare_data.OPEN_RS_KEYS
    for module in ("qwen25_math_7b_simplerl", "llama32_simplerl"):
        c = importlib.import_module(f"configs.{module}").get_config()
        assert (c.data.question_key, c.data.answer_key) == prepare_data.SIMPLERL_KEYS
        assert c.sampling.max_prompt_length == prepare_data.SIMPLERL_MAX_PROMPT_LENGTH
        assert c.prompt.overlong == "drop"
        prompt = prepare_data.SIMPLERL_PROMPT
        assert c.prompt.template == prompt["template"]
        assert (c.prompt.system_prompt or None) == prompt["system_prompt"]
        assert c.prompt.use_chat_template == prompt["use_chat_template"]
    assert set(prepare_data.BENCHMARKS) == set(PAPER_BENCHMARKS)


def test_open_rs_parquet_becomes_the_jsonl_the_config_reads(tmp_path):
    rows = open_rs_rows(4)
    rows[1]["problem"] = "  "
    src = write(tmp_path / "open-rs" / "data" / "train-00000-of-00001.parquet", rows)
    counts = prepare_data.prepare_open_rs(tmp_path / "open-rs", tmp_path / "out")

    assert counts.out == str(tmp_path / "out" / "open_rs.jsonl")
    assert counts.inputs == (str(src),)
    assert (counts.read, counts.kept, counts.dropped) == (4, 3, {"empty question": 1})
    assert "--config.data.path=" + counts.out in counts.usage
    assert prepare_data.read_table(counts.out) == [rows[0], rows[2], rows[3]]  # all columns
    train, _ = sources.load_splits(paper_data_config("r1_distill_1p5b_openrs", counts.out))
    assert [(e.question, e.answer) for e in train] == [
        (r["problem"], r["solution"]) for r in (rows[0], rows[2], rows[3])
    ]
    assert os.listdir(tmp_path / "out") == ["open_rs.jsonl"]  # no temporary file left


def test_simplerl_arrow_prompt_is_renamed_instruction_without_a_length_filter(tmp_path):
    rows = simplerl_rows(["What is 1 + 1?", "", "Solve x + 2 = 5."])
    src = write(tmp_path / "simplelr_qwen_level3to5" / "train.arrow", rows, "stream")
    write(tmp_path / "simplelr_qwen_level3to5" / "test.arrow", rows[:1], "stream")
    counts = prepare_data.prepare_simplerl(tmp_path / "simplelr_qwen_level3to5", tmp_path)

    assert counts.out == str(tmp_path / "simplelr_qwen_level3to5.parquet")
    assert counts.inputs == (str(src),)  # the directory's train split, as the authors read it
    assert (counts.read, counts.kept, counts.dropped) == (3, 2, {"empty question": 1})
    assert any("not filtered" in note for note in counts.notes)
    table = pq.read_table(counts.out)
    assert "instruction" in table.column_names and "prompt" not in table.column_names
    assert table.column("target").to_pylist() == ["0", "2"]
    assert table.column("reward_model").to_pylist() == [
        rows[0]["reward_model"],
        rows[2]["reward_model"],
    ]
    train, _ = sources.load_splits(paper_data_config("qwen25_math_7b_simplerl", counts.out))
    assert [(e.question, e.answer) for e in train] == [
        (rows[i]["prompt"][0]["content"], rows[i]["target"]) for i in (0, 2)
    ]


@pytest.mark.parametrize(
    "gold_key", ["gt_answer", "reward_model.ground_truth"], ids=["gt_answer", "nested"]
)
def test_simplerl_parquet_with_instruction_gets_target_from_its_gold(tmp_path, gold_key):
    rows = simplerl_rows(["Find 2 + 2.", "Find 3 * 3."], ABEL_PROMPT, "simplelr_abel_level3to5")
    for row in rows:
        row["instruction"] = row.pop("prompt")
        row["gt_answer"] = f"ans{row.pop('target')}"
        row["reward_model"]["ground_truth"] = row["gt_answer"]
        if gold_key != "gt_answer":
            del row["gt_answer"]
    src = write(tmp_path / "dl" / "abel.parquet", rows)
    counts = prepare_data.prepare_simplerl(src, tmp_path / "abel_l3to5.parquet")

    assert counts.out == str(tmp_path / "abel_l3to5.parquet")
    assert "configs/llama32_simplerl.py" in counts.usage
    assert any(f"`{gold_key}` copied to `target`" in note for note in counts.notes)
    train, _ = sources.load_splits(paper_data_config("llama32_simplerl", counts.out))
    assert [e.answer for e in train] == ["ans0", "ans1"]
    assert [e.question for e in train] == [r["instruction"][0]["content"] for r in rows]


def test_simplerl_drops_overlong_prompts_as_the_trainer_counts_them(tmp_path, tokenizer):
    short, long = "What is 12 + 7?", "What is 12 + 7? " + "Add the numbers. " * 8
    rows = simplerl_rows([short, long, "", short])
    limit = len(tokenizer(QWEN_PROMPT.format(q=short), add_special_tokens=False)["input_ids"])
    src = write(tmp_path / "in.jsonl", rows)
    counts = prepare_data.prepare_simplerl(
        src, tmp_path / "out", tokenizer=tokenizer, max_prompt_length=limit, name="l3to5"
    )

    dropped = {"empty question": 1, f"longer than {limit} tokens": 1}
    assert (counts.read, counts.kept, counts.dropped) == (4, 2, dropped)
    # The trainer, reading the input with the configs' keys, drops the same rows ...
    question_key, answer_key = prepare_data.SIMPLERL_KEYS
    examples = sources.read_records(src, question_key=question_key, answer_key=answer_key)
    settings = dict(prepare_data.SIMPLERL_PROMPT, max_prompt_length=limit, overlong="drop")
    _, stats = pipeline.encode_examples(examples, tokenizer, **settings)
    assert (stats.dropped_too_long, stats.dropped_empty, stats.kept) == (1, 1, 2)
    # ... and none of the output.
    config = paper_data_config("qwen25_math_7b_simplerl", counts.out)
    train, _ = sources.load_splits(config)
    encoded, stats = pipeline.encode_examples(train, tokenizer, **settings)
    assert (stats.kept, stats.dropped_too_long, stats.dropped_empty) == (2, 0, 0)
    assert [p.example.question for p in encoded] == [QWEN_PROMPT.format(q=short)] * 2


def benchmark_rows():
    """The five benchmarks' released columns (the pinned ones and some others)."""
    return {
        "aime24": [{"id": 60, "problem": "P1", "solution": "S", "answer": "204", "url": "u"}],
        "amc23": [{"id": 0, "problem": "P2", "answer": 27.0, "url": "u"}],
        "math500": [
            {
                "problem": "P3",
                "solution": "$\\boxed{1}$",
                "answer": "1",
                "subject": "Algebra",
                "level": 2,
                "unique_id": "test/algebra/1.json",
            }
        ],
        "minerva": [{"problem": "P4", "solution": "7.5", "type": "Physics"}],
        "olympiadbench": [
            {"id": 1606, "question": "P5", "answer": "$\\frac{1}{2}$", "final_answer": ["1/2"]}
        ],
    }


def test_benchmarks_are_matched_by_name_and_read_with_the_pinned_columns(tmp_path):
    from aapo_jax.evaluation import PAPER_BENCHMARKS

    rows = benchmark_rows()
    dl = tmp_path / "dl"
    write(dl / "aime_2024" / "data" / "train-00000-of-00001.parquet", rows["aime24"])
    write(dl / "AMC-23" / "train.jsonl", rows["amc23"])
    write(dl / "MATH-500" / "test.jsonl", rows["math500"])
    write(dl / "knoveleng___minerva-math-train.arrow", rows["minerva"], "stream")
    write(dl / "OlympiadBench.arrow", rows["olympiadbench"], "file")
    write(dl / "notes.parquet", rows["aime24"])
    counts, skipped = prepare_data.prepare_benchmarks([dl], tmp_path / "bench")

    assert [os.path.basename(c.out) for c in counts] == [f"{b}.jsonl" for b in PAPER_BENCHMARKS]
    assert skipped == [str(dl / "notes.parquet")]
    for c in counts:
        name = os.path.basename(c.out).removesuffix(".jsonl")
        question_key, gold_key, _ = PAPER_BENCHMARKS[name]
        assert (c.read, c.kept, c.dropped) == (1, 1, {})
        assert f"--paper={name}" in c.usage
        assert any("as released has" in note for note in c.notes)  # 1 row, not 30 / 40 / ...
        (example,) = sources.read_records(c.out, question_key=question_key, answer_key=gold_key)
        assert example.question == rows[name][0][question_key]
        assert example.answer == str(rows[name][0][gold_key])
        assert prepare_data.read_table(c.out) == rows[name]  # every column kept
    summary = prepare_data.format_summary(counts, skipped)
    assert "skipped" in summary and "notes.parquet" in summary


def test_benchmark_name_flag_and_refusal_naming_the_columns(tmp_path, capsys):
    rows = benchmark_rows()
    src = write(tmp_path / "data.jsonl", rows["minerva"])
    prepare_data.main(["benchmarks", f"--input={src}", "--name=minerva", f"--out={tmp_path}"])
    out = capsys.readouterr().out
    assert str(tmp_path / "minerva.jsonl") in out and "--paper=minerva" in out

    # math-ai/aime24's layout: no `answer` column, which the authors' aime24 task reads.
    bad = write(tmp_path / "aime24.parquet", [{"id": 0, "problem": "P", "solution": "\\boxed{1}"}])
    with pytest.raises(
        ValueError, match=r"'answer'.*columns found: \['id', 'problem', 'solution'\]"
    ):
        prepare_data.prepare_benchmarks([bad], tmp_path / "bench")
    with pytest.raises(SystemExit, match=r"aime24\.parquet: no column 'answer'"):
        prepare_data.main(["benchmarks", f"--input={bad}", f"--out={tmp_path}"])
    assert not (tmp_path / "bench").exists()


def test_simplerl_refusal_names_the_columns_found(tmp_path):
    src = write(tmp_path / "x.parquet", [{"question": "q", "target": "1"}])
    with pytest.raises(ValueError, match=r"'instruction' or 'prompt'.*\['question', 'target'\]"):
        prepare_data.prepare_simplerl(src, tmp_path)
    src = write(tmp_path / "y.parquet", [{"prompt": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match=r"no gold column.*\['prompt'\]"):
        prepare_data.prepare_simplerl(src, tmp_path)


def test_cli_prints_the_counts_and_the_config_line(tmp_path, capsys):
    src = write(tmp_path / "simplelr_abel_level3to5" / "train.parquet", simplerl_rows(["q1", "q2"]))
    prepare_data.main(["simplerl", f"--input={src}", f"--out={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    path = tmp_path / "out" / "simplelr_abel_level3to5.parquet"
    assert path.exists()
    header, row = out.splitlines()[:2]
    assert header.split() == ["file", "read", "kept", "dropped"]
    assert row.split() == [str(path), "2", "2", "0", "empty", "question"]
    assert f"--config=configs/llama32_simplerl.py:size=3b --config.data.path={path}" in out
    assert "over-long prompts not filtered" in out


class WithBos:
    """The tokenizer, adding a BOS token id (1) unless `add_special_tokens=False` (as Llama's)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, add_special_tokens=True):
        out = self.tokenizer(texts, add_special_tokens=False)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [1, *ids] if isinstance(texts, str) else [[1, *i] for i in ids]
        return out


def test_simplerl_drops_by_the_authors_count_with_the_bos(tmp_path, tokenizer):
    """The authors' data_utils counts a prompt with the tokenizer's special tokens (Llama's
    BOS), training without them: a prompt that fits only without its BOS is dropped."""
    rows = simplerl_rows(["What is 12 + 7?", "What is 5 - 3?"])
    lengths = [
        len(tokenizer(r["prompt"][0]["content"], add_special_tokens=False)["input_ids"])
        for r in rows
    ]
    assert lengths[0] > lengths[1]
    src = write(tmp_path / "in.parquet", rows)
    counts = prepare_data.prepare_simplerl(
        src, tmp_path, tokenizer=WithBos(tokenizer), max_prompt_length=lengths[0]
    )
    assert (counts.read, counts.kept) == (2, 1)
    assert counts.dropped[f"{lengths[0]} tokens only with the 1 special token(s)"] == 1
    assert any("with the tokenizer's 1 special token(s)" in note for note in counts.notes)
    kept = prepare_data.read_table(counts.out)
    assert [r["question"] for r in kept] == ["What is 5 - 3?"]


def test_resolve_inputs_takes_one_split_and_its_shards(tmp_path):
    rows = open_rs_rows(2)
    saved = tmp_path / "saved"  # DatasetDict.save_to_disk
    shards = [
        write(saved / "train" / f"data-0000{i}-of-00002.arrow", rows, "stream") for i in (0, 1)
    ]
    write(saved / "test" / "data-00000-of-00001.arrow", rows, "stream")
    assert prepare_data.resolve_inputs(saved) == [str(p) for p in shards]
    assert prepare_data.read_table(shards[1]) == rows
    counts = prepare_data.prepare_open_rs(saved, tmp_path / "o.jsonl")
    assert (counts.read, counts.out) == (4, str(tmp_path / "o.jsonl"))

    write(tmp_path / "two" / "a.parquet", rows)
    write(tmp_path / "two" / "b.parquet", rows)
    with pytest.raises(ValueError, match=r"several data files .*a\.parquet.*b\.parquet"):
        prepare_data.resolve_inputs(tmp_path / "two")
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_data.resolve_inputs(tmp_path / "missing.parquet")


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    def write_half(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        prepare_data._write_atomic(str(tmp_path / "x.jsonl"), write_half)
    assert os.listdir(tmp_path) == []

"""Table 1 end to end: prepare the released files → train (tiny) → five benchmarks → table."""

import importlib
import json

import pytest

from aapo_jax import configs, evaluation, trainer
from aapo_jax.rewards import lighteval_pinned
from experiments import paper_eval, prepare_data
from tests.test_prepare_data import benchmark_rows, open_rs_rows, write

NAMES = list(evaluation.PAPER_BENCHMARKS)


def _cell(acc):
    return {"pass@1": acc}


def test_summary_is_the_mean_and_t_interval_over_seeds_and_the_average_per_seed():
    a, b = paper_eval.Checkpoint("a", "A"), paper_eval.Checkpoint("b", "B", 5, "W")
    cells = {
        ("a", "aime24", 0): _cell(0.2),
        ("a", "aime24", 1): _cell(0.4),
        ("a", "math500", 0): _cell(0.6),
        ("a", "math500", 1): _cell(0.8),
        ("b", "aime24", 0): _cell(0.5),  # b has no math500 cell: no average
    }
    summary = paper_eval.summarise(cells, [a, b], ["aime24", "math500"])
    first, second = summary["checkpoints"]
    assert first["results"]["aime24"]["mean"] == pytest.approx(0.3)
    # t(0.975, 1) = 12.706; stdev 0.1414 over 2 seeds.
    assert first["results"]["aime24"]["ci95"] == pytest.approx(12.7062 * 0.1 / 1, rel=1e-4)
    # The average is per seed over the benchmarks (0.4 and 0.6), then over seeds.
    average = first["results"][paper_eval.AVERAGE]
    assert average["seeds"] == {"0": pytest.approx(0.4), "1": pytest.approx(0.6)}
    assert average["mean"] == pytest.approx(0.5)
    assert paper_eval.AVERAGE not in second["results"] and second["step"] == 5
    settings = dict(
        seeds=[0, 1],
        judge="lighteval-0.8.1",
        temperature=0.6,
        top_p=0.95,
        max_new_tokens=32768,
        max_model_length=32768,
        add_special_tokens=True,
    )
    table = paper_eval.markdown(summary, settings)
    assert "| checkpoint | step | AIME24 | MATH-500 | Avg |" in table
    assert "| a | – | 30.0 ± 127.1 | 70.0 ± 127.1 | 50.0 ± 127.1 |" in table
    assert "| b | 5 | 50.0 | – | – |" in table


def test_missing_benchmark_files_and_changed_settings_are_named(tmp_path):
    (tmp_path / "aime24.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"no amc23\.jsonl.*aime24\.jsonl"):
        paper_eval.benchmark_files(tmp_path, ["aime24", "amc23"])
    assert paper_eval.benchmark_files(tmp_path, ["aime24"]) == {"aime24": tmp_path / "aime24.jsonl"}
    out = tmp_path / "out"
    out.mkdir()
    paper_eval.check_settings(out, dict(judge="math-verify", seeds=[0], max_new_tokens=8))
    paper_eval.check_settings(out, dict(judge="math-verify", seeds=[0, 1], max_new_tokens=8))
    with pytest.raises(ValueError, match="max_new_tokens: 8 → 9"):
        paper_eval.check_settings(out, dict(judge="math-verify", seeds=[0], max_new_tokens=9))


def test_prepare_train_evaluate_five_benchmarks_table(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    # 1. The released files as downloaded, converted into what the configs read.
    raw = tmp_path / "download"
    write(raw / "open-rs" / "train.parquet", open_rs_rows(12))
    rows = benchmark_rows()
    write(raw / "bench" / "aime_2024.parquet", rows["aime24"])
    write(raw / "bench" / "AMC-23.jsonl", rows["amc23"])
    write(raw / "bench" / "MATH-500.jsonl", rows["math500"])
    write(raw / "bench" / "minerva-math.arrow", rows["minerva"], "stream")
    write(raw / "bench" / "OlympiadBench.jsonl", rows["olympiadbench"])
    data, bench = tmp_path / "data", tmp_path / "bench"
    prepare_data.main(["open-rs", f"--input={raw / 'open-rs'}", f"--out={data}"])
    prepare_data.main(["benchmarks", f"--input={raw / 'bench'}", f"--out={bench}"])
    assert sorted(p.name for p in bench.iterdir()) == sorted(f"{n}.jsonl" for n in NAMES)
    assert f"experiments.paper_eval --model=MODEL --benchmarks={bench}" in capsys.readouterr().out

    # 2. The 1.5B open-rs config, tiny (two steps), on the prepared file.
    c = importlib.import_module("configs.r1_distill_1p5b_openrs").get_config("variant=tiny")
    c.model.path = str(tiny_model_dir)
    (c.data.path,) = [str(p) for p in data.iterdir() if p.suffix == ".jsonl"]
    workdir = tmp_path / "run"
    summary = trainer.train(configs.experiment_config(c), workdir, progress=False)
    assert summary["steps"] == 2 and (workdir / "summary.json").exists()

    # 3. The source model (step 0) and the trained one on the five benchmarks, one seed.
    judge = "lighteval-0.8.1" if lighteval_pinned.available() else "math-verify"
    out = tmp_path / "table"
    flags = [
        f"--model={workdir}",
        "--steps=all",
        "--with_base",
        f"--benchmarks={bench}",
        f"--out={out}",
        f"--judge={judge}",
        "--max_new_tokens=4",
        "--num_workers=1",
        "--dtype=float32",
        "--mesh=1,1,1",
    ]
    paper_eval.main(flags)
    printed = capsys.readouterr().out
    assert "0 of 10 cells already" in printed
    assert "| checkpoint | step | AIME24 | AMC23 | MATH-500 | Minerva | OlympiadBench | Avg |" in (
        printed
    )
    results = json.loads((out / paper_eval.RESULTS_JSON).read_text())
    assert [(r["label"], r["step"]) for r in results["checkpoints"]] == [
        ("run@step0", 0),
        ("run@step2", 2),
    ]
    for row in results["checkpoints"]:
        assert set(row["results"]) == {*NAMES, paper_eval.AVERAGE}
        assert all(0 <= r["mean"] <= 1 for r in row["results"].values())
    cell = json.loads(
        paper_eval.cell_path(out, paper_eval.Checkpoint("run@step2", ""), "aime24", 0).read_text()
    )
    assert cell["verifier"] == evaluation.paper_verifier("aime24", judge)
    assert (cell["num_problems"], cell["scorer_errors"], cell["add_special_tokens"]) == (1, 0, True)
    assert cell["max_model_length"] == 32768 and cell["sample_completion_len"] <= 4
    assert results["checkpoints"][1]["results"]["aime24"]["completion_len"] <= 4
    assert (out / paper_eval.PLOT).stat().st_size > 0

    # 4. A rerun finds every cell and loads no model.
    def no_load(*args):
        raise AssertionError("a finished cell was evaluated again")

    monkeypatch.setattr(paper_eval, "_load", no_load)
    paper_eval.main(flags)
    assert "10 of 10 cells already" in capsys.readouterr().out

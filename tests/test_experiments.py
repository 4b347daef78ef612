"""The notebook executes on the tiny config; the comparison table and plot are built right."""

import json
import os
from pathlib import Path

import pytest

from experiments import bench_decode_bandwidth, compare

REPO = Path(__file__).resolve().parents[1]


def test_notebook_executes_on_the_tiny_config(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("AAPO_NOTEBOOK_ARG", "variant=tiny")
    monkeypatch.setenv("AAPO_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("AAPO_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(REPO / "experiments" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "final_eval_accuracy" in outputs
    assert (tmp_path / "run" / "summary.json").exists()


def _result(algo, group, seed, final, curve):
    return {
        "algo": algo,
        "group": group,
        "seed": seed,
        "initial_accuracy": 0.3,
        "final_accuracy": final,
        "reward_auc": sum(curve) / len(curve),
        "zero_std_frac": 0.5,
        "wall_seconds": 1.0,
        "reward_curve": curve,
    }


def test_compare_table_and_plot(tmp_path):
    results = [
        _result("aapo", 2, 0, 0.40, [0.3, 0.4]),
        _result("aapo", 2, 1, 0.42, [0.3, 0.5]),
        _result("grpo", 2, 0, 0.35, [0.3, 0.3]),
    ]
    text = compare.table(results)
    lines = text.splitlines()
    assert lines[2] == "| aapo | 2 | 2 | 41.0 ± 1.4 | +11.0 ± 1.4 | 0.375 ± 0.035 | 0.50 ± 0.00 |"
    assert lines[3].startswith("| grpo | 2 | 1 | 35.0 ± 0.0 | +5.0 ± 0.0 |")
    compare.plot(results, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_decode_step_bytes_count_weights_once_and_the_whole_cache():
    tied = bench_decode_bandwidth.model_config("1b")
    assert 1.2e9 < tied.num_params < 1.3e9  # the Llama-3.2-1B shape
    moved = bench_decode_bandwidth.decode_step_bytes(tied, batch=4, cache_slots=10)
    assert moved["weights"] == 2 * tied.num_params  # the tied embedding is read as the head
    assert moved["kv_cache"] == 4 * 2 * 16 * 8 * 64 * 10 * 2
    untied = bench_decode_bandwidth.model_config("tiny")
    embedding = untied.vocab_size * untied.hidden_size
    moved = bench_decode_bandwidth.decode_step_bytes(untied, batch=1, cache_slots=0)
    assert moved == {"weights": 2 * (untied.num_params - embedding), "kv_cache": 0}


def test_decode_bandwidth_benchmark_runs(capsys):
    bench_decode_bandwidth.main(
        ["--shape=tiny", "--batches=1,2", "--prompt_len=4", "--new_tokens=3", "--reps=1", "--json"]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["shape"] == "tiny" and result["backend"] == "cpu"
    assert [row["batch"] for row in result["batches"]] == [1, 2]
    for row in result["batches"]:
        assert row["decode_step_s"] > 0 and row["bandwidth_bytes_per_s"] > 0
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] / row["decode_step_s"])
    assert result["stream_bandwidth_bytes_per_s"] > 0

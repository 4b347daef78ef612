"""The README's swap example and the notebook run as written; compare's table and plot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aapo_jax import metrics
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


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with `first_line`."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


def test_readme_swap_example_trains_a_new_algorithm_with_a_new_reward(tmp_path):
    """The block runs as written from the repository root, two steps (variant=tiny)."""
    script = tmp_path / "my_algorithm.py"
    script.write_text(readme_block("# my_algorithm.py"))
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(workdir), "variant=tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["algorithm"] == "margin_only" and summary["hparams"] == {"scale": 0.5}
    rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # The estimator really ran: A = 0.5 · (r − r̃), so its batch mean is that of r − r̃.
        expected = 0.5 * (row["reward_mean"] - row["ref_reward_mean"])
        assert row["advantage_mean"] == pytest.approx(expected, abs=1e-6)
        assert "reward/short_answer" in row and "reward/gym:chain_sum" in row


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

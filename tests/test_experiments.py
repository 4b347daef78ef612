"""The notebook executes on the tiny config; the comparison table and plot are built right."""

import os
from pathlib import Path

import pytest

from experiments import compare

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

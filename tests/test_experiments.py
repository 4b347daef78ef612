"""The README's swap example and the notebook run as written; compare's table and plot."""

import json
import os
import re
import shlex
import subprocess
import sys

import matplotlib
import pytest

from aapo_jax import metrics
from experiments import bench_decode_bandwidth, bench_shared_prompt, compare
from tests.helpers import REPO, matplotlib_backend


def execute_notebook(name: str, monkeypatch, **env: str):
    """Run experiments/NAME as Jupyter would, with the AAPO_NOTEBOOK_* `env`; the executed
    notebook and its code cells' printed text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in env.items():
        monkeypatch.setenv(f"AAPO_NOTEBOOK_{key}", value)
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The backend Jupyter and Colab give a notebook: a training run must leave it in place.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(REPO / "experiments" / name, as_version=4)
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
    return notebook, outputs


def has_image(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.outputs)


def test_notebook_executes_on_the_tiny_config(tmp_path, monkeypatch):
    notebook, outputs = execute_notebook(
        "quickstart.ipynb",
        monkeypatch,
        ARG="variant=tiny",
        STEPS="2",
        WORKDIR=str(tmp_path / "run"),
    )
    assert "final_eval_accuracy" in outputs
    assert (tmp_path / "run" / "summary.json").exists()
    plot_cell, completions_cell = (
        c for c in notebook.cells if "metrics.read" in c.source or "SAMPLES_FILE" in c.source
    )
    assert has_image(plot_cell)
    printed = "".join(o.get("text", "") for o in completions_cell.outputs)
    assert printed.startswith("step 2: "), printed


def test_one_chip_notebook_executes_in_tiny_mode(tmp_path, monkeypatch):
    """The one-chip LoRA notebook on the quickstart's tiny model: planned on the local
    device, trained, plotted, and its adapters exported in PEFT's format."""
    run = tmp_path / "run"
    notebook, outputs = execute_notebook(
        "one_chip_lora.ipynb", monkeypatch, TINY="1", STEPS="2", WORKDIR=str(run)
    )
    assert "decode passes: 1" in outputs and "fits: " in outputs
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert (run / "hf" / "config.json").exists()
    (plot_cell,) = (c for c in notebook.cells if "metrics.read" in c.source)
    assert has_image(plot_cell)
    assert f"python -m experiments.evaluate --model={run} --task=quickstart" in outputs


def readme_block(first_line: str, language: str = "python") -> str:
    """The README's ```LANGUAGE block that starts with `first_line`."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


def readme_commands(first_line: str) -> list[list[str]]:
    """The README's ```bash block that starts with `first_line`, one argv per command."""
    block = readme_block(first_line, "bash").replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    (i,) = [i for i, arg in enumerate(argv) if arg.startswith(f"{flag}=")]
    return [*argv[:i], f"{flag}={value}", *argv[i + 1 :]]


def test_readme_swap_example_runs_from_the_command_line_and_its_checkpoint_evaluates(
    tmp_path, monkeypatch
):
    """The plugin file and the two commands as written (the run made tiny, the workdir and
    the evaluated problems ours): a new algorithm and reward trained with `--import`, and the
    checkpoint evaluated with `--import`; without it, the recorded module is re-imported, and
    a module that is gone is named."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "my_algorithm.py").write_text(readme_block("# my_algorithm.py"))
    train, evaluate_cmd = readme_commands("python -m experiments.train --import=my_algorithm")
    assert train[:3] == ["python", "-m", "experiments.train"] and "--import=my_algorithm" in train
    assert evaluate_cmd[:3] == ["python", "-m", "experiments.evaluate"]
    assert "--import=my_algorithm" in evaluate_cmd
    workdir = tmp_path / "run"
    (config,) = [arg for arg in train if arg.startswith("--config=")]
    train = _replace_flag(train, "--config", config.split("=", 1)[1] + ",variant=tiny")
    train = _replace_flag(train, "--workdir", str(workdir))
    # The file sits beside the commands: on the path of the trainer and its reward workers.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO)])}

    def run(argv):
        proc = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    run([*train, "--progress=false"])
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["name"] == "quickstart-margin_only-G2-s0-tiny"
    assert summary["algorithm"] == "margin_only" and summary["hparams"] == {"scale": 0.5}
    assert summary["imports"] == ["my_algorithm"]
    rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # The estimator really ran: A = 0.5 · (r − r̃), so its batch mean is that of r − r̃.
        expected = 0.5 * (row["reward_mean"] - row["ref_reward_mean"])
        assert row["advantage_mean"] == pytest.approx(expected, abs=1e-6)
        assert "reward/short_answer" in row and "reward/gym:chain_sum" in row

    evaluate_cmd = _replace_flag(evaluate_cmd, "--model", str(workdir))
    proc = run([*evaluate_cmd, "--limit=8"])
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["model"] == str(workdir) and report["num_problems"] == 8
    assert 0 <= report["pass@1"] <= 1

    # In this process: the checkpoint's recorded module is re-imported when it can be found,
    # and named when it cannot.
    from aapo_jax import algorithms, plugins, rewards, trainer

    monkeypatch.setattr(algorithms, "ALGORITHMS", dict(algorithms.ALGORITHMS))
    monkeypatch.setattr(rewards, "HOST_REWARDS", dict(rewards.HOST_REWARDS))
    monkeypatch.delitem(sys.modules, "my_algorithm", raising=False)
    with pytest.raises(plugins.PluginError, match=r"--import=my_algorithm: cannot import module"):
        trainer.load_trained_model(workdir)
    monkeypatch.syspath_prepend(str(plugin_dir))
    try:
        _, config = trainer.load_trained_model(workdir)
        assert config.rl.algorithm == "margin_only" and "margin_only" in algorithms.ALGORITHMS
    finally:
        sys.modules.pop("my_algorithm", None)


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
    with matplotlib_backend("svg"):
        compare.plot(results, tmp_path / "compare.png")
        assert matplotlib.get_backend() == "svg"
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_decode_step_bytes_count_weights_once_and_the_whole_cache():
    tied = bench_decode_bandwidth.model_config("1b")
    assert 1.2e9 < tied.num_params < 1.3e9  # the Llama-3.2-1B shape
    moved = bench_decode_bandwidth.decode_step_bytes(tied, batch=4, cache_slots=10)
    assert moved["weights"] == 2 * tied.num_params  # the tied embedding is read as the head
    assert moved["kv_cache"] == 4 * 2 * 16 * 8 * 64 * 10 * 2
    assert 1.77e9 < bench_decode_bandwidth.model_config("1.5b").num_params < 1.78e9  # R1-Distill
    untied = bench_decode_bandwidth.model_config("tiny")
    embedding = untied.vocab_size * untied.hidden_size
    moved = bench_decode_bandwidth.decode_step_bytes(untied, batch=1, cache_slots=0)
    assert moved == {"weights": 2 * (untied.num_params - embedding), "kv_cache": 0}


def test_decode_bandwidth_benchmark_runs(capsys):
    """A row per decode attention and batch size, side by side; a bad name fails first."""
    args = ["--shape=tiny", "--prompt_len=4", "--new_tokens=3", "--reps=1", "--json"]
    bench_decode_bandwidth.main([*args, "--batches=2", "--decode_attention=xla,pallas_gpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["shape"] == "tiny" and result["backend"] == "cpu"
    rows = result["batches"]
    assert [(r["decode_attention"], r["batch"]) for r in rows] == [("xla", 2), ("pallas_gpu", 2)]
    for row in rows:
        assert row["decode_step_s"] > 0 and row["bandwidth_bytes_per_s"] > 0
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] / row["decode_step_s"])
    assert result["stream_bandwidth_bytes_per_s"] > 0
    with pytest.raises(ValueError, match="decode_attention='flash'"):
        bench_decode_bandwidth.main([*args, "--decode_attention=xla,flash"])


def test_shared_prompt_benchmark_runs(capsys):
    """Both paths timed side by side: the same tokens, the shared cache smaller by the G − 1
    prompt copies it does not hold."""
    args = "--size=tiny --prompts=8 --group=2 --prompt_len=8 --new_tokens=3 --reps=1 --json"
    bench_shared_prompt.main(args.split())
    result = json.loads(capsys.readouterr().out)
    assert result["ratio"] > 0 and result["shared_tokens_per_s"] > 0
    assert result["tokens_equal_rows"] == 1.0
    shared, repeated = result["cache_mib"]["shared"], result["cache_mib"]["repeated"]
    # Per model: 8 prompts × 8 slots once against 16 rows × 8; both hold 16 rows × 3 own.
    # (The masks and write indices add a few bytes to each.)
    assert shared / repeated == pytest.approx((8 * 8 + 16 * 3) / (16 * (8 + 3)), rel=1e-3)

"""AAPO vs GRPO vs Dr. GRPO on the quickstart task: seeds × group sizes, one table and one plot.

    python -m experiments.compare --workdir=/tmp/compare              # 3 algos × G{2,4,8} × 3 seeds
    python -m experiments.compare --workdir=/tmp/compare --steps=50 --seeds=0,1,2

Every run starts from the shipped quickstart model with the same step budget
and prompts per step; only the algorithm, the group size G and the seed
change. Per (algorithm, G) the table gives mean ± std over seeds of the final
held-out greedy accuracy, its gain over the start, the area under the reward
curve (mean training reward over all steps) and the fraction of groups whose
rewards were all equal (zero GRPO advantage: AAPO's margin is the only signal
there). Runs already finished in --workdir are reused, so an interrupted
comparison resumes. Writes `results.json`, `table.md` and `compare.png`. `--import=my_module`
(repeatable) imports your own module first, so that `--algos` may name the algorithms it
registers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from aapo_jax import plugins

# The default selection; any name in `aapo_jax.algorithms.ALGORITHMS` may be given.
ALGOS = ("aapo", "grpo", "dr_grpo")


def run_one(
    workdir: Path,
    algo: str,
    group: int,
    seed: int,
    steps: int,
    prompts: int,
    *,
    name: str | None = None,
    hparams: dict | None = None,
    overrides: dict | None = None,
    imports: tuple[str, ...] = (),
) -> dict:
    """Train one quickstart run (or reuse a finished one) and summarise its curve.

    `name` (default `algo`) names the run directory and the result's `variant`;
    `hparams` update the algorithm's `rl.hparams`; `overrides` set other config
    fields by dotted name (e.g. `{"train.eval_size": 8}`); `imports` are the plugin modules
    recorded with the run.
    """
    from aapo_jax import configs, metrics, trainer
    from configs import quickstart

    name = name or algo
    run_dir = workdir / f"{name}-G{group}-s{seed}"
    summary_file = run_dir / trainer.SUMMARY_FILE
    if not summary_file.exists():
        c = quickstart.get_config(f"algo={algo},group={group},seed={seed}")
        c.train.steps = steps
        c.train.prompts_per_step = prompts
        c.train.eval_every = 0
        c.train.checkpoint_every = 0
        c.train.samples_every = 0
        c.rl.hparams.update(hparams or {})
        for field, value in (overrides or {}).items():
            section, key = field.split(".")
            c[section][key] = value
        trainer.train(configs.experiment_config(c), run_dir, imports=imports, progress=True)
    summary = json.loads(summary_file.read_text())
    rows = [r for r in metrics.read_metrics(run_dir) if r.get("reward_mean") is not None]
    margins = [r["margin_mean"] for r in rows if r.get("margin_mean") is not None]
    return {
        "algo": algo,
        "variant": name,
        "group": group,
        "seed": seed,
        "initial_accuracy": summary["initial_eval_accuracy"],
        "final_accuracy": summary["final_eval_accuracy"],
        "reward_auc": statistics.fmean(r["reward_mean"] for r in rows),
        "zero_std_frac": statistics.fmean(r["zero_std_group_frac"] for r in rows),
        "margin_mean": statistics.fmean(margins) if margins else None,
        "wall_seconds": summary["wall_seconds"],
        "reward_curve": [r["reward_mean"] for r in rows],
    }


def write_report(workdir: Path, text: str, plot_fn, results: list[dict], png: str) -> None:
    """`table.md` holding `text`, the plot `plot_fn(results, workdir / png)`, and `text` printed."""
    (workdir / "table.md").write_text(text + "\n")
    plot_fn(results, workdir / png)
    print(text)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def in_run_order(results: list[dict], key: str = "algo") -> list[str]:
    """The distinct values of `key` (an algorithm, a variant) in `results`, in run order."""
    return list(dict.fromkeys(r[key] for r in results))


def table(results: list[dict]) -> str:
    """A markdown table: one row per (algorithm, G), mean ± std over seeds."""
    lines = [
        "| algorithm | G | seeds | final acc. | gain (pts) | reward AUC | zero-std groups |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = sorted({r["group"] for r in results})
    for group in groups:
        for algo in in_run_order(results):
            rs = [r for r in results if r["algo"] == algo and r["group"] == group]
            if not rs:
                continue
            zero = _mean_std([r["zero_std_frac"] for r in rs])
            cells = [
                algo,
                group,
                len(rs),
                *outcome_cells(rs, _mean_std),
                f"{zero[0]:.2f} ± {zero[1]:.2f}",
            ]
            lines.append(f"| {' | '.join(map(str, cells))} |")
    return "\n".join(lines)


def outcome_cells(rs: list[dict], stat) -> list[str]:
    """Final accuracy (%), its gain (points) and reward AUC of runs `rs`, each as
    'centre ± spread' from `stat(values) -> (centre, spread)`."""
    acc = stat([100 * r["final_accuracy"] for r in rs])
    gain = stat([100 * (r["final_accuracy"] - r["initial_accuracy"]) for r in rs])
    auc = stat([r["reward_auc"] for r in rs])
    return [
        f"{acc[0]:.1f} ± {acc[1]:.1f}",
        f"{gain[0]:+.1f} ± {gain[1]:.1f}",
        f"{auc[0]:.3f} ± {auc[1]:.3f}",
    ]


def plot(results: list[dict], out: Path) -> None:
    """One panel per G: mean training-reward curve per algorithm (band = ± std over seeds)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted({r["group"] for r in results})
    fig = Figure(figsize=(5 * len(groups), 3.6))
    FigureCanvasAgg(fig)  # not pyplot: the caller's backend stays as it was
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for algo in in_run_order(results):
            curves = [
                r["reward_curve"] for r in results if r["algo"] == algo and r["group"] == group
            ]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            data = np.asarray([c[:length] for c in curves])
            mean, std = data.mean(0), data.std(0)
            steps = np.arange(1, length + 1)
            gains = [
                100 * (r["final_accuracy"] - r["initial_accuracy"])
                for r in results
                if r["algo"] == algo and r["group"] == group
            ]
            ax.plot(steps, mean, label=f"{algo} (acc {statistics.fmean(gains):+.1f} pts)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"G = {group}")
        ax.set_xlabel("step")
        ax.set_ylabel("training reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"quickstart: {' vs '.join(in_run_order(results))} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=50, help="the same budget for every run")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step")
    parser.add_argument("--groups", default="2,4,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument(
        f"--{plugins.FLAG}", dest="imports", action="append", default=[], help=plugins.FLAG_HELP
    )
    args = parser.parse_args(argv)
    from aapo_jax import algorithms

    try:
        imports = plugins.import_modules(args.imports)
    except plugins.PluginError as e:
        parser.error(str(e))

    unknown = sorted(set(args.algos.split(",")) - set(algorithms.ALGORITHMS))
    if unknown:
        parser.error(f"--algos: unknown {unknown}; valid: {sorted(algorithms.ALGORITHMS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for group in map(int, args.groups.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for algo in args.algos.split(","):
                results.append(
                    run_one(
                        args.workdir, algo, group, seed, args.steps, args.prompts, imports=imports
                    )
                )
                (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    write_report(args.workdir, table(results), plot, results, "compare.png")


if __name__ == "__main__":
    main()

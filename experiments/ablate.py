"""Ablations of AAPO's margin on the quickstart task: which part of the advantage does the work.

    python -m experiments.ablate --workdir=/tmp/ablate       # 7 variants × G{2,4} × 5 seeds
    python -m experiments.ablate --workdir=/tmp/ablate --groups=2 --seeds=0,1 --variants=aapo

AAPO's advantage is A = Â + M: the group part Â = r − mean(r) plus the margin
M = clip(r − r̃, −δ_low, δ_high) against a paired completion r̃ of the frozen
reference. The variants take it apart:

- `margin_0_0`, `margin_0.1_0.14`, `aapo` (the paper's δ = (0.2, 0.28)),
  `margin_0.4_0.56`, `margin_0.28_0.28` (symmetric): the margin grid. δ = (0, 0)
  is the group part alone (GRPO's advantage without the std, under AAPO's loss).
- `constant`: A = Â + c with c the mean margin of the matched `aapo` run (same G
  and seed; read from its metrics), and no reference rollout: does the margin
  help only by shifting every advantage up?
- `margin_only`: A = M, no group part: is the reference comparison enough alone?

Every run starts from the shipped quickstart model with the same steps, prompts
per step and learning rate; only the variant, G and the seed change. Per
(variant, G) the table gives the mean and the 95% confidence interval (Student
t over seeds) of the final held-out greedy accuracy and of the reward AUC (mean
training reward over all steps). `PAIRS` (aapo − margin_0_0, the group part alone;
aapo − constant) are also compared seed by seed: the mean of the per-seed differences
and its 95% CI. Finished runs in --workdir are reused, so an interrupted ablation
resumes. Writes `results.json` (per run), `paired.json`, `table.md` and `ablate.png`.
The derivation of what the margin does to the expected gradient is in
docs/margin-gradient.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from experiments import compare
from experiments.intervals import mean_ci

# The ablation's budget: a quarter of the quickstart's rows per step and 80 steps,
# so the 70 runs of the full grid take about half an hour on 2 cores.
STEPS, PROMPTS = 80, 16
OVERRIDES = {"optim.learning_rate": 5e-5, "train.eval_batch_size": 500}


def constant_advantage(rewards_BxG, *, constant: float, scale_rewards: bool = False):
    """A = Â + c: the group advantage shifted by a constant (no reference rollout)."""
    from aapo_jax import advantages

    return advantages.grpo(rewards_BxG, scale_rewards=scale_rewards) + constant


def margin_only_advantage(rewards_BxG, ref_rewards_BxG, *, margin_low: float, margin_high: float):
    """A = M = clip(r − r̃, −δ_low, δ_high): AAPO's margin without the group part.

    Returns (M, its statistics), so the run logs its margin as AAPO's does.
    """
    from aapo_jax import advantages

    return advantages.margin(
        rewards_BxG,
        ref_rewards_BxG,
        margin_low=margin_low,
        margin_high=margin_high,
        return_stats=True,
    )


def register_algorithms() -> None:
    """Add `aapo_constant` and `aapo_margin_only` (AAPO's loss) to the algorithm registry."""
    from aapo_jax import algorithms, losses
    from aapo_jax.algorithms import HParam

    aapo = algorithms.ALGORITHMS["aapo"]
    algorithms.ALGORITHMS.setdefault(
        "aapo_constant",
        algorithms.Algorithm(
            advantage=constant_advantage,
            loss=losses.aapo_terms,
            advantage_hparams={
                "constant": HParam(0.0, help="c: added to every advantage"),
                "scale_rewards": aapo.advantage_hparams["scale_rewards"],
            },
            min_group_size=2,
            description="group advantage + a constant c, token-mean PG (ablation)",
        ),
    )
    algorithms.ALGORITHMS.setdefault(
        "aapo_margin_only",
        algorithms.Algorithm(
            advantage=margin_only_advantage,
            loss=losses.aapo_terms,
            advantage_hparams={k: aapo.advantage_hparams[k] for k in ("margin_low", "margin_high")},
            needs_reference_rollout=True,
            description="clip(r − r̃, −δ_low, δ_high) alone, token-mean PG (ablation)",
        ),
    )


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablated advantage: a registered algorithm and its hyper-parameters."""

    name: str
    algo: str
    hparams: tuple[tuple[str, float], ...] = ()
    matched_constant: bool = False  # c = the mean margin of the matched `aapo` run

    def run_hparams(self, constant: float | None = None) -> dict:
        """The `rl.hparams` of this variant's run (`constant`: the matched mean margin)."""
        out = dict(self.hparams)
        if self.matched_constant:
            if constant is None:
                raise ValueError(f"variant {self.name!r} needs the matched aapo run's margin.")
            out["constant"] = constant
        return out


def _margin(low: float, high: float, name: str | None = None) -> Variant:
    return Variant(
        name or f"margin_{low:g}_{high:g}", "aapo", (("margin_low", low), ("margin_high", high))
    )


VARIANTS = {
    v.name: v
    for v in (
        _margin(0.0, 0.0),
        _margin(0.1, 0.14),
        _margin(0.2, 0.28, "aapo"),
        _margin(0.4, 0.56),
        _margin(0.28, 0.28),
        Variant("constant", "aapo_constant", matched_constant=True),
        Variant("margin_only", "aapo_margin_only", (("margin_low", 0.2), ("margin_high", 0.28))),
    )
}


def table(results: list[dict]) -> str:
    """A markdown table: one row per (variant, G), mean ± 95% CI over seeds."""
    lines = [
        "| variant | G | seeds | final acc. (%) | gain (pts) | reward AUC | mean margin / c |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in sorted({r["group"] for r in results}):
        for name in compare.in_run_order(results, "variant"):
            rs = [r for r in results if r["variant"] == name and r["group"] == group]
            if not rs:
                continue
            shift = [r["constant"] if "constant" in r else r["margin_mean"] for r in rs]
            shift = "–" if None in shift else f"{statistics.fmean(shift):+.3f}"
            cells = [name, group, len(rs), *compare.outcome_cells(rs, mean_ci), shift]
            lines.append(f"| {' | '.join(map(str, cells))} |")
    return "\n".join(lines)


# Paired comparisons (a − b): the matched-seed runs of two variants share their prompt order
# and sampling keys, so the per-seed difference cancels what the seed alone moves.
PAIRS = (("aapo", "margin_0_0"), ("aapo", "constant"))
PAIRED_METRICS = {
    "final_accuracy_pts": lambda r: 100 * r["final_accuracy"],
    "reward_auc": lambda r: r["reward_auc"],
}


def _by_seed(results: list[dict], variant: str, group: int) -> dict[int, dict]:
    runs = [r for r in results if r["variant"] == variant and r["group"] == group]
    by_seed = {r["seed"]: r for r in runs}
    if len(by_seed) < len(runs):
        raise ValueError(f"{variant} G={group}: a seed appears twice in the results.")
    return by_seed


def paired(results: list[dict], pairs=PAIRS) -> list[dict]:
    """Per G and pair (a, b): the differences a − b of each metric, seed by seed over the
    seeds both ran, with their mean and 95% CI half-width (`mean_ci`). Pairs of which
    either variant did not run at that G, or that share no seed, are left out."""
    out = []
    for group in sorted({r["group"] for r in results}):
        for a, b in pairs:
            runs_a, runs_b = _by_seed(results, a, group), _by_seed(results, b, group)
            seeds = sorted(runs_a.keys() & runs_b.keys())
            if not seeds:
                continue
            row = {"a": a, "b": b, "group": group, "seeds": seeds}
            for metric, value in PAIRED_METRICS.items():
                diffs = [value(runs_a[s]) - value(runs_b[s]) for s in seeds]
                mean, half = mean_ci(diffs)
                row[metric] = {"diffs": diffs, "mean": mean, "ci95_half": half}
            out.append(row)
    return out


def paired_table(rows: list[dict]) -> str:
    """A markdown table of `paired(...)`: mean difference ± 95% CI half-width over seeds."""
    lines = [
        "| a − b | G | seeds | Δ final acc. (pts) | Δ reward AUC |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        acc, auc = row["final_accuracy_pts"], row["reward_auc"]
        cells = [
            f"{row['a']} − {row['b']}",
            row["group"],
            len(row["seeds"]),
            f"{acc['mean']:+.1f} ± {acc['ci95_half']:.1f}",
            f"{auc['mean']:+.3f} ± {auc['ci95_half']:.3f}",
        ]
        lines.append(f"| {' | '.join(map(str, cells))} |")
    return "\n".join(lines)


def report(workdir: Path, results: list[dict]) -> None:
    """`table.md` (per-variant table, then the paired one; both printed), `paired.json`
    and the plot."""
    rows = paired(results)
    (workdir / "paired.json").write_text(json.dumps(rows, indent=1))
    parts = [table(results)]
    if rows:
        parts += ["Paired over matched seeds (a − b per seed, mean ± 95% CI):", paired_table(rows)]
    compare.write_report(workdir, "\n\n".join(parts), plot, results, "ablate.png")


def plot(results: list[dict], out: Path) -> None:
    """Per G: final accuracy ± 95% CI per variant (top) and mean reward curves (bottom)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted({r["group"] for r in results})
    names = compare.in_run_order(results, "variant")
    fig = Figure(figsize=(6 * len(groups), 7))
    FigureCanvasAgg(fig)  # not pyplot: the caller's backend stays as it was
    axes = fig.subplots(2, len(groups), squeeze=False)
    for col, group in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        for i, name in enumerate(names):
            rs = [r for r in results if r["variant"] == name and r["group"] == group]
            if not rs:
                continue
            mean, half = mean_ci([100 * r["final_accuracy"] for r in rs])
            top.errorbar([i], [mean], yerr=[half], fmt="o", capsize=4)
            top.scatter([i] * len(rs), [100 * r["final_accuracy"] for r in rs], s=8, alpha=0.4)
            length = min(len(r["reward_curve"]) for r in rs)
            curve = np.mean([r["reward_curve"][:length] for r in rs], axis=0)
            bottom.plot(np.arange(1, length + 1), curve, label=name)
        initial = statistics.fmean(100 * r["initial_accuracy"] for r in results)
        top.axhline(initial, color="grey", ls="--", lw=1, label="start")
        top.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        top.set_ylabel("final held-out accuracy (%)")
        top.set_title(f"G = {group}: mean ± 95% CI over seeds")
        top.legend(fontsize=8)
        bottom.set_xlabel("step")
        bottom.set_ylabel("training reward (mean over seeds)")
        bottom.legend(fontsize=7, ncol=2)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def run(
    workdir: Path,
    variants: list[str],
    groups: list[int],
    seeds: list[int],
    steps: int = STEPS,
    prompts: int = PROMPTS,
    overrides: dict | None = None,
) -> list[dict]:
    """Train (or reuse) every (variant, G, seed) run; `results.json` is rewritten after each.

    A `constant` run needs its matched `aapo` run, which is trained first when absent.
    """
    register_algorithms()
    overrides = {**OVERRIDES, **(overrides or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    total = len(variants) * len(groups) * len(seeds)
    results = []

    def one(name: str, group: int, seed: int, constant: float | None = None) -> dict:
        variant = VARIANTS[name]
        result = compare.run_one(
            workdir,
            variant.algo,
            group,
            seed,
            steps,
            prompts,
            name=name,
            hparams=variant.run_hparams(constant),
            overrides=overrides,
        )
        if variant.matched_constant:
            result["constant"] = constant
        return result

    for group in groups:
        for seed in seeds:
            matched = None
            for name in variants:
                print(
                    f"[ablate] run {len(results) + 1}/{total}: {name} G={group} seed={seed}",
                    file=sys.stderr,
                )
                constant = None
                if VARIANTS[name].matched_constant:
                    matched = matched or one("aapo", group, seed)
                    constant = matched["margin_mean"]
                result = one(name, group, seed, constant)
                if name == "aapo":
                    matched = result
                results.append(result)
                (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=STEPS, help="the same budget for every run")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step")
    parser.add_argument("--groups", default="2,4")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names in VARIANTS")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; valid: {list(VARIANTS)}")
    results = run(
        args.workdir,
        variants,
        [int(g) for g in args.groups.split(",")],
        [int(s) for s in args.seeds.split(",")],
        args.steps,
        args.prompts,
    )
    report(args.workdir, results)


if __name__ == "__main__":
    main()

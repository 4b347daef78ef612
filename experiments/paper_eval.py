"""The paper's Table 1 for one or more checkpoints: five benchmarks, seeds, one results table.

    python -m experiments.paper_eval --model=/tmp/qwen7b-aapo --benchmarks=/data/bench \
        --out=/tmp/table
    python -m experiments.paper_eval --model=/tmp/qwen7b-aapo --steps=all --with_base --seeds=3 \
        --benchmarks=/data/bench --out=/tmp/curve
    python -m experiments.paper_eval --model=/ckpt/AAPO-7B --model=/ckpt/GRPO-7B \
        --benchmarks=/data/bench --paper=aime24,math500 --out=/tmp/two

Each --model is a Hugging Face checkpoint directory or a training workdir (its newest
checkpoint, or every saved one with --steps=all; --with_base adds the run's source model as
step 0). --benchmarks is a directory holding `aime24.jsonl`, `amc23.jsonl`, `math500.jsonl`,
`minerva.jsonl` and `olympiadbench.jsonl` (`python -m experiments.prepare_data benchmarks`
writes them; .parquet works too). Every (checkpoint, benchmark, seed) cell runs the authors'
protocol (`evaluation.paper_task`): one sample per problem at T=0.6, top_p 0.95, up to
32768 − prompt tokens, the query in the chat template with the tokenizer's special tokens,
judged by lighteval 0.8.1 itself (--judge=math-verify: our math-verify transcription, an
approximation). A finished cell is stored under OUT/cells/ and skipped on a rerun, so an
interrupted evaluation resumes where it stopped. Writes OUT/results.json, OUT/results.md (per
benchmark and the average over benchmarks, mean ± 95% interval over seeds) and, with several
steps of one run, OUT/accuracy_vs_step.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from experiments import evaluate as evaluate_cli
from experiments.intervals import mean_ci

CELLS = "cells"
SETTINGS_FILE = "settings.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT = "accuracy_vs_step.png"
AVERAGE = "average"
# Column titles as the paper's Table 1 prints them.
TITLES = {
    "aime24": "AIME24",
    "amc23": "AMC23",
    "math500": "MATH-500",
    "minerva": "Minerva",
    "olympiadbench": "OlympiadBench",
}
SUFFIXES = (".jsonl", ".parquet")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One model to evaluate: a Hugging Face directory, or a workdir's saved `step`.

    `label` names it in the table and its cells' directory; `step` (None for a Hugging Face
    directory) places it on the accuracy-vs-step plot, 0 being a run's source model.
    """

    label: str
    model: str
    step: int | None = None
    workdir: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def workdir_steps(workdir: str | Path) -> tuple[list[int], str]:
    """The steps a training workdir has checkpoints of (oldest first), and the path of the
    model its run started from."""
    from aapo_jax import checkpoint, configs

    with checkpoint.Checkpointer(Path(workdir) / "checkpoints") as reader:
        steps = reader.all_steps()
        meta = reader.read_meta(steps[-1]) if steps else None
    source = configs.experiment_config(meta["config"]).model.path if meta else ""
    return steps, source


def checkpoints(models: Sequence[str], steps: str, with_base: bool) -> list[Checkpoint]:
    """The checkpoints that --model, --steps and --with_base name, with unique labels.

    Raises:
      ValueError: a --model that is neither kind (named), a --steps a workdir does not have,
        or a malformed --steps.
    """
    out: list[Checkpoint] = []
    for model in models:
        name = _slug(Path(model).resolve().name)
        if not evaluate_cli.is_training_workdir(model):
            out.append(Checkpoint(name, str(model)))
            continue
        saved, source = workdir_steps(model)
        if not saved:
            raise ValueError(f"--model={model}: a workdir with no saved checkpoint.")
        if steps == "latest":
            chosen = saved[-1:]
        elif steps == "all":
            chosen = saved
        else:
            try:
                chosen = sorted({int(s) for s in steps.split(",")})
            except ValueError:
                raise ValueError(
                    f"--steps={steps!r}: expected latest, all or comma-separated steps."
                ) from None
            missing = sorted(set(chosen) - set(saved))
            if missing:
                raise ValueError(
                    f"--steps: {model} has no checkpoint of steps {missing}; saved: {saved}."
                )
        if with_base:
            out.append(Checkpoint(f"{name}@step0", source, 0, str(model)))
        out += [Checkpoint(f"{name}@step{s}", str(model), s, str(model)) for s in chosen]
    labels = [c.label for c in out]
    return [
        dataclasses.replace(c, label=f"{c.label}-{i}") if labels.count(c.label) > 1 else c
        for i, c in enumerate(out)
    ]


def benchmark_files(directory: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """{benchmark: its file in `directory`} (NAME.jsonl or NAME.parquet).

    Raises:
      FileNotFoundError: naming each missing benchmark and the files `directory` holds.
    """
    root = Path(directory)
    found, missing = {}, []
    for name in names:
        paths = [root / f"{name}{s}" for s in SUFFIXES if (root / f"{name}{s}").is_file()]
        if paths:
            found[name] = paths[0]
        else:
            missing.append(name)
    if missing:
        held = sorted(p.name for p in root.iterdir()) if root.is_dir() else "no such directory"
        raise FileNotFoundError(
            f"--benchmarks={directory}: no {', '.join(f'{m}.jsonl' for m in missing)} "
            f"(holds: {held}); `python -m experiments.prepare_data benchmarks` writes them."
        )
    return found


def cell_path(out: Path, checkpoint: Checkpoint, benchmark: str, seed: int) -> Path:
    """Where one (checkpoint, benchmark, seed) cell's report is stored."""
    return out / CELLS / checkpoint.label / benchmark / f"seed{seed}.json"


def _write_json(path: Path, value) -> None:
    """Atomically: a cell is either whole or absent, so a rerun never reads half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def check_settings(out: Path, settings: dict) -> None:
    """Record the evaluation settings in OUT, or check a rerun uses the ones recorded (the
    seeds aside: a rerun with more seeds adds their cells to the stored ones).

    Raises:
      ValueError: naming each setting that differs from the stored cells' (use another --out).
    """
    settings = {k: v for k, v in settings.items() if k != "seeds"}
    path = out / SETTINGS_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        changed = sorted(
            k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k)
        )
        if changed:
            diffs = ", ".join(f"{k}: {stored.get(k)!r} → {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"--out={out} holds cells evaluated with other settings ({diffs}); "
                "use another --out, or delete it to start over."
            )
        return
    _write_json(path, settings)


def summarise(
    cells: dict[tuple[str, str, int], dict], order: Sequence[Checkpoint], names: Sequence[str]
) -> dict:
    """Per checkpoint and benchmark, accuracy mean ± 95% interval over seeds, and the
    average over benchmarks (per seed, over the seeds that have every benchmark).

    Args:
      cells: {(checkpoint label, benchmark, seed): that cell's report}.
    """
    rows = []
    for c in order:
        results = {}
        per_seed: dict[int, dict[str, float]] = {}
        for name in names:
            accs = {
                s: r["pass@1"]
                for (label, b, s), r in cells.items()
                if label == c.label and b == name
            }
            for seed, acc in accs.items():
                per_seed.setdefault(seed, {})[name] = acc
            if accs:
                mean, half = mean_ci(list(accs.values()))
                results[name] = dict(
                    mean=mean, ci95=half, seeds={str(s): a for s, a in sorted(accs.items())}
                )
                mine = [r for (label, b, _), r in cells.items() if label == c.label and b == name]
                for key in ("sample_completion_len", "sample_truncated_frac"):
                    if all(key in r for r in mine):
                        results[name][key.removeprefix("sample_")] = sum(
                            r[key] for r in mine
                        ) / len(mine)
        whole = {
            s: sum(v.values()) / len(names) for s, v in per_seed.items() if len(v) == len(names)
        }
        if whole:
            mean, half = mean_ci(list(whole.values()))
            results[AVERAGE] = dict(
                mean=mean, ci95=half, seeds={str(s): a for s, a in sorted(whole.items())}
            )
        rows.append(dict(**dataclasses.asdict(c), results=results))
    return dict(benchmarks=list(names), checkpoints=rows)


def markdown(summary: dict, settings: dict) -> str:
    """results.md: one row per checkpoint, accuracy in % (mean ± 95% interval over seeds)."""
    names = summary["benchmarks"]
    head = ["checkpoint", "step", *(TITLES.get(n, n) for n in names), "Avg"]
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for row in summary["checkpoints"]:
        cells = []
        for name in [*names, AVERAGE]:
            r = row["results"].get(name)
            if r is None:
                cells.append("–")
            elif len(r["seeds"]) > 1:
                cells.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}")
            else:
                cells.append(f"{100 * r['mean']:.1f}")
        step = "–" if row["step"] is None else str(row["step"])
        lines.append(f"| {row['label']} | {step} | {' | '.join(cells)} |")
    seeds = settings["seeds"]
    notes = [
        "",
        f"pass@1 in %, one sample per problem, mean ± 95% t-interval over {len(seeds)} seed(s) "
        f"{list(seeds)}; Avg is the unweighted mean of the benchmarks, per seed. Judge: "
        f"{settings['judge']}. Sampling: T={settings['temperature']}, top_p={settings['top_p']}, "
        f"≤ {settings['max_new_tokens']} new tokens and ≤ {settings['max_model_length']} tokens "
        f"in all; special tokens added: {settings['add_special_tokens']}.",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(summary: dict, path: Path) -> bool:
    """Accuracy against training step, one line per benchmark and the average, for each
    workdir evaluated at two or more steps. Returns whether a plot was written."""
    runs: dict[str, list[dict]] = {}
    for row in summary["checkpoints"]:
        if row["workdir"] is not None:
            runs.setdefault(row["workdir"], []).append(row)
    runs = {w: sorted(rows, key=lambda r: r["step"]) for w, rows in runs.items() if len(rows) > 1}
    if not runs:
        return False
    # Its own Agg canvas, not pyplot: the caller's backend (a notebook's) stays as it was.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6 * len(runs), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), squeeze=False)
    for ax, (workdir, rows) in zip(axes[0], runs.items(), strict=True):
        top = 0.0
        for name in [*summary["benchmarks"], AVERAGE]:
            points = [(r["step"], r["results"][name]) for r in rows if name in r["results"]]
            if not points:
                continue
            x = [p[0] for p in points]
            y = [100 * p[1]["mean"] for p in points]
            err = [100 * p[1]["ci95"] for p in points]
            style = dict(color="black", linewidth=2.5) if name == AVERAGE else {}
            ax.errorbar(
                x, y, yerr=err, marker="o", capsize=3, label=TITLES.get(name, "Avg"), **style
            )
            top = max(top, *(a + b for a, b in zip(y, err, strict=True)))
        ax.set(title=Path(workdir).name, xlabel="training step", ylabel="pass@1 (%)")
        ax.set_ylim(0, min(100.0, max(10.0, 1.15 * top)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from aapo_jax import evaluation

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", action="append", required=True, help="HF dir or training workdir (repeatable)"
    )
    p.add_argument("--benchmarks", required=True, help="directory of NAME.jsonl benchmark files")
    p.add_argument("--out", required=True, help="where cells and results go (reruns resume)")
    p.add_argument(
        "--paper",
        default="all",
        help="all, or comma-separated: " + ",".join(evaluation.PAPER_BENCHMARKS),
    )
    p.add_argument("--seeds", type=int, default=1, help="samples per problem, one per seed 0..N-1")
    p.add_argument(
        "--steps", default="latest", help="a workdir's checkpoints: latest, all, or N,M,..."
    )
    p.add_argument(
        "--with_base", action="store_true", help="also a workdir's source model, as step 0"
    )
    p.add_argument(
        "--judge", default=evaluation.PAPER_JUDGE, choices=sorted(evaluation.PAPER_JUDGES)
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each")
    p.add_argument("--max_new_tokens", type=int, default=evaluation.PAPER_SAMPLING.max_new_tokens)
    p.add_argument("--max_model_length", type=int, default=evaluation.PAPER_MAX_MODEL_LENGTH)
    p.add_argument(
        "--add_special_tokens",
        action=argparse.BooleanOptionalAction,
        default=evaluation.PAPER_ADD_SPECIAL_TOKENS,
        help="prompts tokenised with special tokens (a BOS), as lighteval's vLLM path does",
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument(
        "--kv_budget_gib", type=float, default=0.0, help="per-device KV budget (0: one pass)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="1,-1,1", help="DATA,FSDP,TENSOR device counts")
    p.add_argument("--timeout_s", type=float, default=30.0, help="judge time limit per completion")
    p.add_argument("--num_workers", type=int, default=2, help="judge worker processes")
    args = p.parse_args(argv)
    names = list(evaluation.PAPER_BENCHMARKS) if args.paper == "all" else args.paper.split(",")
    unknown = [n for n in names if n not in evaluation.PAPER_BENCHMARKS]
    if unknown or not names:
        p.error(
            f"--paper={args.paper}: unknown {unknown}; "
            f"valid: all or {sorted(evaluation.PAPER_BENCHMARKS)}."
        )
    args.names = names
    if args.seeds < 1:
        p.error(f"--seeds must be ≥ 1, got {args.seeds}.")
    if args.num_workers < 1:
        p.error(
            "--num_workers must be ≥ 1 (the judges score in worker processes), "
            f"got {args.num_workers}."
        )
    if args.max_new_tokens < 1 or args.max_model_length < 2:
        p.error("--max_new_tokens must be ≥ 1 and --max_model_length ≥ 2.")
    try:
        args.mesh = evaluate_cli.parse_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    return args


def _settings(args: argparse.Namespace) -> dict:
    from aapo_jax import evaluation

    return dict(
        judge=args.judge,
        seeds=list(range(args.seeds)),
        temperature=evaluation.PAPER_SAMPLING.temperature,
        top_p=evaluation.PAPER_SAMPLING.top_p,
        max_new_tokens=args.max_new_tokens,
        max_model_length=args.max_model_length,
        add_special_tokens=args.add_special_tokens,
        limit=args.limit,
        dtype=args.dtype,
    )


def _load(checkpoint: Checkpoint, args: argparse.Namespace, mesh):
    """(model, tokenizer) of a checkpoint, placed on `mesh` (`evaluate.load_model`: a
    workdir's step, or a Hugging Face directory such as `--with_base`'s source model)."""
    step = checkpoint.step if checkpoint.model == checkpoint.workdir else None
    model, tokenizer, _ = evaluate_cli.load_model(
        checkpoint.model, mesh=mesh, dtype=args.dtype, step=step
    )
    return model, tokenizer


def run(args: argparse.Namespace) -> dict:
    """Evaluate every missing cell, then write results.json, results.md and the plot."""
    import jax
    from tqdm.auto import tqdm

    from aapo_jax import evaluation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = benchmark_files(args.benchmarks, args.names)
    evaluate_cli.check_judge(args.judge, args.num_workers)
    settings = _settings(args)
    check_settings(out, settings)
    order = checkpoints(args.model, args.steps, args.with_base)
    seeds = settings["seeds"]
    todo = [
        (c, name, seed)
        for c in order
        for name in args.names
        for seed in seeds
        if not cell_path(out, c, name, seed).exists()
    ]
    total = len(order) * len(args.names) * len(seeds)
    print(f"{total - len(todo)} of {total} cells already in {out}; evaluating {len(todo)}.")
    mesh = evaluate_cli.make_mesh(args.mesh) if todo else None
    scorers: dict[str, object] = {}
    try:
        with tqdm(total=len(todo), desc="cells", unit="cell") as bar:
            loaded = None
            for c, name, seed in todo:
                if loaded is None or loaded[0] != c.label:
                    loaded = (c.label, *_load(c, args, mesh))
                _, model, tokenizer = loaded
                task = evaluation.paper_task(name, files[name], tokenizer, judge=args.judge)
                if task.verifier not in scorers:
                    scorers[task.verifier] = evaluation.make_scorer(
                        task.verifier, timeout_s=args.timeout_s, num_workers=args.num_workers
                    )
                examples = task.examples[: args.limit] if args.limit else task.examples
                bar.set_postfix_str(f"{c.label} {name} seed {seed}")
                start = time.perf_counter()
                report = evaluation.evaluate(
                    model,
                    tokenizer,
                    examples,
                    scorer=scorers[task.verifier],
                    prompt_fn=task.prompt_fn,
                    settings=dataclasses.replace(
                        evaluation.PAPER_SAMPLING, max_new_tokens=args.max_new_tokens
                    ),
                    n_samples=1,
                    k=1,
                    greedy=False,
                    rng=jax.random.key(seed),
                    extract_fn=evaluation.math_extract_fn,
                    details=True,
                    batch_size=args.batch_size,
                    mesh=mesh,
                    max_model_length=args.max_model_length,
                    add_special_tokens=args.add_special_tokens,
                    kv_budget_gib=args.kv_budget_gib,
                )
                report.update(
                    checkpoint=dataclasses.asdict(c),
                    benchmark=name,
                    file=str(files[name]),
                    verifier=task.verifier,
                    seed=seed,
                    seconds=round(time.perf_counter() - start, 1),
                )
                _write_json(cell_path(out, c, name, seed), report)
                bar.update(1)
    finally:
        for scorer in scorers.values():
            scorer.close()
    cells = {
        (c.label, name, seed): json.loads(cell_path(out, c, name, seed).read_text())
        for c in order
        for name in args.names
        for seed in seeds
    }
    summary = dict(settings=settings, **summarise(cells, order, args.names))
    _write_json(out / RESULTS_JSON, summary)
    (out / RESULTS_MD).write_text(markdown(summary, settings))
    if plot(summary, out / PLOT):
        summary["plot"] = str(out / PLOT)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: evaluate, then print the results table."""
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"paper_eval: {e}") from None
    print((Path(args.out) / RESULTS_MD).read_text())


if __name__ == "__main__":
    main()

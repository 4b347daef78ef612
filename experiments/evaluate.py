"""Evaluate a checkpoint: greedy accuracy, pass@1, pass@k and maj@k; a JSON report.

    python -m experiments.evaluate --model=aapo_jax/assets/quickstart --task=quickstart \\
        --n=4 --k=4 --out=report.json
    python -m experiments.evaluate --model=HF_DIR --task=gym:chain_sum \\
        --gym_kwargs='{"min_terms": 2, "max_terms": 3}' --n=8 --k=8
    python -m experiments.evaluate --model=HF_DIR --task=math500.jsonl --n=4 --k=4 \\
        --max_new_tokens=4096

Tasks:
- `quickstart`: the eval split of the task in `task.json` (read from --model, else from
  `aapo_jax/assets/quickstart`), its plain prompt template and the reasoning-gym scorer.
- `gym:NAME`: the eval split of `gym_splits(NAME, ...)` (--gym_kwargs, --train_size,
  --eval_size, --split_seed), prompt --template (default: the question), the task's scorer.
- `FILE.jsonl` or `.parquet`: the question and gold columns are auto-detected as in training;
  the paper's protocol: `PAPER_QUERY_TEMPLATE` in the chat template (when the tokenizer has
  one), math-verify with `\\boxed{}` first, temperature 0.6, top_p 0.95.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

QUICKSTART_DIR = Path(__file__).resolve().parent.parent / "aapo_jax" / "assets" / "quickstart"


@dataclasses.dataclass(frozen=True)
class Task:
    """What `evaluate` needs besides the model: problems, prompt, scorer and budget."""

    name: str
    examples: list
    prompt_fn: object
    score_fn: object
    extract_fn: object
    max_new_tokens: int | None = None


def read_task_json(model_dir: str | Path) -> dict:
    """task.json from the model directory, else the shipped quickstart one."""
    for directory in (Path(model_dir), QUICKSTART_DIR):
        path = directory / "task.json"
        if path.exists():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no task.json in {model_dir} or {QUICKSTART_DIR}.")


def load_task(args: argparse.Namespace, tokenizer) -> Task:
    """The `Task` that --task names."""
    from aapo_jax import evaluation
    from aapo_jax.data.sources import gym_splits
    from aapo_jax.rewards import extract_gym_answer

    if args.task == "quickstart":
        spec = read_task_json(args.model)
        _, examples = gym_splits(
            spec["name"],
            train_size=spec["train_size"],
            eval_size=spec["eval_size"],
            seed=spec["split_seed"],
            **spec["kwargs"],
        )
        return Task(
            name=f"quickstart:{spec['name']}",
            examples=examples,
            prompt_fn=evaluation.template_prompt_fn(spec["prompt_template"]),
            score_fn=evaluation.gym_score_fn(spec["name"]),
            extract_fn=extract_gym_answer,
            max_new_tokens=spec["max_new_tokens"],
        )
    if args.task.startswith("gym:"):
        name = args.task.removeprefix("gym:")
        _, examples = gym_splits(
            name,
            train_size=args.train_size,
            eval_size=args.eval_size,
            seed=args.split_seed,
            **json.loads(args.gym_kwargs),
        )
        return Task(
            name=args.task,
            examples=examples,
            prompt_fn=evaluation.template_prompt_fn(args.template),
            score_fn=evaluation.gym_score_fn(name),
            extract_fn=extract_gym_answer,
        )
    if args.task.endswith((".jsonl", ".parquet")):
        from aapo_jax.data.sources import read_records

        chat = bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template
        prompt_fn = (
            evaluation.template_prompt_fn(args.template)
            if args.template is not None
            else evaluation.paper_prompt_fn(tokenizer, use_chat_template=chat)
        )
        return Task(
            name=args.task,
            examples=read_records(args.task),
            prompt_fn=prompt_fn,
            score_fn=evaluation.math_score_fn(gold_boxed=True),
            extract_fn=evaluation.math_extract_fn,
        )
    raise ValueError(f"--task={args.task!r}: expected quickstart, gym:NAME or a .jsonl file.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    from aapo_jax import evaluation

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="a Hugging Face checkpoint dir or a training --workdir"
    )
    p.add_argument("--task", default="quickstart", help="quickstart | gym:NAME | FILE.jsonl")
    p.add_argument("--n", type=int, default=4, help="samples per problem (0: greedy only)")
    p.add_argument("--k", type=int, default=None, help="for pass@k and maj@k (default: --n)")
    p.add_argument("--temperature", type=float, default=evaluation.PAPER_TEMPERATURE)
    p.add_argument("--top_p", type=float, default=evaluation.PAPER_TOP_P)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the task's, or 512")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--no_greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--details", action="store_true", help="per-problem records in the report")
    p.add_argument("--template", default=None, help="plain prompt template with {question}")
    p.add_argument("--no_chat_template", action="store_true")
    p.add_argument("--gym_kwargs", default="{}", help="JSON task settings for gym:NAME")
    p.add_argument("--train_size", type=int, default=1000)
    p.add_argument("--eval_size", type=int, default=500)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = max(args.n, 1)
    return args


def run(args: argparse.Namespace) -> dict:
    """Load the model and task, evaluate, return the report."""
    import jax
    import jax.numpy as jnp

    from aapo_jax import evaluation, models
    from aapo_jax.data.tokenize import load_tokenizer

    source = str(args.model)
    if (Path(args.model) / "checkpoints").is_dir():  # a training workdir
        from aapo_jax import trainer

        model, config = trainer.load_trained_model(args.model)
        args.model = config.model.path  # its tokenizer and task.json
        tokenizer = load_tokenizer(config.model.tokenizer_path or config.model.path)
    else:
        tokenizer = load_tokenizer(args.model)
        model = models.load_hf_checkpoint(args.model, dtype=jnp.dtype(args.dtype))
    task = load_task(args, tokenizer)
    examples = task.examples[: args.limit] if args.limit else task.examples
    max_new_tokens = args.max_new_tokens or task.max_new_tokens or 512
    start = time.perf_counter()
    report = evaluation.evaluate(
        model,
        tokenizer,
        examples,
        score_fn=task.score_fn,
        prompt_fn=task.prompt_fn,
        n_samples=args.n,
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max_new_tokens,
        batch_size=args.batch_size,
        greedy=not args.no_greedy,
        rng=jax.random.key(args.seed),
        extract_fn=task.extract_fn,
        details=args.details,
    )
    return dict(
        model=source,
        task=task.name,
        seed=args.seed,
        seconds=round(time.perf_counter() - start, 1),
        **report,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: print the summary, write the report with --out."""
    args = parse_args(argv)
    report = run(args)
    summary = {k: v for k, v in report.items() if k != "problems"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

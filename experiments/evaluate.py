"""Evaluate a checkpoint: greedy accuracy, pass@1, pass@k and maj@k; a JSON report.

    python -m experiments.evaluate --model=aapo_jax/assets/quickstart --task=quickstart \\
        --n=4 --k=4 --out=report.json
    python -m experiments.evaluate --model=HF_DIR --task=gym:chain_sum \\
        --gym_kwargs='{"min_terms": 2, "max_terms": 3}' --n=8 --k=8
    python -m experiments.evaluate --model=HF_DIR --task=math500.jsonl --n=4 --k=4 \\
        --max_new_tokens=4096 --mesh=-1,1,1

Tasks, each with the host reward (`aapo_jax.rewards.get_host_reward`) that verifies it:
- `quickstart`: the eval split of the task in `task.json` (read from --model, else from
  `aapo_jax/assets/quickstart`), its plain prompt template; verifier `gym:NAME`.
- `gym:NAME`: the eval split of `gym_splits(NAME, ...)` (--gym_kwargs, --train_size,
  --eval_size, --split_seed), prompt --template (default: the question); verifier `gym:NAME`,
  the task's own scorer.
- `FILE.jsonl` or `.parquet`: the question and gold columns are auto-detected as in training;
  the paper's protocol: `PAPER_QUERY_TEMPLATE` in the chat template (when the tokenizer has
  one), temperature 0.6, top_p 0.95; verifier `accuracy_boxed_gold` (math-verify, `\\boxed{}`
  first, bare golds boxed).
- `--paper=BENCH` (aime24 | amc23 | math500 | minerva | olympiadbench) with a file task: the
  authors' whole protocol in one flag: one sample per problem at temperature 0.6, top_p 0.95,
  up to 32768 new tokens within a 32768-token model length (--max_model_length), the prompt
  tokenised with the tokenizer's special tokens (--add_special_tokens: a second BOS in front
  of the chat template's, for tokenizers that add one), as lighteval 0.8.1's vLLM path does;
  no greedy pass, the query template in the chat template, and lighteval's extractive match
  with the benchmark's gold column and format (`evaluation.PAPER_BENCHMARKS`: the question
  and gold columns pinned per benchmark). --max_model_length and --[no]add_special_tokens
  given explicitly override it. The answers are judged by lighteval 0.8.1 itself
  (--judge=lighteval-0.8.1, the default: install it once with `pip install --no-deps
  --target ~/.cache/aapo_jax/lighteval-0.8.1 -r requirements-lighteval.txt`) or by our
  math-verify transcription of its metric (--judge=math-verify, an approximation).
  `python -m experiments.paper_eval` runs all five benchmarks, seeds and checkpoints.

Budget: each row generates up to min(--max_new_tokens, --max_model_length − its prompt
tokens) tokens (vLLM's cap; no --max_model_length: --max_new_tokens). Memory: with
--kv_budget_gib=X each generate call decodes its rows in the fewest sequential passes whose
KV caches fit X GiB per device (the same tokens as one pass); `python -m experiments.plan
--evaluate ...` compiles the evaluation for a TPU slice and prints the X (and the
--batch_size and --mesh) that fit it.

`--import=my_module` (repeatable) imports your own module first, e.g. one that registers the
reward a training run used; a training --workdir re-imports the modules it was trained with.
The sampling flags are the fields of `sampling.SamplerSettings` (--temperature, --top_p,
--top_k, --min_p, --max_new_tokens): they form one record, checked before anything loads.

Every completion is scored by `evaluation.make_scorer(verifier)` in --num_workers worker
processes (0: in this process, bounded only by math-verify's own alarm): a sample that runs
past --timeout_s scores 0 and counts in the report's `scorer_timeouts`. --model is a Hugging
Face checkpoint directory or a training --workdir (its newest checkpoint); the model is placed
on the --mesh (DATA,FSDP,TENSOR device counts, one of them may be -1 for the remaining
devices) and each batch's rows are split over its data × fsdp devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from collections.abc import Sequence
from pathlib import Path

from aapo_jax import plugins

DEFAULT_MAX_NEW_TOKENS = 512
QUICKSTART_DIR = Path(__file__).resolve().parent.parent / "aapo_jax" / "assets" / "quickstart"


@dataclasses.dataclass(frozen=True)
class Task:
    """What `evaluate` needs besides the model: problems, prompt, verifier and budget.

    `verifier` is a host reward name (`aapo_jax.rewards.get_host_reward`), e.g.
    "gym:chain_sum" or "accuracy_boxed_gold".
    """

    name: str
    examples: list
    prompt_fn: object
    verifier: str
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
    from aapo_jax.rewards import GYM_PREFIX, extract_gym_answer

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
            verifier=f"{GYM_PREFIX}{spec['name']}",
            extract_fn=extract_gym_answer,
            max_new_tokens=spec["max_new_tokens"],
        )
    if args.task.startswith(GYM_PREFIX):
        name = args.task.removeprefix(GYM_PREFIX)
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
            verifier=args.task,
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
        if args.paper:
            paper = evaluation.paper_task(args.paper, args.task, tokenizer, judge=args.judge)
            return Task(*paper, extract_fn=evaluation.math_extract_fn)
        return Task(
            name=args.task,
            examples=read_records(args.task),
            prompt_fn=prompt_fn,
            verifier="accuracy_boxed_gold",
            extract_fn=evaluation.math_extract_fn,
        )
    raise ValueError(f"--task={args.task!r}: expected quickstart, gym:NAME or a .jsonl file.")


def parse_mesh(text: str) -> tuple[int, int, int]:
    """`"DATA,FSDP,TENSOR"` -> (data, fsdp, tensor) device counts; at most one may be -1.

    Raises:
      ValueError: not three integers ≥ 1 (or -1), or more than one -1; the message names
        --mesh.
    """
    parts = text.split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(s < 1 and s != -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(
            f"--mesh={text!r}: expected DATA,FSDP,TENSOR, three device counts ≥ 1 of which at "
            "most one may be -1 (the remaining devices), e.g. 1,-1,1."
        )
    return shape


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
    add_sampling_flags(p)
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
    p.add_argument(
        "--mesh",
        default="1,-1,1",
        help="DATA,FSDP,TENSOR device counts (one may be -1: the remaining devices)",
    )
    p.add_argument(
        "--timeout_s", type=float, default=5.0, help="verifier time limit per completion"
    )
    p.add_argument(
        "--num_workers", type=int, default=2, help="verifier processes (0: in this process)"
    )
    p.add_argument(
        "--max_model_length",
        type=int,
        default=None,
        help="cap prompt + completion at this many tokens, as vLLM does: a row's budget is "
        "min(--max_new_tokens, this − its prompt tokens) (default: no cap; --paper: "
        f"{evaluation.PAPER_MAX_MODEL_LENGTH})",
    )
    p.add_argument(
        "--add_special_tokens",
        dest="add_special_tokens",
        action="store_true",
        default=None,
        help="tokenise prompts with the tokenizer's special tokens (e.g. a BOS in front), as "
        "lighteval's vLLM path does (default: off; --paper: "
        f"{'on' if evaluation.PAPER_ADD_SPECIAL_TOKENS else 'off'})",
    )
    p.add_argument(
        "--noadd_special_tokens",
        "--no-add_special_tokens",
        dest="add_special_tokens",
        action="store_false",
        help="tokenise prompts as written (chat templates carry their own special tokens)",
    )
    p.add_argument(
        "--kv_budget_gib",
        type=float,
        default=0.0,
        help="per-device KV cache budget of a generate call: its rows decode in the fewest "
        "sequential passes that fit (0: one pass; experiments.plan --evaluate picks it)",
    )
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument(
        f"--{plugins.FLAG}", dest="imports", action="append", default=[], help=plugins.FLAG_HELP
    )
    p.add_argument(
        "--paper",
        default=None,
        choices=sorted(evaluation.PAPER_BENCHMARKS),
        help="the authors' evaluation protocol for this benchmark (a .jsonl/.parquet --task)",
    )
    p.add_argument(
        "--judge",
        default=evaluation.PAPER_JUDGE,
        choices=sorted(evaluation.PAPER_JUDGES),
        help="who decides --paper's answers: lighteval 0.8.1 itself (the authors' version, "
        "installed with requirements-lighteval.txt) or our math-verify transcription of it",
    )
    args = p.parse_args(argv)
    if args.paper:
        if not args.task.endswith((".jsonl", ".parquet")):
            p.error(f"--paper={args.paper} needs a .jsonl or .parquet --task, got {args.task!r}.")
        if args.template is not None or args.no_chat_template:
            p.error("--paper uses the paper's query in the chat template: drop --template.")
        args.n = args.k = evaluation.PAPER_SAMPLES
        args.no_greedy = True
        for name in sampling_flags():
            if name != "max_new_tokens":
                setattr(args, name, getattr(evaluation.PAPER_SAMPLING, name))
        args.max_new_tokens = args.max_new_tokens or evaluation.PAPER_SAMPLING.max_new_tokens
        if args.max_model_length is None:
            args.max_model_length = evaluation.PAPER_MAX_MODEL_LENGTH
        if args.add_special_tokens is None:
            args.add_special_tokens = evaluation.PAPER_ADD_SPECIAL_TOKENS
    args.add_special_tokens = bool(args.add_special_tokens)
    if args.max_model_length is not None and args.max_model_length < 1:
        p.error(f"--max_model_length must be ≥ 1 token, got {args.max_model_length}.")
    if not args.kv_budget_gib >= 0:
        p.error(f"--kv_budget_gib must be ≥ 0 GiB (0: one pass), got {args.kv_budget_gib}.")
    try:
        args.mesh = parse_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    if not args.timeout_s > 0:
        p.error(f"--timeout_s must be > 0 seconds, got {args.timeout_s}.")
    if args.num_workers < 0:
        p.error(f"--num_workers must be ≥ 0, got {args.num_workers}.")
    if args.k is None:
        args.k = max(args.n, 1)
    if args.n and args.temperature <= 0:
        p.error(
            f"--temperature={args.temperature}: sampling --n={args.n} needs > 0 (greedy: --n=0)."
        )
    try:
        plugins.import_modules(args.imports)
        args.sampling = sampler_settings(args)
    except (plugins.PluginError, ValueError) as e:
        p.error(str(e))
    return args


def sampling_flags() -> dict[str, type]:
    """The sampling flags: one per `sampling.SamplerSettings` field, with its type."""
    from aapo_jax.sampling import SamplerSettings

    hints = typing.get_type_hints(SamplerSettings)
    return {f.name: hints[f.name] for f in dataclasses.fields(SamplerSettings)}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--NAME for every `SamplerSettings` field, defaulting to the paper's evaluation sampling
    (`evaluation.PAPER_SAMPLING`), except the budget: the task's, else
    `DEFAULT_MAX_NEW_TOKENS`."""
    from aapo_jax import evaluation

    for name, kind in sampling_flags().items():
        if name == "max_new_tokens":
            default, shown = None, f"the task's, or {DEFAULT_MAX_NEW_TOKENS}"
        else:
            default = shown = getattr(evaluation.PAPER_SAMPLING, name)
        # A bool setting is --NAME / --noNAME; `type=bool` would read "False" as True.
        kind = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        p.add_argument(
            f"--{name}", **kind, default=default, help=f"SamplerSettings.{name} ({shown})"
        )


def sampler_settings(args: argparse.Namespace):
    """The `sampling.SamplerSettings` of the sampling flags; without --max_new_tokens the
    budget is the task's, else `DEFAULT_MAX_NEW_TOKENS` (`run` fills it in).

    Raises:
      ValueError: a setting out of range, named as its flag.
    """
    from aapo_jax.sampling import SamplerSettings

    values = {name: getattr(args, name) for name in sampling_flags()}
    if values["max_new_tokens"] is None:
        values["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    try:
        return SamplerSettings(**values)
    except ValueError as e:  # "config field sampling.top_k=..." -> "--top_k=..."
        raise ValueError(str(e).replace("config field sampling.", "--")) from None


# Files of which a Hugging Face checkpoint directory's tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_training_workdir(model: str | Path) -> bool:
    """Whether --model is a training workdir (True) or a Hugging Face checkpoint (False).

    Raises:
      ValueError: neither, naming --model and what it should hold (found before anything
        loads, rather than as a tokenizer error from transformers).
    """
    directory = Path(model)
    if (directory / "checkpoints").is_dir():
        return True
    has_config = (directory / "config.json").is_file()
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    if has_config and has_tokenizer:
        return False
    if not directory.exists():
        found = "does not exist"
    elif not directory.is_dir():
        found = "is not a directory"
    else:
        missing = [
            name
            for name, present in (("config.json", has_config), ("tokenizer file", has_tokenizer))
            if not present
        ]
        found = f"is a directory with no checkpoints/, no {', no '.join(missing)}"
    raise ValueError(
        f"--model={model} {found}; expected a training --workdir (with a "
        "checkpoints/ directory) or a Hugging Face checkpoint directory (config.json, "
        f"safetensors weights and a tokenizer: one of {', '.join(TOKENIZER_FILES)})."
    )


def check_judge(judge: str, num_workers: int) -> None:
    """Before anything loads: the paper's judge can run here.

    Raises:
      ValueError: lighteval 0.8.1 is not installed (with the command that installs it), or
        asked to judge in this process (--num_workers=0), which holds math-verify's
        latex2sympy2_extended.
    """
    from aapo_jax import evaluation
    from aapo_jax.rewards import lighteval_pinned

    if judge != evaluation.PAPER_JUDGE:
        return
    try:
        lighteval_pinned.check_available()
    except lighteval_pinned.LightevalUnavailable as e:
        raise ValueError(f"--judge={judge}: {e}") from None
    if num_workers < 1:
        raise ValueError(
            f"--judge={judge} scores in worker processes (its latex2sympy2_extended cannot share "
            "this one with math-verify's): --num_workers must be ≥ 1."
        )


def make_mesh(shape: tuple[int, int, int]):
    """The (data, fsdp, tensor) mesh of --mesh on this machine's devices."""
    from aapo_jax import sharding

    data, fsdp, tensor = shape
    try:
        return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    except ValueError as e:
        raise ValueError(f"--mesh={','.join(map(str, shape))}: {e}") from e


def load_model(model: str | Path, *, mesh, dtype: str, step: int | None = None):
    """(model, tokenizer, source directory) of --model placed on `mesh`: a training
    workdir's newest checkpoint (or its `step`), in the run's dtypes, with the tokenizer of
    the model the run started from; or a Hugging Face directory in `dtype`. The source
    directory holds the tokenizer (and a task.json)."""
    import jax.numpy as jnp

    from aapo_jax import models
    from aapo_jax.data.tokenize import load_tokenizer

    if is_training_workdir(model):
        from aapo_jax import trainer

        loaded, config = trainer.load_trained_model(model, step, mesh=mesh)
        tokenizer = load_tokenizer(config.model.tokenizer_path or config.model.path)
        return loaded, tokenizer, config.model.path
    if step is not None:
        raise ValueError(f"--model={model} is a Hugging Face directory: it has no step {step}.")
    loaded = models.load_hf_checkpoint(model, dtype=jnp.dtype(dtype), mesh=mesh)
    return loaded, load_tokenizer(model), str(model)


def run(args: argparse.Namespace) -> dict:
    """Load the model and task, evaluate, return the report."""
    import jax

    from aapo_jax import evaluation

    source = str(args.model)
    is_training_workdir(args.model)  # names a --model that is neither, before anything loads
    if args.paper:
        check_judge(args.judge, args.num_workers)
    mesh = make_mesh(args.mesh)
    model, tokenizer, args.model = load_model(args.model, mesh=mesh, dtype=args.dtype)
    task = load_task(args, tokenizer)
    examples = task.examples[: args.limit] if args.limit else task.examples
    settings = args.sampling
    if args.max_new_tokens is None and task.max_new_tokens:
        settings = dataclasses.replace(settings, max_new_tokens=task.max_new_tokens)
    start = time.perf_counter()
    with evaluation.make_scorer(
        task.verifier, timeout_s=args.timeout_s, num_workers=args.num_workers
    ) as scorer:
        report = evaluation.evaluate(
            model,
            tokenizer,
            examples,
            scorer=scorer,
            prompt_fn=task.prompt_fn,
            n_samples=args.n,
            k=args.k,
            settings=settings,
            batch_size=args.batch_size,
            greedy=not args.no_greedy,
            rng=jax.random.key(args.seed),
            extract_fn=task.extract_fn,
            details=args.details,
            mesh=mesh,
            max_model_length=args.max_model_length,
            add_special_tokens=args.add_special_tokens,
            kv_budget_gib=args.kv_budget_gib,
        )
    return dict(
        model=source,
        task=task.name,
        verifier=task.verifier,
        mesh=dict(mesh.shape),
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

"""Warm-up of the tiny quickstart model: supervised chain_sum answers until ~35% held-out accuracy.

    python -m experiments.pretrain_tiny --out=aapo_jax/assets/quickstart

The recipe (deterministic from --seed; a few minutes on 2 CPU cores):

1. Task: reasoning-gym `chain_sum` with `TASK_KWARGS` (2–3 terms of 2 digits, + and −).
   `gym_splits(TASK_NAME, train_size=TRAIN_SIZE, eval_size=EVAL_SIZE, seed=SPLIT_SEED)` gives
   disjoint train / eval problems; warm-up reads ONLY the train split (the eval split is used
   for the stopping rule and reported).
2. Tokenizer: a Qwen2-style byte-level BPE trained with `tokenizers` on the train prompts
   and saved as a `transformers.PreTrainedTokenizerFast` (`AutoTokenizer` loads it back as
   `Qwen2Tokenizer`, which rebuilds the same pipeline). Qwen2's split regex isolates every
   digit, so numbers are spelled digit by digit; merges make each boilerplate word one token
   (a prompt is 16–22 tokens). Special tokens `<pad>` (id 0), `<eos>` (id 1), `<unk>`; no BOS.
   Prompt: `PROMPT_TEMPLATE.format(question=...)`, i.e. the question, then a newline.
   Completion: the answer text (e.g. `-103`: `-`, `1`, `0`, `3`), then `<eos>`.
3. Model: a Qwen2-shaped `ModelConfig` (`MODEL_SHAPE`: 2 layers, width 128, 4 query / 2 KV
   heads of 32, MLP 256, qkv bias; ~0.37M parameters), trained with cross-entropy on the
   answer tokens + EOS given the left-padded prompt (AdamW, batch `--batch_size`).
4. Every `--eval_every` steps the held-out greedy accuracy on the 500 eval problems is
   measured with `aapo_jax.evaluation.evaluate` and the chain_sum scorer (the one every
   evaluation uses); training stops at the first check ≥ `--target`.
5. The output directory gets config.json + model.safetensors (`save_hf_checkpoint`), the
   tokenizer files, task.json (task settings, prompt template, splits, warm-up results and
   the suggested RL recipe that the quickstart config reuses) and a README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TASK_NAME = "chain_sum"
TASK_KWARGS = dict(min_terms=2, max_terms=3, min_digits=2, max_digits=2)
TRAIN_SIZE = 20_000
EVAL_SIZE = 500
SPLIT_SEED = 0
PROMPT_TEMPLATE = "{question}\n"
VERIFIER = f"gym:{TASK_NAME}"  # the host reward that scores completions
# Answers are at most 4 characters (-188 … 297); one more slot for EOS, one spare.
MAX_NEW_TOKENS = 6
MAX_PROMPT_LENGTH = 24  # the longest prompt is 22 tokens
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
BPE_VOCAB_SIZE = 512  # an upper bound: the trainer stops when no pair is left to merge

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    model_type="qwen2",
    qkv_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=64,
    rope_theta=10000.0,
)

# The RL recipe verified from the shipped checkpoint (see README.md in the output directory).
SUGGESTED_RL = dict(
    algorithm="aapo",
    group_size=8,
    prompts_per_step=64,
    learning_rate=3e-5,
    steps=300,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=MAX_NEW_TOKENS,
    max_prompt_length=MAX_PROMPT_LENGTH,
    reward="exact_match",
)


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
    """Hyper-parameters of the supervised warm-up."""

    seed: int = 0
    target: float = 0.35
    batch_size: int = 128
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    ship_ema: bool = False
    eval_every: int = 25
    max_steps: int = 5000


# ---------------------------------------------------------------------------
# Tokenizer and encoding


def build_tokenizer(texts: Sequence[str]):
    """A Qwen2-style byte-level BPE trained on `texts`, as a `PreTrainedTokenizerFast`.

    The pipeline is exactly the one `transformers.Qwen2Tokenizer` rebuilds from vocab + merges
    (NFC, Qwen2's split regex, byte-level), because `AutoTokenizer` loads a directory whose
    config.json says `qwen2` as that class, whatever tokenizer.json holds. The regex isolates
    every digit, so numbers are spelled digit by digit; the merges make each boilerplate word
    one token. The alphabet is all 256 bytes, so no text is ever lost.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    pad, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        padding_side="left",
    )


def check_saved_tokenizer(tokenizer, path: Path, texts: Sequence[str]) -> None:
    """Raise unless `load_tokenizer(path)` encodes and decodes `texts` as `tokenizer` does."""
    from aapo_jax.data.tokenize import load_tokenizer

    loaded = load_tokenizer(path)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        again = loaded(text, add_special_tokens=False)["input_ids"]
        if ids != again or loaded.decode(again) != text:
            raise RuntimeError(
                f"the tokenizer saved in {path} ({type(loaded).__name__}) encodes {text!r} as "
                f"{again}, the trained one as {ids}."
            )
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(loaded, name) != getattr(tokenizer, name):
            raise RuntimeError(f"the saved tokenizer's {name} changed.")


def prompt_text(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt for one question."""
    return template.format(question=question)


def encode_sft(tokenizer, examples, *, template: str = PROMPT_TEMPLATE) -> dict[str, np.ndarray]:
    """Left-padded prompts [N, P] and right-padded completions (answer + EOS) [N, T].

    The answer tokens are `aapo_jax.data.encode_targets`, the `exact_match` reward's targets.
    """
    from aapo_jax.data import encode_targets
    from aapo_jax.data.tokenize import tokenize_prompts

    prompt_ids, prompt_mask = tokenize_prompts(
        tokenizer, [prompt_text(e.question, template) for e in examples], length=MAX_PROMPT_LENGTH
    )
    targets, lengths = encode_targets(tokenizer, [e.answer for e in examples])
    t = targets.shape[1] + 1
    completion_ids = np.full((len(examples), t), tokenizer.pad_token_id, np.int32)
    completion_ids[:, : targets.shape[1]] = np.where(targets >= 0, targets, completion_ids[:, :-1])
    completion_ids[np.arange(len(examples)), lengths] = tokenizer.eos_token_id
    completion_mask = (np.arange(t)[None, :] <= lengths[:, None]).astype(np.int32)
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
    )


# ---------------------------------------------------------------------------
# Model and training


def model_config(tokenizer):
    """The tiny Qwen2-shaped `ModelConfig` for this tokenizer."""
    from aapo_jax.models import ModelConfig

    return ModelConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )


def make_sft_step(graphdef, tx, ema_decay: float = 0.0):
    """`step(params, opt_state, ema, batch) -> (params, opt_state, ema, loss)`: cross-entropy.

        loss = − Σ_{n,t} m_{n,t} log π(y_{n,t} | prompt_n, y_{n,<t}) / Σ_{n,t} m_{n,t}
        ema ← ema_decay · ema + (1 − ema_decay) · params     (after the AdamW update)

    The log-probs are `aapo_jax.logprobs.completion_logprobs`, the RL update's own. The weight
    average `ema` is what gets evaluated and shipped: it smooths the step-to-step swings of
    greedy accuracy, so the stopping rule does not pick a lucky spike. Jit it yourself.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from aapo_jax.logprobs import completion_logprobs

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logp, _ = completion_logprobs(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"],
            batch["completion_mask"],
        )
        mask = batch["completion_mask"].astype(jnp.float32)
        return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def step(params, opt_state, ema, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, opt_state, ema, loss

    return step


def greedy_accuracy(model, tokenizer, examples, *, template: str = PROMPT_TEMPLATE) -> float:
    """Held-out greedy accuracy with the chain_sum scorer (as `experiments.evaluate` reports)."""
    from aapo_jax import evaluation
    from aapo_jax.sampling import SamplerSettings

    # In-process: the chain_sum scorer is an integer compare, nothing can hang.
    with evaluation.make_scorer(VERIFIER, num_workers=0) as scorer:
        report = evaluation.evaluate(
            model,
            tokenizer,
            examples,
            scorer=scorer,
            prompt_fn=evaluation.template_prompt_fn(template),
            settings=SamplerSettings(max_new_tokens=MAX_NEW_TOKENS),
            n_samples=0,
            greedy=True,
            batch_size=len(examples),
            progress=False,
        )
    return report["greedy_accuracy"]


def warmup(settings: WarmupSettings, train, evaluation_set, tokenizer):
    """Train until the shipped weights' eval greedy accuracy first reaches `settings.target`.

    Both the last iterate and its EMA are kept; `settings.ship_ema` picks the one that is
    checked and shipped (default: the last iterate, as the prototype recipe did).

    Returns:
      (shipped model, the other model, history) where history lists
      {"step", "loss", "eval_accuracy", "seconds"} of the shipped weights.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    from aapo_jax import configs
    from aapo_jax.models import Transformer
    from aapo_jax.optim import make_optimizer

    model = Transformer(model_config(tokenizer), rngs=nnx.Rngs(settings.seed))
    optim = configs.OptimConfig(
        learning_rate=settings.learning_rate,
        schedule=settings.schedule,
        final_lr_fraction=0.0,
        warmup_ratio=settings.warmup_steps / settings.max_steps,
        total_steps=settings.max_steps,
        weight_decay=settings.weight_decay,
    )
    tx = make_optimizer(optim)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    step_fn = jax.jit(make_sft_step(graphdef, tx, settings.ema_decay), donate_argnums=(0, 1, 2))
    data = encode_sft(tokenizer, train)
    order = np.random.default_rng(settings.seed)
    history = []
    start = time.perf_counter()
    losses = []
    bar = tqdm(range(1, settings.max_steps + 1), desc="warm-up")
    for step in bar:
        idx = order.integers(0, len(train), settings.batch_size)
        batch = {name: jnp.asarray(array[idx]) for name, array in data.items()}
        params, opt_state, ema, loss = step_fn(params, opt_state, ema, batch)
        losses.append(loss)
        if step % settings.eval_every:
            continue
        shipped = ema if settings.ship_ema else params
        acc = greedy_accuracy(nnx.merge(graphdef, shipped), tokenizer, evaluation_set)
        mean_loss = float(np.mean(jax.device_get(losses)))
        losses = []
        history.append(
            dict(
                step=step,
                loss=mean_loss,
                eval_accuracy=acc,
                seconds=round(time.perf_counter() - start, 1),
            )
        )
        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{acc:.3f}")
        bar.write(json.dumps(history[-1]))
        if acc >= settings.target:
            break
    bar.close()
    if settings.ship_ema:
        params, ema = ema, params
    return nnx.merge(graphdef, params), nnx.merge(graphdef, ema), history


# ---------------------------------------------------------------------------
# Output


def task_spec() -> dict:
    """The task settings the quickstart config reuses (written to task.json)."""
    return dict(
        name=TASK_NAME,
        kwargs=dict(TASK_KWARGS),
        train_size=TRAIN_SIZE,
        eval_size=EVAL_SIZE,
        split_seed=SPLIT_SEED,
        prompt_template=PROMPT_TEMPLATE,
        completion="the answer text, then <eos>",
        max_prompt_length=MAX_PROMPT_LENGTH,
        max_new_tokens=MAX_NEW_TOKENS,
        scorer=f"reasoning-gym {TASK_NAME} score_answer (host reward {VERIFIER!r})",
    )


README = """\
# Quickstart checkpoint: a tiny warm-started chain_sum model

Made by `python -m experiments.pretrain_tiny --out=aapo_jax/assets/quickstart`
(seed {seed}, {seconds:.0f} s on 2 CPU cores; see that module's docstring for the recipe).

- Task: reasoning-gym `{name}` with `{kwargs}`; splits from
  `aapo_jax.data.sources.gym_splits("{name}", train_size={train_size}, eval_size={eval_size},
  seed={split_seed}, **kwargs)`. Warm-up trained on the train split only.
- Prompt: `{template!r}.format(question=...)`; completion: the answer, then `<eos>`.
- Tokenizer: Qwen2-style byte-level BPE, {vocab} tokens, one token per digit
  (`<pad>`=0, `<eos>`=1, `<unk>`=2).
- Model: Qwen2-shaped, {layers} layers, width {hidden}, {params:,} parameters (fp32).
- Supervised warm-up: {steps} steps of batch {batch_size}, AdamW lr {lr}.
- Held-out greedy accuracy (chain_sum scorer): **{acc:.1%}** on the {eval_size} eval problems,
  {acc100:.1%} on the first 100.
- Suggested RL recipe (task.json `rl`): {rl}.
{rl_result}"""


def write_assets(out: Path, model, tokenizer, settings, history, extra: dict) -> dict:
    """Save the checkpoint, tokenizer, task.json and README.md into `out`."""
    from aapo_jax.models import save_hf_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(model, out)
    tokenizer.save_pretrained(out)
    check_saved_tokenizer(tokenizer, out, extra.pop("check_texts"))
    spec = task_spec()
    spec["warmup"] = dict(
        settings=dataclasses.asdict(settings),
        steps=history[-1]["step"],
        history=history,
        **extra,
    )
    spec["rl"] = dict(SUGGESTED_RL)
    (out / "task.json").write_text(json.dumps(spec, indent=2) + "\n")
    (out / "README.md").write_text(
        README.format(
            seed=settings.seed,
            seconds=extra["seconds"],
            name=TASK_NAME,
            kwargs=TASK_KWARGS,
            train_size=TRAIN_SIZE,
            eval_size=EVAL_SIZE,
            split_seed=SPLIT_SEED,
            template=PROMPT_TEMPLATE,
            vocab=len(tokenizer),
            layers=MODEL_SHAPE["num_layers"],
            hidden=MODEL_SHAPE["hidden_size"],
            params=model.config.num_params,
            steps=history[-1]["step"],
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
            acc=extra["eval_accuracy"],
            acc100=extra["eval_accuracy_first100"],
            rl=", ".join(f"{k}={v}" for k, v in SUGGESTED_RL.items()),
            rl_result=extra.get("rl_result", ""),
        )
    )
    return spec


def run(out: Path, settings: WarmupSettings) -> dict:
    """The whole recipe: splits → tokenizer → warm-up → assets. Returns the task.json dict."""
    from aapo_jax.data.sources import gym_splits

    start = time.perf_counter()
    train, evaluation_set = gym_splits(
        TASK_NAME, train_size=TRAIN_SIZE, eval_size=EVAL_SIZE, seed=SPLIT_SEED, **TASK_KWARGS
    )
    tokenizer = build_tokenizer([prompt_text(e.question) for e in train])
    model, other, history = warmup(settings, train, evaluation_set, tokenizer)
    acc = history[-1]["eval_accuracy"]
    acc100 = greedy_accuracy(model, tokenizer, evaluation_set[:100])
    other_name = "last_iterate" if settings.ship_ema else "ema"
    extra = dict(
        shipped="ema" if settings.ship_ema else "last_iterate",
        eval_accuracy=acc,
        **{f"{other_name}_eval_accuracy": greedy_accuracy(other, tokenizer, evaluation_set)},
        eval_accuracy_first100=acc100,
        seconds=round(time.perf_counter() - start, 1),
        check_texts=[prompt_text(e.question) for e in evaluation_set]
        + [e.answer for e in evaluation_set],
    )
    return write_assets(out, model, tokenizer, settings, history, extra)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, WarmupSettings]:
    """Command-line flags: --out and the `WarmupSettings` fields."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("aapo_jax/assets/quickstart"))
    for field in dataclasses.fields(WarmupSettings):
        if isinstance(field.default, bool):
            kind = dict(action=argparse.BooleanOptionalAction)
        else:
            kind = dict(type=type(field.default))
        parser.add_argument(f"--{field.name}", default=field.default, **kind)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(WarmupSettings)}
    return args.out, WarmupSettings(**values)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    out, settings = parse_args(argv)
    spec = run(out, settings)
    warm = spec["warmup"]
    print(
        f"wrote {out}: {warm['steps']} steps, eval greedy accuracy {warm['eval_accuracy']:.3f} "
        f"(first 100: {warm['eval_accuracy_first100']:.3f}) in {warm['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()

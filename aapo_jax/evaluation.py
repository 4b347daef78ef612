"""Evaluation: greedy accuracy, pass@1, unbiased pass@k and maj@k with the training verifiers.

Completions are scored by a `rewards.RewardScorer` (time-bounded per sample, in worker
processes), the same scorer type the training loop's rewards go through; the
trainer's periodic evaluation is `evaluate` with greedy decoding.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from aapo_jax import rewards, sampling, sharding
from aapo_jax.data.sources import Example
from aapo_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    decode_completions,
    format_prompt,
    tokenize_prompts,
)
from aapo_jax.sampling import SamplerSettings

# prompt_fn(example) -> prompt text. extract_fn(completion) -> the answer that majority voting
# compares (None: no answer).
PromptFn = Callable[[Example], str]
ExtractFn = Callable[[str], Hashable | None]

# ---------------------------------------------------------------------------
# The paper's evaluation protocol (the authors' eval scripts, built on lighteval / open-r1):
# zero-shot, chat template, this query, temperature 0.6, top_p 0.95, up to 32768 new tokens,
# math-verify extraction with \boxed{} first.

PAPER_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response "
    "should be of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. "
    "I hope it is correct' (without quotes) where ANSWER is just the final number or expression "
    "that solves the problem. Think step by step before answering.\n\n{question}"
)
PAPER_SAMPLING = SamplerSettings(max_new_tokens=32768, temperature=0.6, top_p=0.95)
PAPER_SAMPLES = 1
# Per benchmark, as the authors' lighteval tasks read it: the question column, the gold
# column and the verifier that parses the gold (expressions for AIME24 / AMC23, LaTeX on the
# worked `solution` for MATH-500 / Minerva, LaTeX on `answer` for OlympiadBench, whose
# question is `question`: its files carry other text columns too, so nothing is guessed).
PAPER_BENCHMARKS = {
    "aime24": ("problem", "answer", "lighteval_expr_gold"),
    "amc23": ("problem", "answer", "lighteval_expr_gold"),
    "math500": ("problem", "solution", "lighteval_latex_gold"),
    "minerva": ("problem", "solution", "lighteval_latex_gold"),
    "olympiadbench": ("question", "answer", "lighteval_latex_gold"),
}


def paper_prompt_fn(tokenizer, *, use_chat_template: bool = True) -> PromptFn:
    """The paper's prompt: `PAPER_QUERY_TEMPLATE` as the user turn of the chat template."""

    def prompt_fn(example: Example) -> str:
        return format_prompt(
            tokenizer,
            example.question,
            template=PAPER_QUERY_TEMPLATE,
            use_chat_template=use_chat_template,
        )

    return prompt_fn


def template_prompt_fn(template: str | None = None) -> PromptFn:
    """A plain prompt: `template.format(question=...)` (None: the question itself)."""

    def prompt_fn(example: Example) -> str:
        return example.question if template is None else template.format(question=example.question)

    return prompt_fn


def make_scorer(
    verifier: str, *, timeout_s: float = 5.0, num_workers: int = 2
) -> rewards.RewardScorer:
    """A time-bounded scorer for the host reward `verifier` (`rewards.get_host_reward`).

    E.g. "accuracy_boxed_gold" (math-verify, bare golds boxed), "accuracy" (golds parsed
    as LaTeX) or "gym:chain_sum" (a reasoning-gym task's own scorer). A score ≥ 1.0 is a
    correct completion. Close it (or use it as a context manager) to stop its workers.
    """
    return rewards.RewardScorer(
        rewards.get_host_reward(verifier), timeout_s=timeout_s, num_workers=num_workers
    )


def math_extract_fn(completion: str) -> str | None:
    """The completion's final answer as math-verify extracts it (`\\boxed{}` first), or None."""
    from math_verify import parse

    try:
        parsed = parse(completion, parsing_timeout=None)
    except Exception:  # an unparsable answer is no answer
        return None
    return str(parsed[-1]) if parsed else None


# ---------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021).

        pass@k = 1 − C(n − c, k) / C(n, k)

    Raises:
      ValueError: unless 0 ≤ c ≤ n and 1 ≤ k ≤ n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 ≤ c ≤ n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 ≤ k ≤ n, got n={n}, k={k}.")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n−c, k)/C(n, k) = Π_{i=n−c+1..n} (1 − k/i).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[Hashable | None]) -> tuple[Hashable | None, int]:
    """The most frequent answer (None entries ignored) and the index of its first occurrence.

    Ties go to the answer that occurs first, so the result is deterministic. Returns
    (None, -1) when no answer is given.
    """
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None, -1
    first = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            first.setdefault(answer, i)
    winner = max(counts, key=lambda a: (counts[a], -first[a]))
    return winner, first[winner]


# ---------------------------------------------------------------------------
# Generation


def _generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    settings: SamplerSettings,
    batch_size: int,
    rng: jax.Array,
    buckets: Sequence[int] | None,
    mesh: Mesh | None,
    bar,
    decode_weights: str = "auto",
) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """[B][n] completion texts, their lengths int[B, n] and truncation flags bool[B, n]."""
    eos = sampling.eos_ids(tokenizer.eos_token_id)
    layout, _ = sampling.decode_copies(
        decode_weights, nnx.state(model), model.config.compute_dtype, mesh, batch_size
    )
    config = sampling.SamplingConfig(
        settings,
        eos,
        pad_token_id=tokenizer.pad_token_id,
        num_samples=num_samples,
        decode_weights=layout,
    )
    texts, lengths, truncated = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        # A short last batch is padded with copies so every batch reuses one compiled program.
        chunk += [chunk[0]] * (batch_size - real)
        ids, mask = tokenize_prompts(tokenizer, chunk, buckets=buckets)
        (out,) = sampling.generate_many(
            [model],
            ids,
            mask,
            rngs=[jax.random.fold_in(rng, start)],
            config=config,
            buckets=buckets,
            mesh=mesh,
        )
        # Every process reads every row (an all-gather across processes); no log-probs.
        out = sharding.to_host(out.replace(logprobs=None))
        decoded = decode_completions(tokenizer, out.tokens, out.lengths)
        n_len = out.lengths.reshape(batch_size, num_samples)
        last = out.tokens[:, -1].reshape(batch_size, num_samples)
        # A row that used the whole budget and did not end on EOS was cut off.
        cut = (n_len == settings.max_new_tokens) & ~np.isin(last, eos)
        for b in range(real):
            texts.append(decoded[b * num_samples : (b + 1) * num_samples])
        lengths.append(n_len[:real])
        truncated.append(cut[:real])
        if bar is not None:
            bar.update(real)
    return texts, np.concatenate(lengths), np.concatenate(truncated)


def _score(
    scorer: rewards.RewardScorer,
    texts: list[list[str]],
    examples: Sequence[Example],
    counts: collections.Counter,
) -> np.ndarray:
    """f32[B, n] scores of every completion; the scorer's timeouts and errors are counted."""
    n = len(texts[0]) if texts else 0
    flat = [t for row in texts for t in row]
    repeated = [e for e in examples for _ in range(n)]
    result = scorer.score(
        flat, [e.answer for e in repeated], entries=[dict(e.entry) for e in repeated]
    )
    counts.update({k: int(result.stats[k]) for k in (rewards.TIMEOUTS, rewards.ERRORS)})
    return np.asarray(result.rewards, np.float32).reshape(len(texts), n)


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    scorer: rewards.RewardScorer,
    prompt_fn: PromptFn,
    settings: SamplerSettings,
    n_samples: int = 1,
    k: int = 1,
    batch_size: int = 64,
    greedy: bool = True,
    rng: jax.Array | None = None,
    extract_fn: ExtractFn | None = None,
    details: bool = False,
    progress: bool = True,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    mesh: Mesh | None = None,
    decode_weights: str = "auto",
) -> dict[str, Any]:
    """Greedy accuracy and sampled pass@1 / pass@k / maj@k of a model on problems.

    A completion is correct when `scorer` gives it ≥ 1.0 (partial credit is averaged into
    `*_score` means but never counts as correct). With c correct out of n samples:

        pass@1 = mean_problems c / n
        pass@k = mean_problems 1 − C(n − c, k) / C(n, k)
        maj@k  = mean_problems [the majority answer of the first k samples is correct]

    The majority answer is taken over `extract_fn(completion)` (default: the stripped
    completion), ties going to the answer sampled first; its correctness is that of the first
    sample giving it.

    Args:
      model: an NNX `Transformer`.
      tokenizer: its transformers tokenizer (EOS stops generation; pad fills the prompt).
      examples: the problems.
      scorer: the verifier, time-bounded per sample (`make_scorer`); each completion is
        scored with its example's gold `answer` and dataset `entry`.
      prompt_fn: example → prompt text.
      settings: how the samples are drawn and the completion budget (the paper's:
        `PAPER_SAMPLING`); the greedy pass uses only the budget.
      n_samples: sampled completions per problem (0: greedy only).
      k: for pass@k and maj@k, 1 ≤ k ≤ n_samples.
      batch_size: prompts per generate call (each gives n_samples rows).
      greedy: also decode greedily once per problem (`greedy_accuracy`).
      rng: PRNG key of the samples (default key 0).
      extract_fn: answer extraction for majority voting.
      details: include per-problem records under `problems`.
      progress: show tqdm bars.
      buckets: prompt length buckets (None: pad to the longest prompt).
      mesh: split each batch's rows over this mesh's data × fsdp devices (the model
        should be placed on it, e.g. by `load_hf_checkpoint(..., mesh=)`).
      decode_weights: where the decode loop reads the weights on `mesh`
        (`sampling.decode_weights`: "auto", "tensor", "replicated" or "sharded"; see
        `sampling.decode_copies`).

    Returns:
      A dict with `num_problems`, the settings, and as computed: `greedy_accuracy`,
      `greedy_score`, `pass@1`, `pass@k`, `maj@k`, `sample_score`, mean completion lengths
      and truncated fractions, `scorer_timeouts` and `scorer_errors` (samples that scored
      0 because the verifier ran out of time or raised); `problems` with `details`.
    """
    if not examples:
        raise ValueError("evaluate needs at least one example.")
    if n_samples < 0:
        raise ValueError(f"n_samples must be ≥ 0, got {n_samples}.")
    if n_samples and not 1 <= k <= n_samples:
        raise ValueError(f"k must be in [1, n_samples={n_samples}], got {k}.")
    if not greedy and not n_samples:
        raise ValueError("nothing to evaluate: greedy=False and n_samples=0.")
    if n_samples and settings.greedy:
        raise ValueError(
            f"sampling needs temperature > 0, got {settings.temperature} (use greedy)."
        )
    from tqdm.auto import tqdm  # deferred: only needed when evaluating

    rng = jax.random.key(0) if rng is None else rng
    extract = extract_fn or (lambda text: text.strip() or None)
    prompts = [prompt_fn(e) for e in examples]
    common = dict(
        batch_size=min(batch_size, len(prompts)),
        buckets=buckets,
        mesh=mesh,
        decode_weights=decode_weights,
    )
    scorer_counts: collections.Counter = collections.Counter()
    report: dict[str, Any] = dict(
        num_problems=len(examples),
        n_samples=n_samples,
        k=k if n_samples else None,
        temperature=settings.temperature if n_samples else None,
        top_p=settings.top_p if n_samples else None,
        top_k=settings.top_k if n_samples else None,
        min_p=settings.min_p if n_samples else None,
        max_new_tokens=settings.max_new_tokens,
    )
    records: list[dict[str, Any]] = [
        dict(question=e.question, answer=e.answer, prompt=p)
        for e, p in zip(examples, prompts, strict=True)
    ]

    if greedy:
        with tqdm(total=len(prompts), desc="greedy", disable=not progress, leave=False) as bar:
            texts, lengths, cut = _generate_texts(
                model,
                tokenizer,
                prompts,
                num_samples=1,
                settings=SamplerSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0),
                rng=rng,
                bar=bar,
                **common,
            )
        scores = _score(scorer, texts, examples, scorer_counts)[:, 0]
        report.update(
            greedy_accuracy=float(np.mean(scores >= 1.0)),
            greedy_score=float(np.mean(scores)),
            greedy_completion_len=float(np.mean(lengths)),
            greedy_truncated_frac=float(np.mean(cut)),
        )
        for record, row, score in zip(records, texts, scores, strict=True):
            record.update(greedy_completion=row[0], greedy_score=float(score))

    if n_samples:
        with tqdm(
            total=len(prompts), desc=f"sample×{n_samples}", disable=not progress, leave=False
        ) as bar:
            texts, lengths, cut = _generate_texts(
                model,
                tokenizer,
                prompts,
                num_samples=n_samples,
                settings=settings,
                rng=jax.random.fold_in(rng, 1),
                bar=bar,
                **common,
            )
        scores = _score(scorer, texts, examples, scorer_counts)
        correct = scores >= 1.0
        counts = correct.sum(axis=1)
        pass_k = [pass_at_k(n_samples, int(c), k) for c in counts]
        maj = []
        for i, (record, row) in enumerate(zip(records, texts, strict=True)):
            winner, first = majority_vote([extract(t) for t in row[:k]])
            maj.append(bool(correct[i, first]) if first >= 0 else False)
            record.update(
                completions=row,
                scores=[float(x) for x in scores[i]],
                majority_answer=None if winner is None else str(winner),
            )
        report.update(
            {
                "pass@1": float(np.mean(counts / n_samples)),
                f"pass@{k}": float(np.mean(pass_k)),
                f"maj@{k}": float(np.mean(maj)),
                "sample_score": float(np.mean(scores)),
                "sample_completion_len": float(np.mean(lengths)),
                "sample_truncated_frac": float(np.mean(cut)),
            }
        )
    report.update(
        scorer_timeouts=scorer_counts[rewards.TIMEOUTS], scorer_errors=scorer_counts[rewards.ERRORS]
    )
    if details:
        report["problems"] = records
    return report

"""Evaluation: greedy accuracy, pass@1, unbiased pass@k and maj@k with the training verifiers.

Completions are scored by a `rewards.RewardScorer` (time-bounded per sample, in worker
processes), the same scorer type the training loop's rewards go through; the
trainer's periodic evaluation is `evaluate` with greedy decoding.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from aapo_jax import rewards, sampling, sharding
from aapo_jax.data.sources import Example
from aapo_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    decode_completions,
    encode_prompts,
    format_prompt,
    left_pad,
)
from aapo_jax.models.config import ModelConfig
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
# lighteval 0.8.1's vLLM path (`lighteval vllm "...,max_model_length=32768,..."
# --use-chat-template`, lighteval/models/vllm/vllm_model.py): the chat-templated prompt is
# tokenised with `tokenizer(context, add_special_tokens=True)` (VLLMModelConfig's default),
# so a tokenizer that adds a BOS puts one more in front of the template's own; its context
# truncation is a no-op there (max_new_tokens = max_model_length: `input[-0:]`), and vLLM
# ends a request at max_model_length tokens, prompt included. Each row's completion budget
# is min(max_new_tokens, max_model_length − its prompt tokens) (`completion_budgets`).
PAPER_MAX_MODEL_LENGTH = 32768
PAPER_ADD_SPECIAL_TOKENS = True
# Per benchmark, as the authors' lighteval tasks read it: the question column, the gold
# column and the gold's format (expressions for AIME24 / AMC23, LaTeX on the worked `solution`
# for MATH-500 / Minerva, LaTeX on `answer` for OlympiadBench, whose question is `question`:
# its files carry other text columns too, so nothing is guessed).
PAPER_BENCHMARKS = {
    "aime24": ("problem", "answer", "expr"),
    "amc23": ("problem", "answer", "expr"),
    "math500": ("problem", "solution", "latex"),
    "minerva": ("problem", "solution", "latex"),
    "olympiadbench": ("question", "answer", "latex"),
}
# Problems per benchmark as released (the authors' lighteval tasks' repositories).
PAPER_BENCHMARK_ROWS = {
    "aime24": 30,
    "amc23": 40,
    "math500": 500,
    "minerva": 272,
    "olympiadbench": 675,
}
# Who judges the paper's evaluation, as a host reward name per gold format: lighteval 0.8.1
# itself, the authors' pinned version (`rewards.lighteval_pinned`, installed apart with
# requirements-lighteval.txt), or our transcription of its metric onto math-verify (an
# approximation: the two differ on e.g. `25\%` against `25`, `3.14159` against `\pi`).
PAPER_JUDGES = {
    "lighteval-0.8.1": "lighteval081_{}_gold",
    "math-verify": "lighteval_{}_gold",
}
PAPER_JUDGE = "lighteval-0.8.1"


class PaperTask(NamedTuple):
    """One benchmark under the paper's protocol: its problems (question and gold from the
    pinned columns), the prompt (`paper_prompt_fn`) and the judge's host reward name."""

    name: str
    examples: list[Example]
    prompt_fn: PromptFn
    verifier: str


def paper_verifier(benchmark: str, judge: str = PAPER_JUDGE) -> str:
    """The host reward that judges `benchmark` (a `PAPER_BENCHMARKS` name) under `judge` (a
    `PAPER_JUDGES` name).

    Raises:
      ValueError: an unknown benchmark or judge, naming the valid ones.
    """
    if benchmark not in PAPER_BENCHMARKS:
        raise ValueError(f"benchmark {benchmark!r}; valid: {sorted(PAPER_BENCHMARKS)}")
    if judge not in PAPER_JUDGES:
        raise ValueError(f"judge {judge!r}; valid: {sorted(PAPER_JUDGES)}")
    return PAPER_JUDGES[judge].format(PAPER_BENCHMARKS[benchmark][2])


def paper_task(benchmark: str, path: str, tokenizer, *, judge: str = PAPER_JUDGE) -> PaperTask:
    """`benchmark`'s problems from the local file `path` (.jsonl or .parquet), under the
    paper's protocol: the pinned question and gold columns, the query in the tokenizer's
    chat template (plain if it has none), and the `judge`'s verifier.

    Raises:
      ValueError: an unknown benchmark or judge, or a file without the pinned columns
        (naming the columns it has).
    """
    from aapo_jax.data.sources import read_records

    verifier = paper_verifier(benchmark, judge)
    question_key, answer_key, _ = PAPER_BENCHMARKS[benchmark]
    chat = bool(getattr(tokenizer, "chat_template", None))
    return PaperTask(
        name=f"{benchmark}:{path}",
        examples=read_records(str(path), question_key=question_key, answer_key=answer_key),
        prompt_fn=paper_prompt_fn(tokenizer, use_chat_template=chat),
        verifier=verifier,
    )


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


def completion_budgets(
    prompt_lengths: Sequence[int], max_new_tokens: int, max_model_length: int | None = None
) -> np.ndarray:
    """Each prompt's completion budget, int[B]: as vLLM caps a request under lighteval.

        budget_b = min(max_new_tokens, max_model_length − prompt_tokens_b)

    (max_new_tokens alone when `max_model_length` is None). `prompt_lengths` count the
    tokens the model is given, special tokens added by the tokenizer included.

    Raises:
      ValueError: a prompt leaves no room for a completion (budget ≤ 0), naming the first
        such prompt and the numbers.
    """
    lengths = np.asarray(prompt_lengths, np.int64)
    budgets = np.full(lengths.shape, max_new_tokens, np.int64)
    if max_model_length is None:
        return budgets
    budgets = np.minimum(budgets, max_model_length - lengths)
    if np.any(budgets <= 0):
        i = int(np.argmax(budgets <= 0))
        raise ValueError(
            f"prompt {i} has {lengths[i]} tokens (special tokens included), which leaves no "
            f"room for a completion under max_model_length={max_model_length} "
            f"({np.sum(budgets <= 0)} of {len(lengths)} prompts are that long): raise "
            "max_model_length or shorten the prompts."
        )
    return budgets


def kv_cache_bytes(
    model_config: ModelConfig,
    settings: SamplerSettings,
    mesh: Mesh | None,
    prompts: int,
    prompt_len: int,
    num_samples: int,
    *,
    layout: str = "sharded",
) -> int:
    """Per-device bytes of an evaluation decode's KV caches: `prompts` prompts of `prompt_len`
    (padded) tokens, `num_samples` rows each, `settings.max_new_tokens` slots a row, one model
    (`sampling.device_kv_cache_bytes`, decode `layout`)."""
    return sampling.device_kv_cache_bytes(
        model_config,
        mesh,
        prompts=prompts,
        samples=num_samples,
        prompt_len=prompt_len,
        max_new_tokens=settings.max_new_tokens,
        shared_prompt=settings.shared_prompt,
        layout=layout,
    )


def decode_passes(
    model_config: ModelConfig,
    settings: SamplerSettings,
    mesh: Mesh | None,
    prompts: int,
    prompt_len: int,
    num_samples: int,
    *,
    kv_budget_gib: float,
    layout: str = "sharded",
) -> int:
    """The sequential decode passes (`SamplingConfig.passes`) of one generate call of
    `prompts` prompts under a per-device KV budget (GiB; 0: one pass):
    `sampling.device_decode_passes` in the decode `layout`.

    Raises:
      ValueError: one prompt's caches alone exceed the budget (named as
        `sampling.kv_budget_gib`, the rollout's field of the same meaning).
    """
    return sampling.device_decode_passes(
        model_config,
        mesh,
        prompts=prompts,
        samples=num_samples,
        prompt_len=prompt_len,
        max_new_tokens=settings.max_new_tokens,
        shared_prompt=settings.shared_prompt,
        kv_budget_gib=kv_budget_gib,
        layout=layout,
    )


def _generate_texts(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    budgets: np.ndarray,
    *,
    num_samples: int,
    settings: SamplerSettings,
    batch_size: int,
    rng: jax.Array,
    buckets: Sequence[int] | None,
    mesh: Mesh | None,
    bar,
    decode_weights: str = "auto",
    kv_budget_gib: float = 0.0,
) -> tuple[list[list[str]], np.ndarray, np.ndarray, int]:
    """[B][n] completion texts, their lengths int[B, n], truncation flags bool[B, n] and the
    most decode passes a batch took.

    Every batch decodes `budgets.max()` new tokens (one static shape for the whole
    evaluation, so one program per prompt bucket); each row is then cut at its own prompt's
    budget. Autoregressive decoding makes the kept tokens those a per-row budget gives: the
    same tokens greedily, and with sampling the same draws (a step's uniforms depend on the
    step, not on the budget: `sampling.draw_uniforms`).
    """
    eos = sampling.eos_ids(tokenizer.eos_token_id)
    settings = dataclasses.replace(settings, max_new_tokens=int(budgets.max()))
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
    texts, lengths, truncated, most_passes = [], [], [], 1
    for start in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[start : start + batch_size])
        caps = budgets[start : start + batch_size]
        real = len(chunk)
        # A short last batch is padded with copies so every batch reuses one compiled program.
        chunk += [chunk[0]] * (batch_size - real)
        caps = np.repeat(np.pad(caps, (0, batch_size - real), constant_values=caps[0]), num_samples)
        ids, mask = left_pad(chunk, tokenizer.pad_token_id, buckets=buckets)
        passes = decode_passes(
            model.config,
            settings,
            mesh,
            batch_size,
            ids.shape[1],
            num_samples,
            kv_budget_gib=kv_budget_gib,
            layout=layout,
        )
        most_passes = max(most_passes, passes)
        (out,) = sampling.generate_many(
            [model],
            ids,
            mask,
            rngs=[jax.random.fold_in(rng, start)],
            config=dataclasses.replace(config, passes=passes),
            buckets=buckets,
            mesh=mesh,
        )
        # Every process reads every row (an all-gather across processes); no log-probs.
        out = sharding.to_host(out.replace(logprobs=None))
        kept = np.minimum(out.lengths, caps)
        decoded = decode_completions(tokenizer, out.tokens, kept)
        last = np.take_along_axis(out.tokens, kept[:, None] - 1, axis=1)[:, 0]
        # A row that used its whole budget and did not end on EOS was cut off.
        cut = (kept == caps) & ~np.isin(last, eos)
        for b in range(real):
            texts.append(decoded[b * num_samples : (b + 1) * num_samples])
        lengths.append(kept.reshape(batch_size, num_samples)[:real])
        truncated.append(cut.reshape(batch_size, num_samples)[:real])
        if bar is not None:
            bar.update(real)
    return texts, np.concatenate(lengths), np.concatenate(truncated), most_passes


def _batch_size(batch_size: int, problems: int, mesh: Mesh | None) -> int:
    """Prompts per generate call: `batch_size`, or fewer for fewer problems, rounded up to a
    multiple of the mesh's data × fsdp devices so that the rows split over them (30 AIME
    problems on 8 devices: 32, two of them padding, not 30 rows on every device)."""
    if problems >= batch_size:
        return batch_size
    ways = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-problems // ways) * ways


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
    max_model_length: int | None = None,
    add_special_tokens: bool = False,
    kv_budget_gib: float = 0.0,
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
      max_model_length: cap prompt + completion at this many tokens, as vLLM does under
        lighteval: each row's completion budget is min(settings.max_new_tokens,
        max_model_length − its prompt tokens) (`completion_budgets`; the paper's:
        `PAPER_MAX_MODEL_LENGTH`). None: settings.max_new_tokens for every row.
      add_special_tokens: tokenise the prompts with the tokenizer's special tokens (a BOS in
        front, for tokenizers that add one), as lighteval does (`PAPER_ADD_SPECIAL_TOKENS`);
        they count in the prompt tokens.
      kv_budget_gib: per-device KV cache budget of a generate call (GiB): its rows are
        decoded in the fewest sequential passes whose caches fit (`decode_passes`; the
        tokens are one pass's). 0: one pass. `experiments/plan.py --evaluate` picks it.

    Returns:
      A dict with `num_problems`, the settings (`max_model_length`, `add_special_tokens`,
      `kv_budget_gib` and `passes`: the most decode passes a generate call took), and as
      computed: `greedy_accuracy`, `greedy_score`, `pass@1`, `pass@k`, `maj@k`,
      `sample_score`, mean completion lengths and truncated fractions (a row is truncated
      when it used its whole budget without EOS), `scorer_timeouts` and `scorer_errors`
      (samples that scored 0 because the verifier ran out of time or raised); `problems`
      with `details`.

    Raises:
      ValueError: bad settings, or a prompt with no room left under `max_model_length`.
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
    if max_model_length is not None and max_model_length < 1:
        raise ValueError(f"max_model_length must be ≥ 1 (None: no cap), got {max_model_length}.")
    if kv_budget_gib < 0:
        raise ValueError(f"kv_budget_gib must be ≥ 0 GiB (0: one pass), got {kv_budget_gib}.")
    prompts = [prompt_fn(e) for e in examples]
    prompt_ids = encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    budgets = completion_budgets(
        [len(ids) for ids in prompt_ids], settings.max_new_tokens, max_model_length
    )
    common = dict(
        batch_size=_batch_size(batch_size, len(prompts), mesh),
        buckets=buckets,
        mesh=mesh,
        decode_weights=decode_weights,
        kv_budget_gib=kv_budget_gib,
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
        max_model_length=max_model_length,
        add_special_tokens=add_special_tokens,
        kv_budget_gib=kv_budget_gib,
        passes=1,
    )
    records: list[dict[str, Any]] = [
        dict(question=e.question, answer=e.answer, prompt=p)
        for e, p in zip(examples, prompts, strict=True)
    ]

    if greedy:
        with tqdm(total=len(prompts), desc="greedy", disable=not progress, leave=False) as bar:
            texts, lengths, cut, passes = _generate_texts(
                model,
                tokenizer,
                prompt_ids,
                budgets,
                num_samples=1,
                settings=SamplerSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0),
                rng=rng,
                bar=bar,
                **common,
            )
        report["passes"] = max(report["passes"], passes)
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
            texts, lengths, cut, passes = _generate_texts(
                model,
                tokenizer,
                prompt_ids,
                budgets,
                num_samples=n_samples,
                settings=settings,
                rng=jax.random.fold_in(rng, 1),
                bar=bar,
                **common,
            )
        report["passes"] = max(report["passes"], passes)
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

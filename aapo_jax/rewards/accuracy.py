"""Math-verify accuracy rewards (both AAPO reference variants) and the cosine length-scaled one."""

import functools
import itertools
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from aapo_jax.rewards.base import (
    GOLD_UNPARSABLE,
    TIMEOUTS,
    Stats,
    as_rewards,
    binary_rewards,
    check_batch,
    record,
)

# math-verify's own per-operation timeouts (integer seconds, signal.alarm based). They only work
# in the main thread of a process: elsewhere they are switched off (see `_alarm_timeout`), and the
# hard per-sample bound of `RewardScorer`'s worker processes is what keeps a sample from hanging.
DEFAULT_MATH_VERIFY_TIMEOUT_S = 1

# Defaults of open-r1 / open-rs `get_cosine_scaled_reward`.
COSINE_DEFAULTS = dict(
    min_value_wrong=-1.0,
    max_value_wrong=-0.5,
    min_value_correct=0.5,
    max_value_correct=1.0,
    max_len=1000,
)


# What `cosine` measures a completion's length in.
LENGTH_UNITS = ("tokens", "chars")


class _Configs(NamedTuple):
    gold_latex: list[Any]
    gold_boxed: list[Any]
    completion: list[Any]
    completion_with_expr: list[Any]


class _DropDeprecatedEquationsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "equations=True in NormalizationConfig is deprecated" not in record.getMessage()


@functools.cache
def _configs() -> _Configs:
    """Builds the math-verify extraction configs once per process (imports math-verify lazily)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # equations=True still shortens `a = b = 3` to `3`, but latex2sympy2 logs a deprecation
    # warning on every normalisation; keep the behaviour of the reference code, drop the spam.
    logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(
        _DropDeprecatedEquationsWarning()
    )
    completion_latex = LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False,
            malformed_operators=False,
            basic_latex=True,
            equations=True,
            boxed="all",
            units=True,
        ),
        boxed_match_priority=0,  # \boxed{} is tried first
        try_extract_without_anchor=False,
    )
    return _Configs(
        gold_latex=[LatexExtractionConfig()],
        gold_boxed=[LatexExtractionConfig(), ExprExtractionConfig()],
        completion=[completion_latex],
        completion_with_expr=[completion_latex, ExprExtractionConfig()],
    )


def _alarm_timeout(timeout_s: int | None) -> int | None:
    # signal.alarm only works in the main thread; math-verify raises ValueError elsewhere.
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(timeout_s))


def _parse(
    text: str, config: list[Any], timeout_s: int | None, mode: str = "first_match"
) -> tuple[list[Any], bool]:
    """math_verify.parse in `mode` (first_match / any_match); returns (parsed, timed_out).

    Errors parse to [].
    """
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        parsed = parse(
            text,
            extraction_config=config,
            extraction_mode=mode,
            parsing_timeout=timeout_s,
            raise_on_error=True,
        )
    except TimeoutException:
        return [], True
    except Exception:  # math-verify's own non-raising mode also maps errors to []
        return [], False
    return parsed, False


def _verify(
    gold: list[Any], pred: list[Any], timeout_s: int | None, float_rounding: int = 6
) -> tuple[bool, bool]:
    """math_verify.verify(gold, pred, float_rounding=); returns (verified, timed_out).

    Same semantics as `verify(gold, pred)` (any pair of extractions matches; a pair that errors
    or times out counts as no match), but one pair at a time so that a timeout can be counted.
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for g, p in itertools.product(gold, pred):
        try:
            if verify(
                g, p, float_rounding=float_rounding, timeout_seconds=timeout_s, raise_on_error=True
            ):
                return True, timed_out
        except TimeoutException:
            timed_out = True
        except Exception:  # as in math-verify: a pair that errors is no match
            continue
    return False, timed_out


def is_correct(
    completion: str,
    gold: str,
    *,
    gold_boxed: bool = False,
    extract_expressions: bool = False,
    math_verify_timeout_s: int | None = DEFAULT_MATH_VERIFY_TIMEOUT_S,
    stats: Stats | None = None,
) -> bool | None:
    """Whether the completion's final answer equals the gold answer; None if the gold is unparsable.

    Gold: parsed as LaTeX (`gold_boxed=False`, the open-rs `accuracy_reward`: the gold must be
    LaTeX, e.g. `$0.5$`, `\\frac{1}{2}` or a solution with `\\boxed{}`; a bare `0.5` does not
    parse), or wrapped as `$\\boxed{gold}$` and parsed with the default LaTeX + expression
    configs (`gold_boxed=True`, the SimpleRL `accuracy_reward_lv35`; bare numbers parse).
    Completion: LaTeX extraction with `\\boxed{}` first, no anchor-less matches, the reference's
    normalisation; with `extract_expressions=True` also plain expressions (then `the answer is 2`
    without a box counts). Both in first_match mode, then `verify(gold, pred)`.

    Timeouts (math-verify's own, `math_verify_timeout_s` seconds per operation, main thread only)
    make the answer wrong and are counted in `stats["timeouts"]`.
    """
    configs = _configs()
    return _match(
        completion,
        f"$\\boxed{{{gold}}}$" if gold_boxed else gold,
        configs.gold_boxed if gold_boxed else configs.gold_latex,
        configs.completion_with_expr if extract_expressions else configs.completion,
        timeout_s=_alarm_timeout(math_verify_timeout_s),
        stats=stats,
    )


def _match(
    completion: str,
    gold: str,
    gold_config: list[Any],
    pred_config: list[Any],
    *,
    pred_mode: str = "first_match",
    float_rounding: int = 6,
    raw_gold_fallback: bool = False,
    timeout_s: int | None,
    stats: Stats | None,
) -> bool | None:
    """Parse the gold (first match) and the completion (`pred_mode`), then verify.

    An unparsable gold is counted and gives None, or with `raw_gold_fallback` is kept as its
    raw string (lighteval's fallback), which matches an extraction of the same text.
    Timeouts make the answer wrong and are counted.
    """
    gold_parsed, gold_timed_out = _parse(gold, gold_config, timeout_s)
    if not gold_parsed:
        record(stats, TIMEOUTS if gold_timed_out else GOLD_UNPARSABLE)
        if not raw_gold_fallback or gold_timed_out:
            return None
        gold_parsed = [gold.strip()]
    pred_parsed, timed_out = _parse(completion, pred_config, timeout_s, pred_mode)
    verified = False
    if pred_parsed:
        verified, timed_out = _verify(gold_parsed, pred_parsed, timeout_s, float_rounding)
    if timed_out:
        record(stats, TIMEOUTS)
    return verified


def accuracy(
    completions: Sequence[str],
    *,
    answers: Sequence[str],
    extract_expressions: bool = False,
    math_verify_timeout_s: int | None = DEFAULT_MATH_VERIFY_TIMEOUT_S,
    stats: Stats | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Accuracy, gold parsed as LaTeX (open-rs `accuracy_reward`): 1.0 if verified else 0.0.

    An unparsable gold gives 0.0 and is counted in `stats["gold_unparsable"]` (open-r1 gives
    1.0). See `is_correct` for the extraction rules.

    Returns:
      f32[N] in {0, 1}.
    """
    del kwargs
    correct = functools.partial(
        is_correct,
        gold_boxed=False,
        extract_expressions=extract_expressions,
        math_verify_timeout_s=math_verify_timeout_s,
        stats=stats,
    )
    return binary_rewards(completions, answers, correct)


def accuracy_boxed_gold(
    completions: Sequence[str],
    *,
    answers: Sequence[str],
    extract_expressions: bool = False,
    math_verify_timeout_s: int | None = DEFAULT_MATH_VERIFY_TIMEOUT_S,
    stats: Stats | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Accuracy, gold wrapped as `$\\boxed{gold}$` (SimpleRL `accuracy_reward_lv35`).

    For bare gold answers (`0.5`, `-4`, `\\frac{1}{2}`). An unparsable gold gives 0.0 and is
    counted in `stats["gold_unparsable"]`. See `is_correct` for the extraction rules.

    Returns:
      f32[N] in {0, 1}.
    """
    del kwargs
    correct = functools.partial(
        is_correct,
        gold_boxed=True,
        extract_expressions=extract_expressions,
        math_verify_timeout_s=math_verify_timeout_s,
        stats=stats,
    )
    return binary_rewards(completions, answers, correct)


# lighteval's math metrics as open-r1 / open-rs define them (`latex_gold_metric`,
# `expr_gold_metric`): floats compared to 5 decimals.
LIGHTEVAL_PRECISION = 5
LIGHTEVAL_GOLDS = ("latex", "expr")


@functools.cache
def _lighteval_configs() -> tuple[dict[str, list[Any]], list[Any]]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    golds = {"latex": [LatexExtractionConfig()], "expr": [ExprExtractionConfig()]}
    return golds, [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)]


def lighteval_correct(
    completion: str,
    gold: str,
    *,
    gold_as: str,
    math_verify_timeout_s: int | None = DEFAULT_MATH_VERIFY_TIMEOUT_S,
    stats: Stats | None = None,
) -> bool | None:
    """lighteval's extractive match transcribed onto math-verify: the prediction parsed as an
    expression AND as LaTeX (`\\boxed{}` first, any match, the first match as fallback), the
    gold as LaTeX (`gold_as="latex"`: MATH-500, Minerva, OlympiadBench) or as an expression
    ("expr": AIME24, AMC23), then `verify` with floats rounded to 5 decimals. A gold nothing
    parses is compared as its raw string, as lighteval does (a bare `7` under LaTeX matches a
    prediction that extracts `7` verbatim); it is counted in `stats["gold_unparsable"]`, and
    timeouts in `stats["timeouts"]`.

    An approximation: math-verify ≥ 0.9 decides some pairs differently from lighteval 0.8.1,
    the authors' version (`\\boxed{25\\%}` against `25`, `3.14159` against `\\pi`: yes here,
    no there). `lighteval_pinned.lighteval_correct` runs lighteval 0.8.1 itself.
    """
    if gold_as not in LIGHTEVAL_GOLDS:
        raise ValueError(f"gold_as={gold_as!r}; valid: {LIGHTEVAL_GOLDS}")
    golds, pred_config = _lighteval_configs()
    return _match(
        completion,
        gold,
        golds[gold_as],
        pred_config,
        pred_mode="any_match",
        float_rounding=LIGHTEVAL_PRECISION,
        raw_gold_fallback=True,
        timeout_s=_alarm_timeout(math_verify_timeout_s),
        stats=stats,
    )


def lighteval_accuracy(
    completions: Sequence[str],
    *,
    answers: Sequence[str],
    gold_as: str = "latex",
    math_verify_timeout_s: int | None = DEFAULT_MATH_VERIFY_TIMEOUT_S,
    stats: Stats | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """1.0 per completion that `lighteval_correct` accepts, else 0.0 (the paper's evaluation).

    Returns:
      f32[N] in {0, 1}.
    """
    del kwargs
    correct = functools.partial(
        lighteval_correct, gold_as=gold_as, math_verify_timeout_s=math_verify_timeout_s, stats=stats
    )
    return binary_rewards(completions, answers, correct)


def cosine_value(
    length: float,
    correct: bool,
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: float = 1000,
    clip: bool = True,
) -> float:
    """The open-r1 cosine schedule for one completion.

        progress = length / max_len (clipped to [0, 1] if `clip`);   c = cos(π · progress)
        correct: min_value_correct + ½ (max_value_correct − min_value_correct)(1 + c)
        wrong:   max_value_wrong   + ½ (min_value_wrong   − max_value_wrong  )(1 + c)

    Short correct answers get max_value_correct, long ones min_value_correct; short wrong answers
    get min_value_wrong (the largest penalty), long ones max_value_wrong. open-r1 / open-rs do
    not clip (`clip=False`): past max_len the cosine rises again, so a correct answer of
    2·max_len scores max_value_correct as if it were empty. `clip=True` holds the value at
    max_len from there on.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    progress = length / max_len
    if clip:
        progress = min(max(progress, 0.0), 1.0)
    cosine = math.cos(progress * math.pi)
    if correct:
        low, high = min_value_correct, max_value_correct
    else:
        low, high = max_value_wrong, min_value_wrong
    return low + 0.5 * (high - low) * (1.0 + cosine)


def cosine(
    completions: Sequence[str],
    *,
    answers: Sequence[str],
    completion_lengths: Sequence[int] | np.ndarray | None = None,
    min_value_wrong: float = COSINE_DEFAULTS["min_value_wrong"],
    max_value_wrong: float = COSINE_DEFAULTS["max_value_wrong"],
    min_value_correct: float = COSINE_DEFAULTS["min_value_correct"],
    max_value_correct: float = COSINE_DEFAULTS["max_value_correct"],
    max_len: float = COSINE_DEFAULTS["max_len"],
    length_unit: str = "tokens",
    clip: bool = True,
    gold_boxed: bool = False,
    extract_expressions: bool = False,
    math_verify_timeout_s: int | None = DEFAULT_MATH_VERIFY_TIMEOUT_S,
    stats: Stats | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Cosine length-scaled accuracy (open-r1 / open-rs `get_cosine_scaled_reward`).

    Correctness as in `accuracy` (`gold_boxed=True`: as in `accuracy_boxed_gold`), then
    `cosine_value`. `length_unit="tokens"`: the length is `completion_lengths[i]` (what the
    trainer passes) when given, else `len(completions[i])`; `"chars"`: always the completion's
    length in characters, what open-r1 / open-rs measure (max_len is then in characters too).
    `clip`: see `cosine_value`. An unparsable gold gives 0.0 and is counted (open-r1 gives 1.0).
    Use `make_cosine_reward(...)` for other parameters.

    Returns:
      f32[N] in [min_value_wrong, max_value_correct] (0.0 for an unparsable gold).
    """
    del kwargs
    n = check_batch(completions, answers)
    if length_unit not in LENGTH_UNITS:
        raise ValueError(f"length_unit={length_unit!r}; valid: {LENGTH_UNITS}")
    if length_unit == "chars":
        completion_lengths = None
    if completion_lengths is not None and len(completion_lengths) != n:
        raise ValueError(f"completion_lengths has {len(completion_lengths)} entries, expected {n}")
    values = []
    for i, (completion, gold) in enumerate(zip(completions, answers, strict=True)):
        correct = is_correct(
            completion,
            gold,
            gold_boxed=gold_boxed,
            extract_expressions=extract_expressions,
            math_verify_timeout_s=math_verify_timeout_s,
            stats=stats,
        )
        if correct is None:
            values.append(0.0)
            continue
        length = len(completion) if completion_lengths is None else float(completion_lengths[i])
        values.append(
            cosine_value(
                length,
                correct,
                min_value_wrong=min_value_wrong,
                max_value_wrong=max_value_wrong,
                min_value_correct=min_value_correct,
                max_value_correct=max_value_correct,
                max_len=max_len,
                clip=clip,
            )
        )
    return as_rewards(values)


def make_cosine_reward(**params: Any) -> functools.partial:
    """`cosine` with other parameters (names as in `cosine`); picklable for worker processes."""
    allowed = {
        *COSINE_DEFAULTS,
        "length_unit",
        "clip",
        "gold_boxed",
        "extract_expressions",
        "math_verify_timeout_s",
    }
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown cosine reward parameters {unknown}; valid: {sorted(allowed)}")
    if params.get("length_unit", "tokens") not in LENGTH_UNITS:
        raise ValueError(f"length_unit={params['length_unit']!r}; valid: {LENGTH_UNITS}")
    if "max_len" in params and params["max_len"] <= 0:
        raise ValueError(f"max_len must be positive, got {params['max_len']}")
    return functools.partial(cosine, **params)

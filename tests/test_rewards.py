"""Tests for aapo_jax.rewards: math-verify accuracy, format, cosine, gym, sums, scorer, tokens."""

import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aapo_jax import rewards
from aapo_jax.rewards import (
    CRASHED,
    ERRORS,
    GOLD_UNPARSABLE,
    KILLED,
    TIMEOUTS,
    RewardContractError,
    RewardScorer,
    accuracy,
    accuracy_boxed_gold,
    cosine,
    cosine_value,
    extract_gym_answer,
    format_reward,
    format_think_close,
    get_host_reward,
    make_cosine_reward,
    make_gym_reward,
    tag_count,
    weighted_sum,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"  # verify against 42 runs CPU-bound for minutes
TIMEOUT_S = 2.0
# Killing a worker and reading its replacement's first answer is well under a second here; the
# bound leaves room for a loaded 2-core CI machine.
SLACK_S = 3.0

COT = "<think>\nHalf of one is one half.\n</think>\n<answer>\n$\\boxed{\\frac{1}{2}}$\n</answer>"


def _raising_reward(completions, *, answers, **kwargs):
    """A host reward that raises for completions containing 'boom'."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return np.ones(len(completions), np.float32)


def _crashing_reward(completions, *, answers, **kwargs):
    """A host reward whose process dies (as on a segfault or OOM kill) on 'crash'."""
    if any("crash" in c for c in completions):
        os._exit(3)
    return np.ones(len(completions), np.float32)


HANG_S = 60.0  # a stuck reward: far past every timeout_s here


def _sleeps_on_hang(completions, *, answers, **kwargs):
    """1.0 for each completion, but 'hang' sleeps for HANG_S first."""
    if "hang" in completions:
        time.sleep(HANG_S)
    return np.ones(len(completions), np.float32)


def _spins_on_hang(completions, *, answers, **kwargs):
    """1.0 for each completion, but 'hang' spins in a pure-Python loop for HANG_S first."""
    end = time.monotonic() + HANG_S
    while "hang" in completions and time.monotonic() < end:
        pass
    return np.ones(len(completions), np.float32)


def _swallows_on_hang(completions, *, answers, **kwargs):
    """Like `_sleeps_on_hang`, but swallowing every Exception while it sleeps."""
    end = time.monotonic() + HANG_S
    while "hang" in completions and time.monotonic() < end:
        try:
            time.sleep(0.1)
        except Exception:
            pass
    return np.ones(len(completions), np.float32)


def _hangs_on_warmup(completions, *, answers, **kwargs):
    """1.0 for each completion, but the scorer's warm-up call never returns."""
    if list(completions) == ["warmup"]:
        time.sleep(3600)
    return np.ones(len(completions), np.float32)


def _returns(value, completions, *, answers, **kwargs):
    """A host reward that returns `value`, whatever it is asked."""
    return value


def _one(fn, completion, gold, **kwargs):
    return float(fn([completion], answers=[gold], **kwargs)[0])


# -- accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (COT, "0.5", 1.0),
        (r"The result is \boxed{2}.", "2", 1.0),
        (r"$\boxed{-4}$", "-4", 1.0),
        (r"\boxed{x^2 + 2x}", "x(x+2)", 1.0),
        (r"\boxed{3}", "2", 0.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        ("The answer is 2", "2", 0.0),  # no box, no LaTeX: nothing extracted
        ("", "2", 0.0),
    ],
)
def test_accuracy_boxed_gold(completion, gold, expected):
    assert _one(accuracy_boxed_gold, completion, gold) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}", "$0.5$", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (COT, r"The probability is $\boxed{\frac12}$.", 1.0),
        (r"\boxed{2}", "$2$", 1.0),
        (r"\boxed{3}", "$2$", 0.0),
        ("The answer is 2", "$2$", 0.0),
    ],
)
def test_accuracy_latex_gold(completion, gold, expected):
    assert _one(accuracy, completion, gold) == expected


def test_unparsable_gold_gives_zero_and_is_counted():
    stats = {}
    # A bare number is not LaTeX: variant (a) cannot parse it (variant (b) can).
    assert _one(accuracy, r"\boxed{2}", "2", stats=stats) == 0.0
    assert stats == {GOLD_UNPARSABLE: 1}
    assert _one(accuracy_boxed_gold, r"\boxed{2}", "2", stats=stats) == 1.0
    assert _one(accuracy_boxed_gold, r"\boxed{2}", "", stats=stats) == 0.0
    assert stats == {GOLD_UNPARSABLE: 2}


def test_accuracy_extract_expressions_option():
    assert _one(accuracy_boxed_gold, "The final answer is 2.", "2") == 0.0
    assert _one(accuracy_boxed_gold, "The final answer is 2.", "2", extract_expressions=True) == 1.0


def test_accuracy_batch_shape_and_alignment():
    out = accuracy_boxed_gold([r"\boxed{1}", r"\boxed{2}", "x"], answers=["1", "3", "1"])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="aligned"):
        accuracy([r"\boxed{1}"], answers=["1", "2"])


# -- format ------------------------------------------------------------------------------------


def test_format_reward():
    good = "<think>\nstep 1\nstep 2\n</think>\n<answer>\n42\n</answer>"
    bad = [
        "<think>step</think><answer>42</answer>",  # no newlines
        "<think>\nstep\n</think>\n42",  # no answer block
        "<answer>\n42\n</answer>\n<think>\nstep\n</think>",  # wrong order
        "Sure! <think>\nstep\n</think>\n<answer>\n42\n</answer>",  # text before
        "<think>\nstep\n</think>\n\n<answer>\n42\n</answer>",  # blank line between blocks
        "",
    ]
    out = format_reward([good, *bad], answers=[""] * (1 + len(bad)))
    np.testing.assert_array_equal(out, [1.0] + [0.0] * len(bad))


def test_tag_variants():
    full = "<think>\nx\n</think>\n<answer>\n1\n</answer>"
    assert _one(tag_count, full, "") == 1.0
    assert _one(tag_count, "<think>\nx\n</think>\n1", "") == 0.5
    assert _one(format_think_close, "x\n</think>\n1", "") == 1.0
    assert _one(format_think_close, "x\n</think>\n\n</think>\n", "") == 0.0


# -- cosine ------------------------------------------------------------------------------------


def test_cosine_shape():
    lengths = [0, 100, 500, 900, 1000]
    right = cosine([r"\boxed{2}"] * 5, answers=["$2$"] * 5, completion_lengths=lengths)
    wrong = cosine([r"\boxed{3}"] * 5, answers=["$2$"] * 5, completion_lengths=lengths)
    assert np.all(np.diff(right) < 0), right  # shorter correct answers are better
    assert np.all(np.diff(wrong) > 0), wrong  # longer wrong answers are penalised less
    np.testing.assert_allclose([right[0], right[-1]], [1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose([wrong[0], wrong[-1]], [-1.0, -0.5], atol=1e-6)
    np.testing.assert_allclose(right[2], 0.75, atol=1e-6)


def test_cosine_length_units_and_clipping():
    completion = r"\boxed{2}" + " " * 491  # 500 characters
    by_chars = _one(cosine, completion, "$2$")
    np.testing.assert_allclose(by_chars, 0.75, atol=1e-6)
    by_tokens = _one(cosine, completion, "$2$", completion_lengths=[0])
    np.testing.assert_allclose(by_tokens, 1.0, atol=1e-6)
    past_max = _one(cosine, r"\boxed{2}", "$2$", completion_lengths=[1800])
    np.testing.assert_allclose(past_max, 0.5, atol=1e-6)  # clipped, not rising again
    short = make_cosine_reward(max_len=10)
    np.testing.assert_allclose(_one(short, r"\boxed{2}", "$2$", completion_lengths=[10]), 0.5)
    with pytest.raises(ValueError, match="unknown cosine"):
        make_cosine_reward(max_length=10)


@pytest.mark.parametrize(
    "chars, right, wrong", [(0, 1.0, 0.0), (500, 0.75, -0.25), (1000, 0.5, -0.5), (2000, 1.0, 0.0)]
)
def test_cosine_open_rs_is_the_authors_reward(chars, right, wrong):
    # open-rs get_cosine_scaled_reward with their YAML: characters, max_len 1000, wrong answers
    # from 0 down to -0.5, progress NOT clipped (2000 characters score like 0). Token lengths
    # passed by the trainer are ignored.
    reward = get_host_reward("cosine_open_rs")
    for box, expected in ((r"\boxed{2}", right), (r"\boxed{3}", wrong)):
        completion = (box + " " * chars)[: max(chars, len(box))]
        got = _one(reward, completion, "$2$", completion_lengths=[7])
        np.testing.assert_allclose(got, expected, atol=2e-2 if chars == 0 else 1e-6)


def test_cosine_length_unit_is_checked():
    with pytest.raises(ValueError, match="length_unit='words'"):
        make_cosine_reward(length_unit="words")
    with pytest.raises(ValueError, match="length_unit='words'"):
        cosine(["x"], answers=["$1$"], length_unit="words")


def test_cosine_unparsable_gold():
    stats = {}
    assert _one(cosine, r"\boxed{2}", "2", stats=stats) == 0.0
    assert stats == {GOLD_UNPARSABLE: 1}


@given(
    length=st.floats(0, 5000, allow_nan=False),
    longer=st.floats(0, 5000, allow_nan=False),
    correct=st.booleans(),
)
def test_cosine_value_bounds_and_monotone(length, longer, correct):
    lo, hi = (0.5, 1.0) if correct else (-1.0, -0.5)
    a = cosine_value(length, correct)
    b = cosine_value(length + longer, correct)
    assert lo - 1e-9 <= a <= hi + 1e-9
    assert (b <= a + 1e-12) if correct else (b >= a - 1e-12)


# -- reasoning-gym -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gym_entries():
    import reasoning_gym

    return list(reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=1))


def test_extract_gym_answer():
    assert extract_gym_answer("<answer>1</answer> then <answer>\n -4 \n</answer>") == "-4"
    assert extract_gym_answer("work\nmore work\n  -4  \n\n") == "-4"
    assert extract_gym_answer("  \n") is None


def test_gym_reward(gym_entries):
    entry = gym_entries[0]
    gold = entry["answer"]
    reward = make_gym_reward("basic_arithmetic")
    completions = [
        f"<think>\n{entry['question']}\n</think>\n<answer>\n{gold}\n</answer>",
        f"<answer> {gold} </answer>",  # padded: score_answer alone would give 0.5
        f"I computed it.\n{gold}",
        "<answer>12345</answer>",
    ]
    n = len(completions)
    out = reward(completions, answers=[gold] * n, entries=[entry] * n)
    np.testing.assert_array_equal(out, [1.0, 1.0, 1.0, 0.0])
    # metadata= may hold whole entries or their metadata dicts.
    by_meta = reward(completions, answers=[gold] * n, metadata=[entry["metadata"]] * n)
    np.testing.assert_array_equal(by_meta, out)
    with pytest.raises(ValueError, match="entries"):
        reward(completions, answers=[gold] * n)
    assert isinstance(get_host_reward("gym:basic_arithmetic"), rewards.GymReward)
    with pytest.raises(ValueError, match="did you mean"):
        make_gym_reward("basic_arithmetik")


# -- weighted sums and the registry ------------------------------------------------------------


def test_weighted_sum():
    total = weighted_sum({"format": (format_reward, 1.0), "accuracy": (accuracy_boxed_gold, 2.0)})
    completions = [COT, r"\boxed{0.5}", "<think>\nx\n</think>\n<answer>\n7\n</answer>"]
    answers = ["0.5"] * 3
    np.testing.assert_allclose(total(completions, answers=answers), [3.0, 2.0, 1.0])
    parts = total.evaluate(completions, answers=answers)
    np.testing.assert_array_equal(parts["format"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(parts["accuracy"], [1.0, 1.0, 0.0])
    assert total.weights == {"format": 1.0, "accuracy": 2.0}
    with pytest.raises(ValueError, match="weight"):
        weighted_sum({"format": (format_reward, float("nan"))})
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum({})
    # Its components are held to the scorer's contract: N real numbers, named when not.
    for broken in (lambda c, **kw: ["1.0"] * len(c), lambda c, **kw: np.zeros(len(c) + 1)):
        with pytest.raises(RewardContractError, match="reward 'broken' returned"):
            weighted_sum({"format": (format_reward, 1.0), "broken": (broken, 1.0)})(
                completions, answers=answers
            )


def test_registry():
    assert {"accuracy", "accuracy_boxed_gold", "format", "cosine"} <= set(rewards.HOST_REWARDS)
    assert get_host_reward("accuracy") is accuracy
    assert get_host_reward("accuracy_boxed_gold") is accuracy_boxed_gold
    with pytest.raises(ValueError, match="accuracy_boxed_gold"):
        get_host_reward("acuracy")


def test_import_is_light():
    code = (
        "import sys, aapo_jax.rewards; "
        "print(sorted(m for m in ('jax', 'math_verify', 'reasoning_gym') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "[]"


# -- scorer: in-process ------------------------------------------------------------------------


def test_scorer_in_process_catches_errors():
    scorer = RewardScorer(
        {"ok": (format_reward, 1.0), "raises": (_raising_reward, 1.0)}, num_workers=0
    )
    result = scorer.score(["boom", "fine"], ["1", "1"])
    np.testing.assert_array_equal(result.rewards, [0.0, 1.0])
    assert result.stats[ERRORS] == 1
    assert "boom" in result.first_error
    with pytest.raises(ValueError, match="reserved"):
        scorer(["x"], ["1"], stats={})


def test_scorer_in_process_soft_timeout():
    scorer = RewardScorer(accuracy_boxed_gold, num_workers=0)
    start = time.monotonic()
    out, stats = scorer([PATHOLOGICAL, r"\boxed{42}"], ["42", "42"])
    assert time.monotonic() - start < 2 * TIMEOUT_S + SLACK_S
    np.testing.assert_array_equal(out, [0.0, 1.0])
    assert stats[TIMEOUTS] == 1


@pytest.mark.parametrize("reward", [_sleeps_on_hang, _spins_on_hang, _swallows_on_hang])
def test_scorer_in_process_bounds_each_sample(reward):
    """num_workers=0 on the main thread: a stuck sample (asleep, spinning, or swallowing every
    Exception) times out after timeout_s, the others are scored, the SIGUSR1 handler is back."""
    before = signal.getsignal(signal.SIGUSR1)
    scorer = RewardScorer({"stuck": (reward, 1.0)}, timeout_s=1, num_workers=0, failure_value=-1)
    start = time.monotonic()
    result = scorer.score(["a", "hang", "b"], ["1"] * 3)
    assert time.monotonic() - start < 1 + SLACK_S
    np.testing.assert_array_equal(result.rewards, [1.0, -1.0, 1.0])
    assert (result.stats[TIMEOUTS], result.stats[ERRORS]) == (1, 0)
    np.testing.assert_array_equal(result.flags[TIMEOUTS], [0.0, 1.0, 0.0])
    assert signal.getsignal(signal.SIGUSR1) is before


def test_scorer_in_process_bounds_each_sample_off_the_main_thread():
    scorer = RewardScorer(_sleeps_on_hang, timeout_s=1, num_workers=0, failure_value=-1)
    results = []
    thread = threading.Thread(target=lambda: results.append(scorer.score(["hang", "a"], ["1"] * 2)))
    start = time.monotonic()
    thread.start()
    thread.join(HANG_S)
    assert time.monotonic() - start < 1 + SLACK_S
    np.testing.assert_array_equal(results[0].rewards, [-1.0, 1.0])
    assert results[0].stats[TIMEOUTS] == 1


def test_scorer_in_process_deadline_races():
    """Samples that finish around their deadline: a late watchdog signal never escapes."""
    rng = random.Random(0)
    durations = [rng.uniform(0.015, 0.025) for _ in range(60)]

    def reward(completions, *, answers, **kwargs):
        time.sleep(durations[int(completions[0])])
        return [1.0]

    before = signal.getsignal(signal.SIGUSR1)
    scorer = RewardScorer(reward, timeout_s=0.02, num_workers=0)
    result = scorer.score([str(i) for i in range(len(durations))], ["1"] * len(durations))
    assert result.stats[TIMEOUTS] + result.rewards.sum() == len(durations)
    assert result.stats[TIMEOUTS] > 0  # those of 20 ms or more, at least
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize(
    "value",
    [np.ones(2, np.float32), ["yes"], ["1.0"], "1.0", np.float32(1.0), [None], np.ones((1, 1))],
    ids=["wrong_shape", "list_of_str", "numeric_str_in_list", "str", "scalar", "none", "2d"],
)
def test_scorer_raises_on_a_broken_reward_contract(value):
    scorer = RewardScorer(
        {"ok": (format_reward, 1.0), "my_reward": (functools.partial(_returns, value), 1.0)},
        num_workers=0,
    )
    with pytest.raises(RewardContractError, match=r"reward 'my_reward' returned .* real numbers"):
        scorer.score(["a"], ["1"])
    assert issubclass(RewardContractError, TypeError)


def test_pool_raises_on_a_broken_reward_contract():
    reward = functools.partial(_returns, ["1.0"])
    with RewardScorer({"my_reward": (reward, 1.0)}, num_workers=1) as scorer:
        with pytest.raises(RewardContractError, match=r"'my_reward' returned a list of str"):
            scorer.score(["a", "b"], ["1", "1"])
        assert scorer.worker_pids == []  # dropped: the next call starts afresh


@pytest.mark.parametrize(
    ("value", "expected", "errors"),
    [([1], 1.0, 0), ([True], 1.0, 0), ((0.5,), 0.5, 0), (np.ones(1), 1.0, 0), ([np.nan], 0, 1)],
)
def test_scorer_accepts_real_numbers(value, expected, errors):
    scorer = RewardScorer(functools.partial(_returns, value), num_workers=0)
    out, stats = scorer(["a"], ["1"])
    np.testing.assert_array_equal(out, [expected])
    assert stats[ERRORS] == errors  # a non-finite reward stays a per-sample error


def test_scorer_rejects_unpicklable_rewards():
    with pytest.raises(ValueError, match="worker process"):
        RewardScorer(lambda completions, **kw: np.zeros(len(completions)), num_workers=1)


# -- scorer: worker pool -----------------------------------------------------------------------


def test_pool_pathological_answer_is_bounded():
    total = weighted_sum({"accuracy": (accuracy_boxed_gold, 1.0), "format": (format_reward, 0.5)})
    with RewardScorer(total, timeout_s=TIMEOUT_S, num_workers=2) as scorer:
        scorer([r"\boxed{1}"], ["1"])  # starts the pool
        start = time.monotonic()
        out, stats = scorer([PATHOLOGICAL], ["42"])
        assert time.monotonic() - start < 2 * TIMEOUT_S + SLACK_S
        np.testing.assert_array_equal(out, [0.0])
        assert stats[TIMEOUTS] == 1
        result = scorer.score([COT, r"\boxed{2}", r"\boxed{3}"], ["0.5", "2", "2"])
        np.testing.assert_allclose(result.rewards, [1.5, 1.0, 0.0])
        np.testing.assert_array_equal(result.components["format"], [1.0, 0.0, 0.0])
        assert result.stats[TIMEOUTS] == 0
        np.testing.assert_allclose(result.stats["mean/accuracy"], 2 / 3)


def test_pool_kills_and_replaces_a_hung_worker():
    # Without math-verify's own alarm the verify hangs: only the hard bound stops it.
    no_alarm = functools.partial(accuracy_boxed_gold, math_verify_timeout_s=None)
    with RewardScorer(no_alarm, timeout_s=TIMEOUT_S, num_workers=2, chunk_size=8) as scorer:
        scorer([r"\boxed{1}"] * 4, ["1"] * 4)
        pids = set(scorer.worker_pids)
        completions = [r"\boxed{1}", r"\boxed{2}", PATHOLOGICAL, r"\boxed{4}", r"\boxed{0}"]
        start = time.monotonic()
        out, stats = scorer(completions, ["1", "2", "42", "4", "5"])
        assert time.monotonic() - start < 2 * TIMEOUT_S + SLACK_S
        np.testing.assert_array_equal(out, [1.0, 1.0, 0.0, 1.0, 0.0])
        assert (stats[TIMEOUTS], stats[KILLED], stats[ERRORS]) == (1, 1, 0)
        (killed,) = pids - set(scorer.worker_pids)
        with pytest.raises(ProcessLookupError):
            os.kill(killed, 0)  # the stuck worker is gone, not left spinning
        out, stats = scorer([r"\boxed{7}"] * 6, ["7"] * 6)
        np.testing.assert_array_equal(out, np.ones(6))
        assert stats[TIMEOUTS] == 0


def test_pool_catches_errors_and_passes_per_sample_fields(gym_entries):
    components = {
        "raises": (_raising_reward, 1.0),
        "cosine": (cosine, 1.0),
        "gym": (make_gym_reward("basic_arithmetic"), 1.0),
    }
    golds = [e["answer"] for e in gym_entries]
    completions = [f"<answer>{g}</answer> $\\boxed{{{g}}}$" for g in golds]
    completions[1] = "boom"
    lengths = np.arange(5) * 250
    kwargs = dict(entries=gym_entries, completion_lengths=lengths, max_completion_length=1000)
    with RewardScorer(components, num_workers=2, chunk_size=2) as scorer:
        pool = scorer.score(completions, [f"${g}$" for g in golds], **kwargs)
    local = RewardScorer(components, num_workers=0).score(
        completions, [f"${g}$" for g in golds], **kwargs
    )
    assert pool.stats[ERRORS] == local.stats[ERRORS] == 1
    for name in components:
        np.testing.assert_allclose(pool.components[name], local.components[name])
    np.testing.assert_array_equal(pool.components["raises"], [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(pool.components["gym"], [1, 0, 1, 1, 1])
    expected_cosine = [cosine_value(n, True) for n in lengths]
    expected_cosine[1] = cosine_value(250, False)
    np.testing.assert_allclose(pool.components["cosine"], expected_cosine, atol=1e-6)


def test_pool_survives_a_crashing_worker():
    with RewardScorer(_crashing_reward, num_workers=1, chunk_size=4) as scorer:
        out, stats = scorer(["a", "crash", "b", "c"], ["1"] * 4)
        np.testing.assert_array_equal(out, [1.0, 0.0, 1.0, 1.0])
        assert (stats[ERRORS], stats[CRASHED], stats[TIMEOUTS]) == (1, 1, 0)
        out, stats = scorer(["d"], ["1"])
        np.testing.assert_array_equal(out, [1.0])


@pytest.mark.parametrize("victim", [0, 1])
def test_pool_replaces_a_worker_killed_from_outside(victim):
    """A worker SIGKILLed by something else (the OOM killer, a user) between calls, started
    or still starting, is noticed and replaced: every sample is still scored."""
    with RewardScorer(_crashing_reward, num_workers=2, chunk_size=2) as scorer:
        scorer(["a", "b"], ["1", "1"])
        pid = scorer.worker_pids[victim]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # let it die
        out, stats = scorer(["c", "d", "e", "f"], ["1"] * 4)
        np.testing.assert_array_equal(out, [1.0] * 4)
        assert stats[ERRORS] == 0 and stats[TIMEOUTS] == 0 and stats[CRASHED] == 1
        assert pid not in scorer.worker_pids and len(scorer.worker_pids) == 2


def test_pool_names_a_reward_whose_warmup_hangs(monkeypatch):
    monkeypatch.setattr(rewards.scorer, "WARMUP_ALLOWANCE_S", 2.0)  # the default is 10 s
    with RewardScorer({"slow_start": (_hangs_on_warmup, 1.0)}, timeout_s=1, num_workers=1) as s:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"'slow_start'.* warm-up .* within 3.0 s"):
            s.score(["a"], ["1"])
        assert time.monotonic() - start < 30.0  # start-up (imports) + 3 s; not startup_timeout_s


# -- token rewards -----------------------------------------------------------------------------


def _token_batch():
    eos = 2
    tokens = jnp.array([[5, 6, eos, 0], [5, 7, eos, 0], [5, 6, 9, eos], [5, eos, 0, 0]])
    lengths = jnp.array([3, 3, 4, 2])
    mask = jnp.arange(4)[None, :] < lengths[:, None]
    targets = jnp.array([[5, 6, -1], [5, 6, -1], [5, 6, -1], [5, 6, -1]])
    target_len = jnp.array([2, 2, 2, 2])
    return tokens, mask, targets, target_len


@pytest.mark.parametrize("use_jit", [False, True])
def test_token_rewards(use_jit):
    wrap = jax.jit if use_jit else (lambda f: f)
    batch = _token_batch()
    exact = wrap(rewards.exact_match)(*batch)
    prefix = wrap(rewards.prefix_match)(*batch)
    assert exact.dtype == prefix.dtype == jnp.float32
    np.testing.assert_array_equal(exact, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(prefix, [1.0, 0.5, 1.0, 0.5])
    # Targets wider than the completion, and a target the completion is too short to hold.
    tokens, mask, _, _ = batch
    wide = jnp.full((4, 6), -1).at[:, :2].set(jnp.array([5, 6]))
    np.testing.assert_array_equal(
        wrap(rewards.exact_match)(tokens, mask, wide, jnp.array([2, 2, 2, 5])), [1, 0, 0, 0]
    )
    assert {"exact_match", "prefix_match"} <= set(rewards.TOKEN_REWARDS)  # tests add their own
    with pytest.raises(ValueError, match="exact_match"):
        rewards.get_token_reward("exact")


# -- lighteval (the paper's evaluation) ----------------------------------------------------------


def test_lighteval_extraction_as_the_authors_tasks():
    latex, expr = get_host_reward("lighteval_latex_gold"), get_host_reward("lighteval_expr_gold")
    # The prediction is parsed as an expression too: an unboxed final number counts.
    assert _one(expr, "so the answer is 204", "204") == 1.0
    assert _one(rewards.accuracy, "so the answer is 204", "$204$") == 0.0
    # LaTeX golds (a worked solution with a box), boxed predictions first.
    assert _one(latex, r"Therefore $\boxed{0.5}$", r"We get $\boxed{\frac{1}{2}}$.") == 1.0
    assert _one(latex, r"Therefore $\boxed{0.6}$", r"We get $\boxed{\frac{1}{2}}$.") == 0.0
    # Floats compared to 5 decimals (lighteval precision=5).
    assert _one(expr, r"$\boxed{3.14159}$", "3.1415926") == 1.0
    assert _one(expr, r"$\boxed{3.1416}$", "3.1415926") == 0.0
    stats = {}
    assert _one(latex, r"$\boxed{1}$", "no math at all", stats=stats) == 0.0
    assert stats.get("gold_unparsable") == 1
    with pytest.raises(ValueError, match="gold_as='words'"):
        rewards.lighteval_correct("1", "1", gold_as="words")

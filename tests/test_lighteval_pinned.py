"""The paper's judge: lighteval 0.8.1 itself, against our math-verify transcription."""

import pytest

from aapo_jax import rewards
from aapo_jax.rewards import lighteval_pinned

needs_pinned = pytest.mark.skipif(
    not lighteval_pinned.available(),
    reason=f"lighteval 0.8.1 not installed: {lighteval_pinned.INSTALL_COMMAND}",
)

# (gold format, gold, prediction, lighteval 0.8.1's decision, math-verify transcription's).
# The last two rows are where the libraries disagree: math-verify ≥ 0.9 reads a percentage as
# its number and compares π numerically to 5 decimals; lighteval 0.8.1 does neither.
CASES = [
    ("expr", "25", r"The answer is $\boxed{25}$", 1.0, 1.0),
    ("expr", "25", r"The answer is $\boxed{26}$", 0.0, 0.0),
    ("latex", r"$\frac{1}{2}$", r"so $\boxed{0.5}$", 1.0, 1.0),
    ("latex", r"$\pi$", r"$\boxed{\pi}$", 1.0, 1.0),
    # Bare golds parse as no LaTeX: lighteval compares the raw string (item 1 of the issue).
    ("latex", "7", r"Therefore, the final answer is: $\boxed{7}$.", 1.0, 1.0),
    ("latex", "7", r"Therefore, the final answer is: $\boxed{8}$.", 0.0, 0.0),
    ("latex", r"2\sqrt{3}", r"$\boxed{2\sqrt{3}}$", 1.0, 1.0),
    ("latex", r"\frac{\sqrt{3}}{2}", r"$\boxed{\frac{\sqrt{3}}{2}}$", 1.0, 1.0),
    # ... verbatim only: an equal value written otherwise does not match the raw string.
    ("latex", r"\frac{\sqrt{3}}{2}", r"$\boxed{\frac{1}{2}\sqrt{3}}$", 0.0, 0.0),
    ("expr", "25", r"$\boxed{25\%}$", 0.0, 1.0),
    ("latex", r"$\pi$", r"$\boxed{3.14159}$", 0.0, 1.0),
]


def _score(name, cases, num_workers):
    with rewards.RewardScorer(rewards.get_host_reward(name), num_workers=num_workers) as scorer:
        result = scorer.score([c[2] for c in cases], [c[1] for c in cases])
    return list(result.rewards), result.stats


@needs_pinned
def test_pinned_judge_makes_lighteval_081s_decisions_and_the_transcription_differs_only_as_pinned():
    for gold_as in ("latex", "expr"):
        cases = [c for c in CASES if c[0] == gold_as]
        pinned, stats = _score(f"lighteval081_{gold_as}_gold", cases, num_workers=1)
        assert pinned == [c[3] for c in cases], gold_as
        ours, _ = _score(f"lighteval_{gold_as}_gold", cases, num_workers=0)
        assert ours == [c[4] for c in cases], gold_as
    # The bare golds were counted as unparsable, and still judged.
    assert stats[rewards.ERRORS] == 0


def test_the_transcription_keeps_an_unparsable_gold_as_its_raw_string():
    stats = {}
    correct = rewards.lighteval_correct(r"$\boxed{7}$", "7", gold_as="latex", stats=stats)
    assert correct is True and stats[rewards.GOLD_UNPARSABLE] == 1
    assert not rewards.lighteval_correct(r"$\boxed{7.0}$", "7", gold_as="latex")


def test_the_pinned_judge_names_its_install_command_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(lighteval_pinned.DIR_ENV, str(tmp_path))
    assert lighteval_pinned.pinned_dir() == tmp_path and not lighteval_pinned.available()
    with pytest.raises(lighteval_pinned.LightevalUnavailable, match=r"requirements-lighteval\.txt"):
        lighteval_pinned.check_available()


@needs_pinned
def test_the_pinned_judge_refuses_a_process_that_holds_math_verifys_latex2sympy():
    rewards.lighteval_correct(r"$\boxed{1}$", "1", gold_as="latex")  # imports math-verify here
    with pytest.raises(lighteval_pinned.LightevalUnavailable, match="num_workers"):
        lighteval_pinned.lighteval_correct(r"$\boxed{1}$", "1", gold_as="latex")

"""Format rewards on the `<think>…</think><answer>…</answer>` layout (open-r1 / open-rs)."""

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from aapo_jax.rewards.base import as_rewards, check_batch

# open-r1 `format_reward`. With re.MULTILINE, `$` also matches before any newline, so text after
# the closing `</answer>` line is tolerated, as in the reference.
FORMAT_PATTERN = re.compile(
    r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE
)


def format_reward(
    completions: Sequence[str], *, answers: Sequence[str], **kwargs: Any
) -> np.ndarray:
    """1.0 iff the completion matches `^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$`.

    re.match with re.DOTALL | re.MULTILINE (open-r1 / open-rs `format_reward`).

    Returns:
      f32[N] in {0, 1}.
    """
    del kwargs
    check_batch(completions, answers)
    return as_rewards([1.0 if FORMAT_PATTERN.match(c) else 0.0 for c in completions])


def format_think_close(
    completions: Sequence[str], *, answers: Sequence[str], **kwargs: Any
) -> np.ndarray:
    """1.0 iff `\\n</think>\\n` occurs exactly once (the AAPO open-rs `format_reward`).

    Only the closing tag is checked because the chat template may already open `<think>`.

    Returns:
      f32[N] in {0, 1}.
    """
    del kwargs
    check_batch(completions, answers)
    return as_rewards([1.0 if c.count("\n</think>\n") == 1 else 0.0 for c in completions])


def tag_count(completions: Sequence[str], *, answers: Sequence[str], **kwargs: Any) -> np.ndarray:
    """0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>` seen once.

    open-r1 `tag_count_reward`: partial credit on the way to `format_reward`.

    Returns:
      f32[N] in {0, 0.25, 0.5, 0.75, 1}.
    """
    del kwargs
    check_batch(completions, answers)
    tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    return as_rewards([0.25 * sum(c.count(t) == 1 for t in tags) for c in completions])

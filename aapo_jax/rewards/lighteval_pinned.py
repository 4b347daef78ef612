"""The paper's judge: lighteval 0.8.1's own extractive match, loaded from a pinned directory.

The authors score their evaluation with lighteval 0.8.1 and latex2sympy2_extended 1.0.6
(their eval_requirements.txt). Those decide some answers differently from math-verify ≥ 0.9,
which this project's other rewards use (`\\boxed{25\\%}` against gold `25`, `3.14159` against
`\\pi`: no there, yes here), and their latex2sympy2_extended cannot share a process with
math-verify's. So the pinned pair lives in its own directory, installed with

    pip install --no-deps --target ~/.cache/aapo_jax/lighteval-0.8.1 -r requirements-lighteval.txt

(or the directory named by $AAPO_LIGHTEVAL_DIR), and is imported only inside the
`RewardScorer` worker processes that score with it: `lighteval_correct` then runs lighteval's
extraction and comparison functions, the metric's body of open-r1 / open-rs
`latex_gold_metric` / `expr_gold_metric` for one gold and one prediction.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aapo_jax.rewards.base import GOLD_UNPARSABLE, TIMEOUTS, Stats, binary_rewards, record

VERSION = "0.8.1"
LATEX2SYMPY_VERSION = "1.0.6"
DIR_ENV = "AAPO_LIGHTEVAL_DIR"
DEFAULT_DIR = Path("~/.cache/aapo_jax/lighteval-0.8.1")
REQUIREMENTS = "requirements-lighteval.txt"
INSTALL_COMMAND = f"pip install --no-deps --target {DEFAULT_DIR} -r {REQUIREMENTS}"

# open-r1 / open-rs `latex_gold_metric` / `expr_gold_metric`: floats to 5 decimals, a 5 s
# timeout per extraction and comparison (lighteval's default), the first string match kept
# as a fallback, any regex match tried.
PRECISION = 5
TIMEOUT_S = 5
GOLD_FORMATS = ("latex", "expr")

# lighteval's package `__init__`s import its whole harness (datasets, nltk, ...). Only the
# extraction and comparison modules are needed; these imports of theirs are never called on
# that path, so they get empty stand-ins when they are not installed.
_UNUSED_IMPORTS = {
    "datasets": ("DatasetDict", "load_dataset"),
    "pytablewriter": ("MarkdownTableWriter",),
    "pycountry": (),
}
_BARE_PACKAGES = ("lighteval.metrics", "lighteval.tasks.templates")


class LightevalUnavailable(RuntimeError):
    """The pinned lighteval directory is missing or cannot load in this process."""


def pinned_dir() -> Path:
    """Where the pinned lighteval 0.8.1 lives: $AAPO_LIGHTEVAL_DIR, else `DEFAULT_DIR`."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()


def available(directory: str | Path | None = None) -> bool:
    """Whether `directory` (default `pinned_dir()`) holds lighteval 0.8.1 and
    latex2sympy2_extended 1.0.6 as `pip install --target` leaves them."""
    root = Path(directory).expanduser() if directory else pinned_dir()
    return (root / f"lighteval-{VERSION}.dist-info").is_dir() and (
        root / f"latex2sympy2_extended-{LATEX2SYMPY_VERSION}.dist-info"
    ).is_dir()


def check_available(directory: str | Path | None = None) -> Path:
    """`pinned_dir()` (or `directory`) if `available`, else an error with the install command.

    Raises:
      LightevalUnavailable: naming the directory, $AAPO_LIGHTEVAL_DIR and the command.
    """
    root = Path(directory).expanduser() if directory else pinned_dir()
    if not available(root):
        raise LightevalUnavailable(
            f"the paper's judge needs lighteval {VERSION} with latex2sympy2_extended "
            f"{LATEX2SYMPY_VERSION} in {root} (set ${DIR_ENV} to use another directory); "
            f"install it with `{INSTALL_COMMAND}` from the repository root, or score with "
            "math-verify instead (--judge=math-verify, an approximation)."
        )
    return root


@functools.cache
def _modules(directory: str) -> types.SimpleNamespace:
    """Imports lighteval's extraction and comparison from `directory`, once per process.

    Raises:
      LightevalUnavailable: not installed there, or this process already imported another
        latex2sympy2_extended (math-verify's), which the pinned one cannot replace.
    """
    root = check_available(directory)
    loaded = sys.modules.get("latex2sympy2_extended")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(root)):
        raise LightevalUnavailable(
            "this process already imported latex2sympy2_extended from "
            f"{getattr(loaded, '__file__', '?')} (math-verify's); lighteval {VERSION} needs "
            f"version {LATEX2SYMPY_VERSION} from {root}. Score with it in RewardScorer worker "
            "processes (num_workers ≥ 1), which import nothing else."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for name, attributes in _UNUSED_IMPORTS.items():
        if importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.__dict__.update(dict.fromkeys(attributes))
            sys.modules[name] = stand_in
    package = Path(importlib.util.find_spec("lighteval").origin).parent
    for name in _BARE_PACKAGES:
        if name not in sys.modules:
            bare = types.ModuleType(name)
            bare.__path__ = [str(package.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = bare
    extraction = importlib.import_module("lighteval.metrics.utils.extractive_match_utils")
    comparison = importlib.import_module("lighteval.metrics.utils.math_comparison")
    requests = importlib.import_module("lighteval.tasks.requests")
    language = importlib.import_module("lighteval.utils.language")
    doc = requests.Doc(query="", choices=[""], gold_index=0)
    english = language.Language.ENGLISH
    regexes = functools.partial(extraction.get_extraction_regexes, doc, language=english)
    golds = {
        "latex": regexes((extraction.LatexExtractionConfig(),)),
        "expr": regexes((extraction.ExprExtractionConfig(),)),
    }
    predictions = regexes(
        (
            extraction.ExprExtractionConfig(),
            extraction.LatexExtractionConfig(boxed_match_priority=0),
        )
    )
    return types.SimpleNamespace(
        extract=extraction.extract_target_from_pred,
        compare=comparison.compare_gold_target,
        golds=golds,
        predictions=predictions,
    )


def extract(text: str, *, gold_as: str | None = None, directory: str | None = None) -> list[Any]:
    """lighteval's extractions of `text`: a prediction's (`gold_as=None`), or a gold's in
    `gold_as` format. Each parsed answer is followed by the string it was parsed from."""
    lib = _modules(str(directory or pinned_dir()))
    regexes = lib.predictions if gold_as is None else lib.golds[gold_as]
    return lib.extract(text, regexes, "first_match", "any_match", TIMEOUT_S)


def lighteval_correct(
    completion: str,
    gold: str,
    *,
    gold_as: str,
    directory: str | None = None,
    stats: Stats | None = None,
) -> bool:
    """lighteval 0.8.1's decision on one prediction, as the authors' metric makes it.

    The prediction is extracted as an expression and as LaTeX (`\\boxed{}` first), the gold
    as LaTeX (`gold_as="latex"`) or as an expression ("expr"). A gold nothing parses is kept
    as its raw string (lighteval warns and goes on; counted in `stats["gold_unparsable"]`),
    which then matches only a prediction extraction of the same text. Then any (gold,
    prediction) pair that `compare_gold_target` accepts, with floats to 5 decimals.
    """
    if gold_as not in GOLD_FORMATS:
        raise ValueError(f"gold_as={gold_as!r}; valid: {GOLD_FORMATS}")
    lib = _modules(str(directory or pinned_dir()))
    predicted = extract(completion, directory=directory)
    golds = extract(gold, gold_as=gold_as, directory=directory)
    if not golds:
        record(stats, GOLD_UNPARSABLE)
        golds = [gold]
    try:
        return bool(lib.compare(golds, predicted, PRECISION, timeout_seconds=TIMEOUT_S))
    except TimeoutError:  # lighteval's own alarm, outside its per-pair guard
        record(stats, TIMEOUTS)
        return False


def lighteval_accuracy(
    completions: Sequence[str],
    *,
    answers: Sequence[str],
    gold_as: str = "latex",
    stats: Stats | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """1.0 per completion that lighteval 0.8.1 (`lighteval_correct`) accepts, else 0.0.

    Returns:
      f32[N] in {0, 1}.
    """
    del kwargs
    correct = functools.partial(lighteval_correct, gold_as=gold_as, stats=stats)
    return binary_rewards(completions, answers, correct)

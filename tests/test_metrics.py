"""The run summary is replaced atomically and the plots leave matplotlib's backend alone."""

import json
import pathlib

import matplotlib
import pytest

from aapo_jax import metrics
from tests.helpers import matplotlib_backend

ROWS = [
    {"step": 0, "eval/accuracy": 0.25},
    {"step": 1, "reward_mean": 0.5, "completion_len_mean": 6.0},
    {"step": 2, "reward_mean": 0.75, "completion_len_mean": 5.0, "eval/accuracy": 0.5},
]


def _workdir(tmp_path):
    (tmp_path / metrics.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def test_summary_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    workdir = _workdir(tmp_path)
    old = metrics.write_summary(workdir, {"wall_seconds": 1.0}, title="run")
    assert json.loads((workdir / metrics.SUMMARY_FILE).read_text()) == old
    assert old["reward_mean_last"] == 0.75
    assert old["plots"] == ["reward_mean.png", "eval_accuracy.png", "training.png"]
    written = (workdir / metrics.SUMMARY_FILE).read_text()

    def torn_write(self, text, *args, **kwargs):  # a full disk (or a kill) halfway through
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", torn_write)
    with pytest.raises(OSError, match="no space"):
        metrics.write_summary(workdir, {"wall_seconds": 2.0}, title="run")
    assert (workdir / metrics.SUMMARY_FILE).read_text() == written
    assert not list(workdir.glob("*.tmp"))


def test_plot_leaves_the_callers_backend(tmp_path):
    with matplotlib_backend("svg"):
        out = metrics.plot_metrics(ROWS, metrics.OVERVIEW_KEYS, tmp_path / "training.png")
        assert matplotlib.get_backend() == "svg"
    assert out.read_bytes().startswith(b"\x89PNG")

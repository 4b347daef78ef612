"""Every file in configs/ resolves for every algorithm and runs two steps in tiny mode."""

import importlib
import json
from pathlib import Path

import pytest

from aapo_jax import algorithms, configs, trainer
from tests import hf_fixtures

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RUNNABLE = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))
# The paper configs need a local checkpoint and data file; the quickstart ships its own.
NEEDS_PATHS = {"qwen25_math_7b_simplerl", "llama32_simplerl", "r1_distill_1p5b_openrs"}


def _module(name):
    return importlib.import_module(f"configs.{name}")


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = hf_fixtures.make_model_dir(root / "model")
    rows = [
        {"problem": f"What is {a} + {b}?", "answer": str(a + b), "solution": f"\\boxed{{{a + b}}}"}
        for a in range(8)
        for b in range(6)
    ]
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return model, data


def test_every_config_is_covered():
    assert NEEDS_PATHS <= set(RUNNABLE) and "quickstart" in RUNNABLE


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("algo", sorted(algorithms.ALGORITHMS))
def test_config_resolves(name, algo, local_assets):
    c = _module(name).get_config(f"algo={algo}")
    if name in NEEDS_PATHS:
        with pytest.raises(ValueError, match=r"(model|data)\.path="):
            configs.experiment_config(c)
        c.model.path = str(local_assets[0])
        c.data.path = str(local_assets[1])
    config = configs.experiment_config(c)
    assert config.rl.algorithm == algo
    assert config.rl.hyperparameters == algorithms.ALGORITHMS[algo].defaults()
    assert config.optim.total_steps == config.train.steps


def test_unknown_argument_is_named():
    with pytest.raises(ValueError, match="unknown config argument 'algorithm'"):
        _module("quickstart").get_config("algorithm=grpo")
    with pytest.raises(ValueError, match=r"algo='ppo' is invalid: expected one of \['aapo'"):
        _module("quickstart").get_config("algo=ppo")


def test_every_hyperparameter_is_overridable_by_name():
    """`set_algorithm` writes every hyper-parameter into rl.hparams, so a flag can set each."""
    from absl import flags
    from ml_collections import config_flags

    argv = [
        "train",
        f"--config={CONFIG_DIR / 'quickstart.py'}:algo=grpo",
        "--config.rl.hparams.kl_beta=0.05",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    assert set(values.config.rl.hparams) == set(algorithms.ALGORITHMS["grpo"].hparams)
    config = configs.experiment_config(values.config)
    assert config.rl.hyperparameters["kl_beta"] == 0.05 and config.rl.needs_reference_logprobs


@pytest.mark.parametrize("name", RUNNABLE)
def test_tiny_variant_runs_two_steps(name, local_assets, tmp_path):
    c = _module(name).get_config("variant=tiny")
    if name in NEEDS_PATHS:
        c.model.path = str(local_assets[0])
        c.data.path = str(local_assets[1])
    config = configs.experiment_config(c)
    summary = trainer.train(config, tmp_path, progress=False)
    assert summary["steps"] == 2
    assert (tmp_path / "summary.json").exists()

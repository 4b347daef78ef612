"""Each setting is defined once: the ml_collections config is generated from the typed
dataclasses, every field is a command-line flag, and choice lists come from the registries."""

import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import ml_collections
import pytest

from aapo_jax import algorithms, configs, evaluation, fields, losses, plugins, sampling
from configs import base, quickstart
from tests.helpers import REPO


def _leaves(tree, prefix=""):
    """{dotted path: value} of a nested dict / ConfigDict."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict | ml_collections.ConfigDict):
            out.update(_leaves(value, path) if len(value) else {path: dict(value)})
        else:
            out[path] = value
    return out


def _field_defaults(cls, prefix=""):
    """{dotted path: default} of every init field of a dataclass, nested ones flattened."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        path = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(hints[field.name]):
            out.update(_field_defaults(hints[field.name], path))
        elif field.default is not dataclasses.MISSING:
            out[path] = field.default
    return out


def test_default_config_holds_every_dataclass_field_with_its_default():
    generated = _leaves(configs.default_config().to_dict())
    defaults = _field_defaults(configs.ExperimentConfig)
    hparams = {f"rl.hparams.{k}": v for k, v in algorithms.ALGORITHMS["aapo"].defaults().items()}
    # rl.hparams is the default algorithm's hyper-parameters; data.gym_kwargs an empty dict.
    assert defaults.pop("rl.hparams") == () and defaults.pop("data.gym_kwargs") == ()
    assert generated.pop("data.gym_kwargs") == {}
    assert {k: generated.pop(k) for k in hparams} == hparams
    assert generated == defaults
    # configs/base.py is that config, not a copy of it.
    assert base.base_config().to_dict() == configs.default_config().to_dict()


def test_optim_total_steps_follows_train_steps():
    c = configs.default_config()
    c.train.steps = 7
    assert c.optim.total_steps == 7
    c.optim.total_steps = 9  # one setting: either name sets it
    assert c.train.steps == 9


def test_generated_config_round_trips():
    c = configs.default_config()
    c.model.path, c.data.name = "/ckpt", "chain_sum"
    config = configs.experiment_config(c)
    # Every value arrives as given: the generated defaults are the dataclass defaults.
    assert config == configs.ExperimentConfig(
        model=configs.ModelSource(path="/ckpt"),
        data=configs.DataConfig(name="chain_sum"),
    )
    # As a checkpoint stores it (JSON) and back.
    stored = json.loads(json.dumps(dataclasses.asdict(config)))
    assert configs.experiment_config(stored) == config


def _config_file(tmp_path: Path) -> Path:
    """A config file returning the generated defaults, with the two fields they lack."""
    path = tmp_path / "generated.py"
    path.write_text(
        "from aapo_jax import configs\n\n\n"
        "def get_config():\n"
        "    c = configs.default_config()\n"
        "    c.model.path = '/ckpt'\n"
        "    c.data.name = 'chain_sum'\n"
        "    return c\n"
    )
    return path


# A valid value other than the default for fields where `_other_value` cannot guess one, and
# the other fields a value needs (a setting that only matters with another one).
SPECIAL = {
    "name": ("my-run-{algorithm}", {}),
    "model.path": ("/other", {}),
    "model.tokenizer_path": ("/tok", {}),
    "model.scan_unroll": (2, {}),
    "model.reference_dtype": ("bfloat16", {}),
    "model.lora_base_qtype": ("nf4", {"model.lora_rank": 8}),
    "model.lora_targets": ("layers/attn/.*", {"model.lora_rank": 8}),
    "data.source": ("jsonl", {"data.path": "train.jsonl", "data.name": ""}),
    "data.name": ("basic_arithmetic", {}),
    "data.path": ("train.jsonl", {"data.source": "jsonl", "data.name": ""}),
    "data.eval_path": (
        "eval.jsonl",
        {"data.source": "jsonl", "data.path": "train.jsonl", "data.name": ""},
    ),
    "data.question_key": ("q", {"data.source": "jsonl", "data.path": "t.jsonl", "data.name": ""}),
    "data.answer_key": ("a", {"data.source": "jsonl", "data.path": "t.jsonl", "data.name": ""}),
    "data.gym_kwargs": ({"min_terms": 3}, {}),
    "prompt.template": ("Q: {question}", {}),
    "rl.algorithm": ("aapo_copy", {}),
    "rl.reference": ("sync", {"rl.reference_sync_every": 2}),
    "rl.reference_sync_every": (2, {"rl.reference": "sync"}),
    "rl.kl_estimator": ("k1", {"rl.kl_metric": True}),
    "rl.reference_ema_rate": (0.1, {"rl.reference": "ema"}),
    "rl.hparams.margin_low": (0.1, {}),
    "rl.hparams.margin_high": (0.3, {}),
    "mesh.fsdp": (1, {}),
    "optim.micro_batch_tokens": (64, {}),
    "reward.kind": ("token", {"reward.names": ("exact_match",), "reward.eval_name": "accuracy"}),
    "reward.names": (("accuracy", "format"), {"reward.weights": (1.0, 0.5)}),
    "reward.weights": ((2.0,), {}),
    "reward.eval_name": ("accuracy_boxed_gold", {}),
    "sampling.top_p": (0.9, {}),
    "sampling.temperature": (0.7, {}),
}


def _other_value(path: str, default):
    """A valid value that differs from `default`, for the plain fields."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return round(default + 0.05, 6) if default < 0.5 else round(default * 0.9, 6)
    section, name = path.rsplit(".", 1)
    cls = typing.get_type_hints(configs.ExperimentConfig)[section]
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    choices = fields.choices_of(field) or typing.get_args(typing.get_type_hints(cls)[name])
    if choices:
        return next(c for c in sorted(choices) if c != default)
    return default + "x"


def _flag(path: str, value) -> str:
    return (
        f"--config.{path}={value!r}" if not isinstance(value, str) else f"--config.{path}={value}"
    )


def _parse(config_file: Path, overrides: dict) -> configs.ExperimentConfig:
    """The train command's config flags, parsed as absl does for `experiments.train`."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={config_file}", *(_flag(k, v) for k, v in overrides.items())]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return configs.experiment_config(values.config)


def _value_at(config: configs.ExperimentConfig, path: str):
    value = dataclasses.asdict(config)
    for key in path.split("."):
        value = dict(value)[key] if key != "hparams" else dict(value[key])
    return value


def test_every_field_can_be_overridden_from_the_command_line(tmp_path, monkeypatch):
    """Each leaf of the generated config, given a valid new value on the command line of
    `experiments.train`, reaches the validated `ExperimentConfig`."""
    aapo = algorithms.ALGORITHMS["aapo"]
    monkeypatch.setitem(algorithms.ALGORITHMS, "aapo_copy", aapo)
    config_file = _config_file(tmp_path)
    paths = _leaves(configs.default_config().to_dict())
    assert len(paths) > 80
    for path, default in paths.items():
        value, companions = SPECIAL.get(path, (None, {}))
        if value is None:
            value = _other_value(path, default)
        assert value != default, path
        config = _parse(config_file, {**companions, path: value})
        got = _value_at(config, path)
        if path == "data.gym_kwargs":
            got = dict(got)
        if path == "name":
            value = value.format(algorithm="aapo")
        if path == "train.steps":
            assert config.optim.total_steps == value
        assert got == value, (path, got, value)


def test_sampler_settings_are_checked_when_the_config_is_validated():
    c = quickstart.get_config()
    for path, value in (("top_k", -3), ("min_p", 1.5), ("top_p", 0.0), ("temperature", 0.0)):
        bad = quickstart.get_config()
        bad.sampling[path] = value
        with pytest.raises(ValueError, match=rf"sampling\.{path}={value!r} is invalid"):
            configs.experiment_config(bad)
    # The trainer, the sampler and `evaluate` take the same record.
    config = configs.experiment_config(c)
    assert isinstance(config.sampling, sampling.SamplerSettings)


def test_choice_lists_are_the_registries(monkeypatch):
    c = quickstart.get_config()
    c.rl.loss_aggregation = "my_mean"
    with pytest.raises(ValueError, match=r"rl\.loss_aggregation='my_mean' is invalid"):
        configs.experiment_config(c)
    monkeypatch.setitem(losses.AGGREGATIONS, "my_mean", losses.AGGREGATIONS["seq_mean"])
    assert configs.experiment_config(c).rl.loss_aggregation == "my_mean"
    monkeypatch.setitem(losses.KL_ESTIMATORS, "k4", losses.KL_ESTIMATORS["k1"])
    assert configs.RLConfig(kl_estimator="k4", kl_metric=True).kl_estimator == "k4"
    with pytest.raises(ValueError, match=r"rl\.kl_estimator='k5' is invalid"):
        configs.RLConfig(kl_estimator="k5", kl_metric=True)


def test_run_name_follows_the_algorithm_set_after_it():
    c = quickstart.get_config()
    base.set_algorithm(c, "grpo")
    c.rl.group_size = 4
    assert configs.experiment_config(c).name == "quickstart-grpo-G4-s0"
    c.name = "run-{algo}"
    with pytest.raises(ValueError, match=r"config field name='run-\{algo\}' is invalid"):
        configs.experiment_config(c)


def test_the_algorithm_is_resolved_once_when_the_config_is_validated(monkeypatch):
    calls = []
    get = algorithms.get_algorithm
    monkeypatch.setattr(
        algorithms, "get_algorithm", lambda *a, **k: calls.append(a) or get(*a, **k)
    )
    rl = configs.RLConfig(algorithm="grpo", hparams=(("kl_beta", 0.1),), group_size=2)
    assert len(calls) == 1
    for _ in range(3):
        assert rl.needs_reference_logprobs and rl.uses_reference and not rl.samples_reference
        assert rl.algo.hparams["kl_beta"] == 0.1
    assert len(calls) == 1


def _train_command(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/quickstart.py", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--config.rl.hparams.kl_beta=0.1",
            r"config field\(s\) \['rl.hparams.kl_beta'\] are not used by algorithm 'aapo'; "
            r"its hyper-parameters are \['margin_high', 'margin_low', 'scale_rewards'\]",
        ),
        ("--config.train.stepz=3", r"unknown config field\(s\) \['train.stepz'\]; valid: \["),
        ("--import=no_such_plugin", r"--import=no_such_plugin: cannot import module"),
    ],
)
def test_a_bad_command_line_names_the_field_without_a_traceback(tmp_path, flag, message):
    proc = _train_command(flag, f"--workdir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # nothing was started


def test_import_flags_are_read_from_the_command_line():
    argv = ["--import=a", "--config=x.py", "--import", "b.c", "--imports=z", "-import=d"]
    assert plugins.names_in_argv(argv) == ["a", "b.c", "d"]
    with pytest.raises(plugins.PluginError, match=r"--import=no_such_module: .*context here"):
        plugins.import_modules(["json", "no_such_module"], context="context here")
    assert plugins.import_modules(["json"]) == ("json",)


def test_evaluate_flags_make_one_checked_settings_record(capsys):
    from experiments import evaluate

    args = evaluate.parse_args(["--model=M", "--top_k=5", "--min_p=0.1", "--temperature=0.8"])
    assert args.sampling == sampling.SamplerSettings(
        max_new_tokens=evaluate.DEFAULT_MAX_NEW_TOKENS,
        temperature=0.8,
        top_p=0.95,
        top_k=5,
        min_p=0.1,
    )
    for flag, value in (("top_k", -1), ("min_p", 1.5), ("top_p", 0.0)):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--model=M", f"--{flag}={value}"])
        assert f"--{flag}={value} is invalid" in capsys.readouterr().err


def test_a_new_sampler_setting_is_an_evaluate_flag_with_no_edit_to_evaluate(monkeypatch):
    """The flags are the record's fields: one added to `SamplerSettings` appears in
    `evaluate`, with its type and default, and reaches the record."""
    from experiments import evaluate

    @dataclasses.dataclass(frozen=True)
    class WithRepetitionPenalty(sampling.SamplerSettings):
        repetition_penalty: float = 1.0

    paper = WithRepetitionPenalty(**dataclasses.asdict(evaluation.PAPER_SAMPLING))
    monkeypatch.setattr(sampling, "SamplerSettings", WithRepetitionPenalty)
    monkeypatch.setattr(evaluation, "PAPER_SAMPLING", paper)
    assert list(evaluate.sampling_flags())[-1] == "repetition_penalty"
    args = evaluate.parse_args(["--model=M", "--repetition_penalty=1.2"])
    assert args.sampling.repetition_penalty == 1.2 and args.sampling.top_p == 0.95
    assert evaluate.parse_args(["--model=M"]).sampling.repetition_penalty == 1.0


def test_compare_imports_plugins_before_it_checks_the_algorithm_names(tmp_path, capsys):
    from experiments import compare

    for argv, message in (
        (["--import=no_such_plugin"], "--import=no_such_plugin: cannot import module"),
        (["--algos=margin_only"], "--algos: unknown ['margin_only']"),
    ):
        with pytest.raises(SystemExit):
            compare.main([f"--workdir={tmp_path}", *argv])
        assert message in capsys.readouterr().err

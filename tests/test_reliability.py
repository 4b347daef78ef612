"""Reliability: exact resume after kill -9, config checks on resume, faults that name their fix."""

import errno
import json
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from aapo_jax import checkpoint, configs, data, metrics, models, trainer
from tests import hf_fixtures
from tests.helpers import tiny_config, train_process, trained_steps, wait_for


def _kill_when(proc: subprocess.Popen, ready) -> None:
    wait_for(proc, ready)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()


def _params(workdir: Path) -> list[np.ndarray]:
    hf_fixtures.register_test_rewards()  # the runs' config names a test reward
    model, _ = trainer.load_trained_model(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_kill9_twice_resumes_bit_identically_and_logs_each_step_once(tiny_model_dir, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_config\n\n\n"
        f"def get_config():\n    return tiny_config({str(tiny_model_dir)!r}, steps=12, "
        "checkpoint_every=3, samples_every=2)\n"
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = train_process(config_file, straight)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    # Mid-step, past the step-3 checkpoint; then just after the step-9 checkpoint is
    # committed (orbax renames its temporary directory to the step number).
    _kill_when(
        train_process(config_file, resumed), lambda: max(trained_steps(resumed), default=0) >= 4
    )
    _kill_when(train_process(config_file, resumed), (resumed / "checkpoints" / "9").is_dir)
    proc = train_process(config_file, resumed)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output

    for a, b in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = metrics.read_metrics(resumed)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 12]
    losses = [r["loss"] for r in metrics.read_metrics(straight) if "loss" in r]
    assert [r["loss"] for r in rows if "loss" in r] == losses  # the same floats, step by step
    sample_steps = [json.loads(line)["step"] for line in (resumed / "samples.jsonl").open()]
    assert sorted(set(sample_steps)) == [2, 4, 6, 8, 10, 12]
    assert sample_steps == sorted(sample_steps)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["processes"] == 3
    assert summary["wall_seconds"] > sum(json.loads((resumed / trainer.WALL_FILE).read_text())[:2])


def test_a_changed_config_refuses_to_resume_naming_the_fields(tiny_model_dir, trained_workdir):
    c = tiny_config(tiny_model_dir, steps=3)
    c.rl.group_size = 2
    c.optim.learning_rate = 2e-3
    start = time.perf_counter()
    with pytest.raises(trainer.ResumeError) as info:
        trainer.Trainer(configs.experiment_config(c), trained_workdir)
    assert time.perf_counter() - start < 10  # before the model loads
    message = str(info.value)
    assert "rl.group_size: 4 -> 2" in message and "optim.learning_rate: 0.001 -> 0.002" in message
    assert "train.allow_config_change=True" in message and str(trained_workdir) in message
    # Steps and cadence may change: listed in the summary, not refused.
    summary = trainer.train(
        configs.experiment_config(tiny_config(tiny_model_dir, steps=3, eval_every=2)),
        trained_workdir,
    )
    (change,) = summary["config_changes_on_resume"]
    assert change["step"] == 2
    assert change["changes"]["train.steps"] == [2, 3]
    assert change["changes"]["train.eval_every"] == [0, 2]
    # An explicit override resumes under the new config.
    c.train.allow_config_change = True
    c.train.steps = c.optim.total_steps = 4
    summary = trainer.train(configs.experiment_config(c), trained_workdir)
    assert summary["steps"] == 4 and summary["group_size"] == 2
    assert len(summary["config_changes_on_resume"]) == 2


def test_a_checkpoint_of_another_model_names_the_differing_weights(trained_workdir, tmp_path):
    other = hf_fixtures.make_model_dir(tmp_path / "llama", family="llama3_tied")
    c = tiny_config(other, steps=3, allow_config_change=True)
    with pytest.raises(trainer.ResumeError) as info:
        trainer.train(configs.experiment_config(c), trained_workdir)
    message = str(info.value)
    assert "does not fit this run's train state" in message and "params/" in message
    assert "another model or optimizer" in message
    assert "partial_restore" not in message


def test_paths_are_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the config's paths were checked")

    monkeypatch.setattr(models, "load_hf_checkpoint", never)
    cases = [
        ({"model.path": str(tmp_path / "nope")}, r"model\.path=.*no such directory"),
        ({"model.path": str(tmp_path)}, r"model\.path=.*no config\.json"),
        ({"model.tokenizer_path": str(tmp_path)}, r"model\.tokenizer_path=.*no tokenizer"),
        ({"data.name": "chian_sum"}, r"data\.name.*unknown reasoning-gym task.*chain_sum"),
        (
            {
                "data.source": "jsonl",
                "data.name": "",
                "data.gym_kwargs": {},
                "data.path": str(tmp_path / "x.jsonl"),
            },
            r"data\.path=.*no such file",
        ),
    ]
    for settings, message in cases:
        c = tiny_config(tiny_model_dir)
        for field, value in settings.items():
            section, key = field.split(".")
            c[section][key] = value
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            trainer.Trainer(configs.experiment_config(c), tmp_path / "wd")


def test_non_utf8_data_names_the_file_and_line_and_null_answers_are_counted(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b'{"question": "1+1", "answer": "2"}\n{"question": "caf\xe9", "answer": "3"}\n'
    )
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: not UTF-8 text \(byte b'\\xe9'"):
        data.read_records(path)
    path.write_text(
        '{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": null}\n'
        '{"question": "3+3", "answer": null}\n'
    )
    with caplog.at_level("WARNING"):
        examples = data.read_records(path)
    assert "2 of 3 records have a null 'answer' (first: line 2)" in caplog.text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_fixtures.make_tokenizer(tmp_path / "tok"))
    _, stats = data.encode_examples(examples, tokenizer, max_prompt_length=64)
    assert stats.empty_answer == 2 and stats.kept == 3


def test_non_finite_updates_in_a_row_abort_keeping_the_last_checkpoint(tiny_model_dir, tmp_path):
    # A step of 1e30 (AdamW moves every weight by about the learning rate) overflows the
    # forward, so every later loss is non-finite and its update skipped.
    c = tiny_config(tiny_model_dir, steps=8, max_consecutive_skips=2, checkpoint_every=1)
    c.optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"2 updates in a row.*steps 2–3") as info:
        trainer.train(configs.experiment_config(c), tmp_path)
    assert "train.max_consecutive_skips=2" in str(info.value)
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    rows = metrics.read_metrics(tmp_path)
    assert [r["update_skipped"] for r in rows if "loss" in r] == [0.0, 1.0, 1.0]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path):
    config = configs.experiment_config(tiny_config(tiny_model_dir, steps=3, checkpoint_every=1))
    run = trainer.Trainer(config, tmp_path)
    real_save = run.checkpointer.save

    def save(step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(step, *args, **kwargs)

    run.checkpointer.save = save
    try:
        with pytest.raises(OSError, match=r"step-2 checkpoint .*No space left.*step 1\) is intact"):
            run.run(progress=False)
    finally:
        run.close()
    summary = trainer.train(config, tmp_path)  # resumes from step 1
    assert summary["steps"] == 3
    assert [r["step"] for r in metrics.read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]


def test_sigterm_during_startup_or_the_initial_eval(tiny_model_dir, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_config\n\n\n"
        f"def get_config():\n    c = tiny_config({str(tiny_model_dir)!r}, steps=2)\n"
        "    c.data.eval_size = c.train.eval_size = 64\n    c.train.eval_batch_size = 4\n"
        "    return c\n"
    )
    workdir = tmp_path / "wd"
    # During start-up (imports, model load): the default action, at once; nothing saved.
    proc = train_process(config_file, workdir)
    time.sleep(1.0)
    proc.terminate()
    assert proc.wait(timeout=30) != 0
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() is None
    # During the initial eval (the metric writer opens just before it): the eval
    # finishes, step 0 is saved with it, and the exit is clean.
    proc = train_process(config_file, workdir)
    wait_for(proc, (workdir / "tensorboard").is_dir)
    proc.terminate()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and '"interrupted": true' in output, output
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == 0
    # The resumed run does not evaluate again at step 0.
    proc = train_process(config_file, workdir)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_keep_through_and_rewrite_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [
        {"step": 0, "eval/accuracy": 0.1},  # the initial eval
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0, "eval/accuracy": 0.2},  # a periodic eval, merged
        {"step": 3, "loss": 3.0},
        {"step": 3, "eval/accuracy": 0.3},  # a final eval: evaluated again on resume
        {"step": 4, "loss": 4.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"step": 5, "lo')  # a row torn by a kill
    assert metrics.rewrite_rows(path, metrics.keep_through(3)) == 3
    assert metrics.read_metrics(path) == rows[:4]
    assert not (tmp_path / "m.jsonl.tmp").exists()
    assert metrics.rewrite_rows(path, metrics.keep_through(0)) == 3
    assert metrics.read_metrics(path) == rows[:1]
    assert metrics.rewrite_rows(path, metrics.keep_through(-1)) == 1
    assert path.read_text() == ""
    assert metrics.rewrite_rows(tmp_path / "absent.jsonl", metrics.keep_through(2)) == 0


def test_config_changes_and_which_refuse_a_resume():
    saved = {"rl": {"group_size": 8, "hparams": {"margin_low": 0.2}}, "train": {"steps": 10}}
    current = {"rl": {"group_size": 4, "hparams": {"margin_low": 0.2}}, "train": {"steps": 20}}
    changes = configs.config_changes(saved, current)
    assert changes == {"rl.group_size": (8, 4), "train.steps": (10, 20)}
    assert configs.refused_resume_changes(changes) == {"rl.group_size": (8, 4)}
    assert configs.config_changes({"a": (1, 2)}, {"a": [1, 2]}) == {}  # JSON lists vs tuples

"""Reliability: exact resume after kill -9, config checks on resume, faults that name their fix."""

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from aapo_jax import checkpoint, configs, data, lock, metrics, models, rewards, trainer
from aapo_jax.types import TrainState
from tests import hf_fixtures
from tests.helpers import REPO, tiny_config, train_process, trained_steps, wait_for


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
    # A run saved before `sampling.decode_attention` existed resumes: the same attention.
    saved, current = (
        {"sampling": {"top_k": 50}},
        {"sampling": {"top_k": 50, "decode_attention": "auto"}},
    )
    changes = configs.config_changes(saved, current)
    assert changes == {"sampling.decode_attention": (None, "auto")}
    assert configs.refused_resume_changes(changes) == {}


# -- one run per workdir -------------------------------------------------------------------


def test_the_workdir_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom aapo_jax import lock\n"
            f"held = lock.WorkdirLock({str(tmp_path)!r})\nprint('held', flush=True)\n"
            "time.sleep(600)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.WorkdirBusyError) as info:
            lock.WorkdirLock(tmp_path)
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(tmp_path) in message and "--workdir" in message
        lock.WorkdirLock(tmp_path, process_index=1).release()  # another process's own file
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    with lock.WorkdirLock(tmp_path) as held:
        assert held.held
        with pytest.raises(lock.WorkdirBusyError, match=r"\(this process\)"):
            lock.WorkdirLock(tmp_path)
    lock.WorkdirLock(tmp_path).release()  # released on exit from the block


def test_a_second_run_in_a_busy_workdir_is_refused_and_the_first_run_is_intact(
    tiny_model_dir, tmp_path
):
    config_files = {}
    for seed, steps in ((0, 500), (1, 15)):
        config_files[seed] = tmp_path / f"seed{seed}.py"
        config_files[seed].write_text(
            "from tests.helpers import tiny_config\n\n\n"
            f"def get_config():\n    return tiny_config({str(tiny_model_dir)!r}, steps={steps}, "
            f"seed={seed}, checkpoint_every=3)\n"
        )
    workdir = tmp_path / "wd"
    first = train_process(config_files[0], workdir)
    wait_for(first, lambda: bool(trained_steps(workdir)))
    second = train_process(config_files[1], workdir)
    output, _ = second.communicate(timeout=120)
    assert second.returncode != 0
    assert f"pid {first.pid} on host {socket.gethostname()}" in output, output
    assert "Traceback" not in output, output
    assert first.poll() is None  # still training, untouched
    # Two stop signals: at once (no further step or save), one line, no traceback.
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    assert first.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), output
    assert "received twice: stopped at once" in output and "Traceback" not in output, output
    steps = trained_steps(workdir)
    assert steps == list(range(1, len(steps) + 1))
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() <= steps[-1]
    assert len(json.loads((workdir / trainer.WALL_FILE).read_text())) == 1


# -- verified restores ---------------------------------------------------------------------


def _damage(step_dir: Path, how: str) -> None:
    # Every data file of the state: one file may hold only bytes that no array reads.
    data = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    for f in data:
        size = f.stat().st_size
        if how == "overwritten":  # 4 KiB of noise from the middle on
            with f.open("r+b") as out:
                out.seek(size // 2)
                out.write(np.random.default_rng(0).bytes(4096))
        elif how == "truncated":
            os.truncate(f, size // 2)
    if how == "no manifest":
        for manifest in step_dir.rglob("manifest.ocdbt"):
            manifest.unlink()
    elif how == "no meta":
        shutil.rmtree(step_dir / "meta")
    elif how == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()


def test_damaged_newest_checkpoints_are_named_set_aside_and_the_previous_one_resumes(
    tiny_model_dir, tmp_path, caplog
):
    c = tiny_config(tiny_model_dir, steps=8, checkpoint_every=1, keep_checkpoints=8)
    straight = tmp_path / "straight"
    trainer.train(configs.experiment_config(c), straight)
    # The newest four checkpoints damaged, each its own way (and an empty step directory):
    # the resumed run names each, falls back to step 3 and ends where the straight one did.
    workdir = Path(shutil.copytree(straight, tmp_path / "wd"))
    damage = {8: "empty", 7: "overwritten", 6: "truncated", 5: "no manifest", 4: "no meta"}
    for step, how in damage.items():
        _damage(workdir / "checkpoints" / str(step), how)
    with caplog.at_level(logging.WARNING, logger="aapo_jax"):
        summary = trainer.train(configs.experiment_config(c), workdir)
    warned = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    reasons = {
        "empty": "its meta item",
        "overwritten": "reading it failed|its data differ from what was saved",
        "truncated": "reading it failed",
        "no manifest": "reading it failed",
        "no meta": 'Item "meta" was not found',
    }
    assert len(warned) == len(damage), caplog.text
    for message, (step, how) in zip(warned, damage.items(), strict=True):
        assert f"step-{step} checkpoint in {workdir / 'checkpoints'}" in message, message
        assert re.search(reasons[how], message) and f"trying step {step - 1}" in message, message
    assert sorted(int(p.name) for p in (workdir / checkpoint.UNUSABLE_DIR).iterdir()) == [
        4,
        5,
        6,
        7,
        8,
    ]
    assert summary["steps"] == 8
    assert [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r] == list(range(1, 9))
    for a, b in zip(_params(straight), _params(workdir), strict=True):
        np.testing.assert_array_equal(a, b)


def _state(value: float):
    params = {"w": jax.numpy.full((4, 3), value, jax.numpy.float32)}
    tx = optax.adam(1e-3)
    return TrainState(
        step=jax.numpy.int32(0),
        params=params,
        opt_state=tx.init(params),
        ref_params=None,
        rng=jax.random.key(0),
        skipped_updates=jax.numpy.int32(0),
    )


def test_fingerprints_catch_changed_bytes_and_rotation_keeps_the_verified_checkpoint(tmp_path):
    state = _state(1.0)
    tree = checkpoint._to_saveable(state)
    print_ = checkpoint.Fingerprint.of(tree)
    assert not print_.non_finite and print_.mismatch(print_.checksums) == ""
    for changed in (2.0, 0.0):
        other = checkpoint.Fingerprint.of(checkpoint._to_saveable(_state(changed)))
        assert "params/w" in other.mismatch(print_.checksums)
    swapped = state.params["w"].at[0, 0].set(2.0).at[1, 0].set(0.0)  # same sum, moved
    moved = checkpoint.Fingerprint.of({**tree, "params": {"w": swapped}})
    assert moved.mismatch(print_.checksums)

    with checkpoint.Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state, data={}, meta={"config": {}})
        ckpt.restore_newest(state)
        assert ckpt.verified_step == 3
        for step in (4, 5, 6):  # newer, never read back: step 3 stays
            ckpt.save(step, state, data={}, meta={"config": {}})
        assert ckpt.all_steps() == [3, 5, 6]
        poisoned = state.replace(params={"w": state.params["w"].at[0, 0].set(np.nan)})
        with pytest.raises(FloatingPointError, match=r"step-7 state: params/w hold a NaN"):
            ckpt.save(7, poisoned, data={}, meta={"config": {}})
        assert ckpt.all_steps() == [3, 5, 6]


def test_a_restored_non_finite_state_is_refused_for_the_previous_checkpoint(tmp_path, monkeypatch):
    state = _state(1.0)
    poisoned = state.replace(params={"w": state.params["w"].at[2, 1].set(np.inf)})
    with checkpoint.Checkpointer(tmp_path, max_to_keep=3, async_save=False) as ckpt:
        ckpt.save(1, state, data={"at": 1}, meta={"config": {}})
        real = checkpoint.Fingerprint.of
        # Written by a version that saved anything (its fingerprint says finite).
        monkeypatch.setattr(
            checkpoint.Fingerprint,
            "of",
            classmethod(lambda cls, tree: dataclasses.replace(real(tree), non_finite=())),
        )
        ckpt.save(2, poisoned, data={"at": 2}, meta={"config": {}})
        monkeypatch.undo()
        restored, data_state, _ = ckpt.restore_newest(state)
    assert data_state == {"at": 1} and ckpt.unusable[2] == "params/w hold a NaN or inf"
    np.testing.assert_array_equal(restored.params["w"], state.params["w"])


# -- rewards that hang, break their contract or always fail --------------------------------


def _faulty_reward_config(model_dir, reward: str, **train):
    c = tiny_config(model_dir, **train)
    c.reward.names = (reward,)
    c.reward.timeout_s = 0.5
    c.train.prompts_per_step = 2
    c.rl.group_size = 2
    return c


def test_an_in_process_hanging_reward_is_bounded_and_sigterm_stops_the_run(
    tiny_model_dir, tmp_path
):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.test_reliability import _faulty_reward_config\n\n\n"
        "def get_config():\n"
        f"    c = _faulty_reward_config({str(tiny_model_dir)!r}, 'hangs', steps=500)\n"
        "    c.reward.max_failed_steps = 0  # scored 0 every time, on purpose\n"
        "    return c\n"
    )
    workdir = tmp_path / "wd"
    proc = train_process(config_file, workdir)
    wait_for(proc, lambda: len(trained_steps(workdir)) >= 1)  # steps end: each sample ≤ 0.5 s
    proc.send_signal(signal.SIGTERM)  # the step in progress ends, is saved, exit 0
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and '"interrupted": true' in output, output
    assert "8/8 samples timed out" in output or "4/4 samples timed out" in output, output
    steps = trained_steps(workdir)
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == steps[-1]


def test_a_reward_of_the_wrong_type_fails_at_its_first_call_naming_it(tiny_model_dir, tmp_path):
    c = _faulty_reward_config(tiny_model_dir, "returns_strings", steps=3)
    with pytest.raises(rewards.RewardContractError, match="'returns_strings'"):
        trainer.train(configs.experiment_config(c), tmp_path)
    assert not [r for r in metrics.read_metrics(tmp_path) if "loss" in r]


def test_a_reward_that_fails_on_every_sample_stops_the_run(tiny_model_dir, tmp_path):
    c = _faulty_reward_config(tiny_model_dir, "always_raises", steps=8, checkpoint_every=1)
    c.reward.max_failed_steps = 2
    with pytest.raises(trainer.RewardFailureError) as info:
        trainer.train(configs.experiment_config(c), tmp_path)
    message = str(info.value)
    assert "2 steps in a row (steps 1–2" in message and "'always_raises'" in message
    assert "ConnectionError: the grading service is down" in message
    assert "reward.max_failed_steps=2" in message
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == []
    assert [r["step"] for r in metrics.read_metrics(tmp_path) if "loss" in r] == [1, 2]


def test_wall_seconds_count_from_the_process_start():
    probe = (
        "import time\ntime.sleep(1.5)\nfrom aapo_jax import process\n"
        "print(time.time() - process.process_start_time())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert 1.5 <= float(out.stdout) < 120

"""The training loop end to end on a tiny random model: outputs, resume, SIGTERM, writers."""

import json
import signal
import time

import jax
import numpy as np
import pytest
from flax import nnx

from aapo_jax import checkpoint, configs, metrics, models, sharding, trainer
from experiments import evaluate
from tests.helpers import tiny_config, train_process


def test_two_steps_write_metrics_plots_checkpoints_and_summary(tiny_model_dir, trained_run):
    c = tiny_config(tiny_model_dir)  # the config of `trained_run`
    assert c.optim.weight_decay == 0.0  # only the gradient can move the weights
    workdir, summary = trained_run
    for key in ("initial_eval_accuracy", "final_eval_accuracy", "eval_problems", "steps"):
        assert key in summary
    assert summary["steps"] == 2 and summary["eval_problems"] == 8
    assert json.loads((workdir / "summary.json").read_text()) == summary
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]
    assert all(r["reward_std"] > 0 and abs(r["loss"]) > 1e-5 for r in rows if "loss" in r)
    assert {r["step"] for r in rows if "eval/accuracy" in r} == {0, 2}
    for name in summary["plots"]:
        assert (workdir / name).stat().st_size > 1000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "reward", "answer"} <= set(samples[0])
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == 2
    # The trained policy loads back from the workdir and evaluates like the run's last eval.
    model, config = trainer.load_trained_model(workdir)
    assert config.name == "tiny"
    initial = models.load_hf_checkpoint(tiny_model_dir)
    # Every parameter array moved, by its gradient (no weight decay).
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
        nnx.state(model, nnx.Param),
        nnx.state(initial, nnx.Param),
    )
    assert all(jax.tree.leaves(moved)), moved
    report = evaluate.run(
        evaluate.parse_args(
            [
                f"--model={workdir}",
                "--task=gym:chain_sum",
                "--n=2",
                "--eval_size=8",
                "--template={question}",
                '--gym_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}',
                "--train_size=64",
                "--max_new_tokens=6",
            ]
        )
    )
    assert report["model"] == str(workdir) and report["num_problems"] == 8
    assert report["greedy_accuracy"] == pytest.approx(summary["final_eval_accuracy"])


STEP_KEYS = ("loss", "grad_norm", "reward_mean", "ref_reward_mean", "margin_mean", "entropy")


def test_resume_gives_the_same_next_step(tiny_model_dir, trained_workdir, tmp_path):
    straight = tmp_path / "straight"
    trainer.train(configs.experiment_config(tiny_config(tiny_model_dir, steps=3)), straight)
    resumed = trained_workdir  # two steps of the same config
    summary = trainer.train(
        configs.experiment_config(tiny_config(tiny_model_dir, steps=3)), resumed
    )
    assert summary["steps"] == 3

    def step3(workdir):
        (row,) = [r for r in metrics.read_metrics(workdir) if r["step"] == 3 and "loss" in r]
        return {k: row[k] for k in STEP_KEYS}

    expected, got = step3(straight), step3(resumed)
    for key in STEP_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


def test_no_eval_split_trains_summarises_and_resumes(
    tiny_model_dir, tmp_path, monkeypatch, caplog, capsys
):
    """data.eval_size=0 (the paper configs): nothing is evaluated, no eval scorer is made,
    train.eval_every is ignored with a note; the checkpoint's empty initial eval restores,
    so a restart resumes rather than starting over."""

    def no_eval(*args, **kwargs):
        raise AssertionError("evaluation.evaluate called with no eval split")

    monkeypatch.setattr(trainer.evaluation, "evaluate", no_eval)
    c = tiny_config(tiny_model_dir, eval_every=1, samples_every=0)
    c.data.eval_size = 0
    with caplog.at_level("INFO", logger="aapo_jax.trainer"):
        run = trainer.Trainer(configs.experiment_config(c), tmp_path)
    try:
        assert run.eval_examples == [] and run.eval_scorer is None
        summary = run.run(progress=True)
    finally:
        run.close()
    bar = capsys.readouterr().err
    assert "reward=" in bar and "acc=" not in bar
    assert "train.eval_every=1 is ignored" in caplog.text
    assert summary["steps"] == 2 and summary["eval_problems"] == 0
    assert summary["initial_eval_accuracy"] is None and summary["final_eval_accuracy"] is None
    assert summary["plots"] == ["reward_mean.png", "training.png"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    rows = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]  # no eval rows
    assert not [k for r in rows for k in r if k.startswith("eval/")]
    with checkpoint.Checkpointer(tmp_path / "checkpoints") as saved:
        assert saved.read_meta(2)["initial_eval"] == {}

    # The restart restores {} as the initial eval: it resumes at step 2 (None would restart).
    caplog.clear()
    with caplog.at_level("INFO", logger="aapo_jax.trainer"):
        summary = trainer.train(configs.experiment_config(c), tmp_path, progress=False)
    assert "resumed from step 2" in caplog.text
    assert summary["steps"] == 2 and summary["final_eval_accuracy"] is None
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]


@pytest.mark.parametrize("kind", ["host", "token"])
def test_sharded_mesh_trains_like_one_device(tiny_model_dir, tmp_path, kind):
    """data × fsdp × tensor = 2 × 2 × 2 on the 8 CPU devices, and a data-parallel 4 × 1 × 1
    mesh (each device samples and differentiates its own prompt): same steps as one device."""
    meshes = {
        "one": dict(data=1, fsdp=1, tensor=1),
        "mesh": dict(data=2, fsdp=2, tensor=2),
        "data": dict(data=4, fsdp=1, tensor=1),
    }
    if kind == "token":  # the data-parallel mesh's row split is the host path's
        del meshes["data"]
    runs = {}
    for name, mesh in meshes.items():
        c = tiny_config(tiny_model_dir, eval_every=0, samples_every=0)
        c.optim.eps = 1.0  # keep the update linear in the gradient (see test_train_step.py)
        c.mesh = mesh
        if kind == "token":
            c.reward.kind, c.reward.names = "token", ("low_token_share",)
        trainer.train(configs.experiment_config(c), tmp_path / name)
        runs[name] = [r for r in metrics.read_metrics(tmp_path / name) if "loss" in r]
    assert all(abs(r["loss"]) > 1e-5 and r["grad_norm"] > 1e-4 for r in runs["one"])
    model_one, _ = trainer.load_trained_model(tmp_path / "one")
    for name in set(meshes) - {"one"}:
        assert [r["step"] for r in runs[name]] == [1, 2]
        for one, mesh in zip(runs["one"], runs[name], strict=True):
            for key in STEP_KEYS:
                assert mesh[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), (name, key)
        model_mesh, _ = trainer.load_trained_model(tmp_path / name)
        np.testing.assert_allclose(
            np.asarray(model_mesh.embed.value), np.asarray(model_one.embed.value), atol=1e-6
        )


def test_load_trained_model_onto_a_mesh(trained_run):
    """Restored straight onto the mesh's shardings, equal to the one-device restore."""
    alone, _ = trainer.load_trained_model(trained_run.workdir)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model, config = trainer.load_trained_model(trained_run.workdir, mesh=mesh)
    assert config.train.steps == 2
    embed = model.embed.value
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(embed.sharding.device_set) == 8
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(alone)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_token_reward_path(tiny_model_dir, tmp_path):
    c = tiny_config(tiny_model_dir)
    c.reward.kind = "token"
    c.reward.names = ("exact_match",)
    c.reward.eval_name = "gym:chain_sum"
    c.train.export_hf = True
    summary = trainer.train(configs.experiment_config(c), tmp_path)
    assert summary["steps"] == 2
    rows = [r for r in metrics.read_metrics(tmp_path) if "reward_mean" in r]
    assert rows and all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    # export_hf: the final policy as a Hugging Face directory, tokenizer included.
    exported = models.load_hf_checkpoint(tmp_path / "hf")
    trained, _ = trainer.load_trained_model(tmp_path)
    np.testing.assert_array_equal(np.asarray(exported.embed.value), np.asarray(trained.embed.value))
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_sigterm_saves_a_restorable_checkpoint(tiny_model_dir, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_config\n\n\n"
        f"def get_config():\n    return tiny_config({str(tiny_model_dir)!r}, steps=500)\n"
    )
    workdir = tmp_path / "wd"
    proc = train_process(config_file, workdir)
    deadline = time.time() + 240
    rows = []
    while time.time() < deadline and len([r for r in rows if "loss" in r]) < 3:
        time.sleep(0.5)
        if (workdir / metrics.METRICS_FILE).exists():
            rows = metrics.read_metrics(workdir)
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert '"interrupted": true' in output
    step = checkpoint.Checkpointer(workdir / "checkpoints").latest_step()
    assert 3 <= step < 500
    # The checkpoint restores: a new run resumes from it and finishes.
    config = configs.experiment_config(tiny_config(tiny_model_dir, steps=step + 1))
    summary = trainer.train(config, workdir)
    assert summary["steps"] == step + 1


def test_wandb_offline_logging(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, wandb_project="aapo-jax-test")
    writer.write_scalars(1, {"reward_mean": 0.5})
    writer.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert metrics.read_metrics(tmp_path) == [{"step": 1, "reward_mean": 0.5}]


def test_tensorboard_tags_are_valid_without_warnings(tmp_path, caplog):
    assert metrics.tensorboard_tag("reward/gym:chain_sum") == "reward/gym_chain_sum"
    assert metrics.tensorboard_tag("eval/pass@1 (n=4)") == "eval/pass_1__n_4_"
    assert metrics.tensorboard_tag("loss-v2.a/b_c") == "loss-v2.a/b_c"
    writer = metrics.MetricWriter(tmp_path)
    with caplog.at_level("INFO"):
        writer.write_scalars(1, {"reward/gym:chain_sum": 0.5})
    writer.close()
    assert not [r for r in caplog.records if "illegal" in r.getMessage()]
    assert metrics.read_metrics(tmp_path) == [{"step": 1, "reward/gym:chain_sum": 0.5}]


def test_bad_config_fails_before_anything_is_built(tiny_model_dir):
    cases = [
        (("rl", "algorithm", "ppo"), r"rl\.algorithm='ppo'"),
        (("rl", "group_size", 1), r"rl\.group_size=1 .*≥ 2 for algorithm 'aapo'"),
        (("reward", "weights", (1.0, 2.0)), r"reward\.weights"),
        (("reward", "names", ("acuracy",)), r"reward\.names\[0\]='acuracy'.*unknown host reward"),
        (("reward", "names", ("gym:chian_sum",)), r"reward\.names\[0\].*did you mean"),
        (("reward", "eval_name", "gym:nope"), r"reward\.eval_name='gym:nope'"),
        (("rl", "reference_ema_rate", 0.5), r"rl\.reference_ema_rate=0\.5 has no effect"),
    ]
    for (section, field, value), message in cases:
        c = tiny_config(tiny_model_dir)
        setattr(c[section], field, value)
        with pytest.raises(ValueError, match=message):
            configs.experiment_config(c)
    # A hyper-parameter the algorithm does not use (AAPO has no KL penalty).
    c = tiny_config(tiny_model_dir)
    c.rl.hparams.margin_low = 0.5
    d = c.to_dict()
    d["rl"]["hparams"]["kl_beta"] = 0.1
    with pytest.raises(ValueError, match=r"rl\.hparams\.kl_beta.*not used by algorithm 'aapo'"):
        configs.experiment_config(d)
    # A config written without the shared steps reference.
    d = tiny_config(tiny_model_dir).to_dict()
    d["optim"]["total_steps"] = 7
    with pytest.raises(ValueError, match=r"optim\.total_steps=7"):
        configs.experiment_config(d)
    d["optim"]["total_steps"] = 2
    d["optim"]["learning_rat"] = 2
    with pytest.raises(ValueError, match=r"unknown config field.*'optim\.learning_rat'"):
        configs.experiment_config(d)

"""The host loop: prompts → sample → score → train step → log → evaluate → checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from aapo_jax import checkpoint as checkpoint_lib
from aapo_jax import (
    configs,
    evaluation,
    models,
    plugins,
    rewards,
    rl_step,
    rollout,
    sampling,
    sharding,
)
from aapo_jax import data as data_lib
from aapo_jax import metrics as metrics_lib
from aapo_jax import train_step as train_step_lib
from aapo_jax.configs import ExperimentConfig
from aapo_jax.data import pipeline, sources
from aapo_jax.data.tokenize import decode_completions
from aapo_jax.optim import make_optimizer
from aapo_jax.types import PromptBatch, Rollout

logger = logging.getLogger(__name__)

SUMMARY_FILE = metrics_lib.SUMMARY_FILE
# Wall seconds of every process that ran in a workdir, so a resumed run's total counts all.
WALL_FILE = "wall_seconds.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ResumeError(ValueError):
    """A workdir's checkpoint cannot continue under this run's config or train state."""


def check_before_loading(config: ExperimentConfig) -> None:
    """What can fail without loading a model, checked in seconds, naming the field.

    The model directory (`model.path`, holding `config.json`), the tokenizer directory
    (`model.tokenizer_path`, default `model.path`), and the data (`data.sources.check_source`:
    the reasoning-gym task, the files). Reward and verifier names are checked when the
    config is made.

    Raises:
      FileNotFoundError / ValueError naming the config field.
    """
    path = config.model.path
    if not (Path(path) / "config.json").is_file():
        what = "no such directory" if not Path(path).is_dir() else "no config.json in it"
        raise FileNotFoundError(
            f"config field model.path={path!r}: {what}; expected a local Hugging Face "
            "checkpoint directory."
        )
    field = "model.tokenizer_path" if config.model.tokenizer_path else "model.path"
    tokenizer_dir = Path(config.model.tokenizer_path or path)
    if not any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"config field {field}={str(tokenizer_dir)!r}: no tokenizer there (none of "
            f"{list(_TOKENIZER_FILES)})."
        )
    sources.check_source(config.data)


class Trainer:
    """Builds everything for one `ExperimentConfig` and runs the RL loop in `workdir`.

    Each step is `rl_step.make_rl_step` of the three stages: with a token reward one
    jitted program; with host rewards the jitted sampler, the time-bounded
    `rollout.HostScorer` on this process's rows, and the jitted train step. Resumes
    automatically from the newest checkpoint in `workdir/checkpoints`; SIGTERM finishes
    the current step, saves and returns.

    `imports`: the plugin modules (`--import`) the run's algorithm or rewards come from;
    they are recorded with every checkpoint so that `load_trained_model` can re-import
    them.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        workdir: str | os.PathLike,
        *,
        imports: tuple[str, ...] = (),
    ):
        self.config = cfg = config
        self.imports = tuple(imports)
        self.workdir = Path(workdir)
        check_before_loading(cfg)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = checkpoint_lib.Checkpointer(
            self.workdir / "checkpoints",
            max_to_keep=cfg.train.keep_checkpoints,
            save_reference=cfg.rl.reference != "frozen",
        )
        try:
            self.config_changes = self._check_resume()
        except Exception:
            self.checkpointer.close()
            raise
        self._saving = None
        self.mesh = sharding.make_mesh(**dataclasses.asdict(cfg.mesh))
        self.tokenizer = data_lib.load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        model = models.load_hf_checkpoint(
            cfg.model.path, mesh=self.mesh, **cfg.model.model_kwargs()
        )
        self.eos = sampling.eos_ids(model.config.eos_token_id, self.tokenizer.eos_token_id)
        self.pad = int(self.tokenizer.pad_token_id)
        self._load_data()
        # train.steps=-1 (one epoch) becomes a step count once the prompts are known.
        self.config = cfg = configs.resolve_epoch_steps(cfg, self.num_train_prompts)

        tx = make_optimizer(cfg.optim)
        self.graphdef, params = nnx.split(model)
        del model  # its weights now belong to the train state
        self.state, self.state_shardings = train_step_lib.init_train_state(
            params,
            tx,
            cfg.rl,
            seed=cfg.train.seed,
            mesh=self.mesh,
            reference_dtype=cfg.model.reference_storage(cfg.rl.reference),
        )
        self._build_stages(tx)
        self.eval_scorer = evaluation.make_scorer(
            cfg.reward.eval_name, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers
        )
        self._stop = False

    def _check_resume(self) -> list[dict]:
        """The config changes of every resume so far (checkpoint meta + this one's).

        A change outside `configs.RESUMABLE_CHANGES` raises `ResumeError` listing the
        fields, unless `train.allow_config_change`; the allowed ones are logged.
        """
        step = self.checkpointer.latest_step()
        if step is None:
            return []
        meta = self.checkpointer.read_meta(step)
        current = _jsonable(dataclasses.asdict(self.config))
        changes = configs.config_changes(meta["config"], current)
        # A one-epoch run saved its resolved step count; -1 again is the same run.
        if changes.get("train.steps", (None, None))[1] == configs.ONE_EPOCH:
            changes.pop("train.steps")
            changes.pop("optim.total_steps", None)
        refused = configs.refused_resume_changes(changes)
        listing = "\n".join(f"  {f}: {old!r} -> {new!r}" for f, (old, new) in changes.items())
        if refused and not self.config.train.allow_config_change:
            raise ResumeError(
                f"{self.workdir} holds a checkpoint (step {step}) written under another config; "
                f"these fields differ:\n{listing}\n{sorted(refused)} change the train state or "
                "what the run means, so it is not resumed. Use a new --workdir, set the fields "
                "back, or resume anyway with --config.train.allow_config_change=True."
            )
        if changes:
            logger.warning(
                "resuming %s (step %d) with config changes:\n%s", self.workdir, step, listing
            )
        history = list(meta.get("config_changes", []))
        if changes:
            history.append({"step": step, "changes": {f: list(v) for f, v in changes.items()}})
        return history

    def _build_stages(self, tx) -> None:
        """Jit the three stages once: composed into one program for a token reward."""
        cfg = self.config
        sample, update = rl_step.make_stages(
            cfg.rl,
            cfg.optim,
            cfg.sampling,
            self.graphdef,
            tx,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            mesh=self.mesh,
            decode_weights=cfg.sampling.decode_weights,
        )
        # Inputs arrive sharded (`sharding.shard_batch`); the state keeps its shardings.
        if cfg.reward.kind == "token":
            self.scorer = None
            score = rollout.make_token_scorer(rewards.get_token_reward(cfg.reward.names[0]))
            self._rl_step = jax.jit(
                rl_step.make_rl_step(sample, score, update),
                out_shardings=(self.state_shardings, None, None),
                donate_argnums=0,
            )
        else:
            self.scorer = rollout.HostScorer(
                self.tokenizer, cfg.reward, self.train_examples, mesh=self.mesh
            )
            jit_update = jax.jit(
                update, out_shardings=(self.state_shardings, None), donate_argnums=0
            )
            self._rl_step = rl_step.make_rl_step(jax.jit(sample), self.scorer, jit_update)

    def _load_data(self) -> None:
        cfg = self.config
        train_examples, eval_examples = sources.load_splits(cfg.data)
        if cfg.train.eval_size:
            eval_examples = eval_examples[: cfg.train.eval_size]
        prompt_kw = dict(
            template=cfg.prompt.template,
            system_prompt=cfg.prompt.system_prompt or None,
            use_chat_template=cfg.prompt.use_chat_template,
            max_prompt_length=cfg.sampling.max_prompt_length,
            overlong=cfg.prompt.overlong,
        )
        encoded, self.prompt_stats = pipeline.encode_examples(
            train_examples, self.tokenizer, **prompt_kw
        )
        self.num_train_prompts = len(encoded)
        self.train_examples = [p.example for p in encoded]  # PromptBatch.index points here
        eval_prompts, _ = pipeline.encode_examples(eval_examples, self.tokenizer, **prompt_kw)
        self.eval_examples = [p.example for p in eval_prompts]
        # Each eval problem's prompt as it was formatted (and checked for length) here.
        self.eval_prompt_texts = {p.example: p.text for p in eval_prompts}
        self.loader = pipeline.PromptLoader(
            encoded, batch_size=cfg.train.prompts_per_step, seed=cfg.train.seed, pad_id=self.pad
        )

    # -- one step -----------------------------------------------------------

    def prompt_batch(self, batch: pipeline.HostPromptBatch) -> PromptBatch:
        """This process's prompts of a step on the mesh: tokens, their problems' index, and
        for a token reward the gold answers as tokens."""
        targets = target_len = None
        if self.config.reward.kind == "token":
            targets, target_len = data_lib.encode_targets(self.tokenizer, batch.answers)
        prompts = PromptBatch(
            ids=batch.ids,
            mask=batch.mask,
            targets=targets,
            target_len=target_len,
            index=batch.indices.astype(np.int32),
        )
        return sharding.shard_batch(prompts, self.mesh)

    def step(self, batch: pipeline.HostPromptBatch) -> tuple[dict, Rollout]:
        """One RL iteration on this process's prompt rows; returns (metrics, the scored rollout)."""
        self.state, metrics, scored = self._rl_step(self.state, self.prompt_batch(batch))
        return jax.device_get(metrics), scored

    def sample_logs(self, batch: pipeline.HostPromptBatch, scored: Rollout) -> list[dict]:
        """The first `train.num_samples_logged` completions of this process's rows, with their
        prompt, gold answer and reward. Every process calls it (it gathers the rows)."""
        g = self.config.rl.group_size
        b = len(batch.answers)
        mine = rollout.process_rows(scored, b * g)
        start = jax.process_index() * b
        rewards_N = sharding.to_host(scored.rewards)[start : start + b].reshape(-1)
        count = min(self.config.train.num_samples_logged, b * g)
        out = mine.policy
        texts = decode_completions(self.tokenizer, out.tokens[:count], out.lengths[:count])
        return [
            {
                "prompt": batch.questions[i // g],
                "answer": batch.answers[i // g],
                "completion": texts[i],
                "reward": float(rewards_N[i]),
            }
            for i in range(count)
        ]

    # -- evaluation ---------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the eval split (score ≥ 1 under `reward.eval_name`)."""
        cfg = self.config
        report = evaluation.evaluate(
            nnx.merge(self.graphdef, self.state.params),
            self.tokenizer,
            self.eval_examples,
            scorer=self.eval_scorer,
            prompt_fn=self.eval_prompt_texts.__getitem__,
            settings=cfg.sampling,
            n_samples=0,
            greedy=True,
            batch_size=cfg.train.eval_batch_size,
            progress=False,
            mesh=self.mesh,
            decode_weights=cfg.sampling.decode_weights,
        )
        return {
            "eval/accuracy": report["greedy_accuracy"],
            "eval/completion_len_mean": report["greedy_completion_len"],
            "eval/problems": float(report["num_problems"]),
        }

    # -- the loop -----------------------------------------------------------

    def save(self, step: int, initial_eval: dict) -> None:
        meta = {
            "config": _jsonable(dataclasses.asdict(self.config)),
            "initial_eval": initial_eval,
            "config_changes": self.config_changes,
            "imports": list(self.imports),
        }
        try:
            self.checkpointer.save(step, self.state, data=self.loader.get_state(), meta=meta)
        except OSError as e:  # ENOSPC and friends, from this save or the last async one
            raise self._save_error(step, e) from e
        self._saving = step

    def _wait_for_save(self) -> None:
        """Block until the last (async) save is on disk; its OSError explained."""
        try:
            self.checkpointer.wait()
        except OSError as e:
            raise self._save_error(self._saving, e) from e

    def _save_error(self, step, error: OSError) -> OSError:
        kept = self.checkpointer.latest_step()
        return OSError(
            error.errno,
            f"saving the step-{step} checkpoint in {self.checkpointer.directory} failed "
            f"({error.strerror or error}); the newest complete checkpoint (step {kept}) is "
            "intact and a restart resumes from it. Free disk space or move --workdir.",
        )

    def _restore(self) -> dict | None:
        step = self.checkpointer.latest_step()
        if step is None:
            return None
        try:
            state, data_state, meta = self.checkpointer.restore(self.state, step)
        except (ValueError, KeyError, TypeError) as e:
            mismatch = checkpoint_lib.describe_mismatch(self.checkpointer, self.state, step)
            raise ResumeError(
                f"the checkpoint in {self.checkpointer.directory} (step {step}) does not fit "
                f"this run's train state: {mismatch or e}. It was written for another model "
                "or optimizer: use a new --workdir, or point model.path and optim at what "
                "the checkpoint was trained with."
            ) from e
        self.state = jax.device_put(state, self.state_shardings)
        self.loader.set_state(data_state)
        logger.info("resumed from step %d in %s", int(state.step), self.workdir)
        return meta["initial_eval"]

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logger.warning("SIGTERM: finishing the current step, then saving and exiting.")
        self._stop = True

    def run(self, *, progress: bool = True) -> dict[str, Any]:
        """Train for `train.steps` steps (minus those already done); returns the summary."""
        from tqdm.auto import tqdm

        cfg = self.config
        clock = WallClock(self.workdir / WALL_FILE, enabled=jax.process_index() == 0)
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        writer = None
        try:
            initial_eval = self._restore()
            step = int(self.state.step)
            writer = metrics_lib.MetricWriter(
                self.workdir,
                enabled=jax.process_index() == 0,
                tensorboard=cfg.train.tensorboard,
                wandb_project=cfg.train.wandb_project or None,
                run_name=cfg.name,
                config=_jsonable(dataclasses.asdict(cfg)),
                resume_step=step if initial_eval is not None else -1,
            )
            skipped_in_a_row = 0
            if initial_eval is None:
                initial_eval = self.evaluate()
                writer.write_scalars(0, initial_eval)
            bar = tqdm(total=cfg.train.steps, initial=step, desc=cfg.name, disable=not progress)
            last_eval = initial_eval
            while step < cfg.train.steps and not self._stop:
                t0 = time.perf_counter()
                batch = next(self.loader)
                metrics, scored = self.step(batch)
                seconds = time.perf_counter() - t0
                step += 1
                metrics["step_seconds"] = seconds
                metrics["tokens_per_s"] = float(metrics["completion_tokens"]) / seconds
                skipped_in_a_row = skipped_in_a_row + 1 if metrics["update_skipped"] else 0
                limit = cfg.train.max_consecutive_skips
                if limit and skipped_in_a_row >= limit:
                    writer.write_scalars(step, metrics)
                    raise FloatingPointError(
                        f"{skipped_in_a_row} updates in a row (steps {step - skipped_in_a_row + 1}"
                        f"–{step}) had a non-finite loss or gradient and were skipped "
                        f"(train.max_consecutive_skips={limit}); stopping. The last checkpoint "
                        f"(step {self.checkpointer.latest_step()}) is kept: lower "
                        "optim.learning_rate or check the rewards and data before resuming."
                    )
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                if step % cfg.train.log_every == 0 or "eval/accuracy" in metrics:
                    writer.write_scalars(step, metrics)
                if cfg.train.samples_every and step % cfg.train.samples_every == 0:
                    writer.write_samples(step, self.sample_logs(batch, scored))
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save(step, initial_eval)
                clock.tick()
                bar.update(1)
                bar.set_postfix(
                    reward=f"{float(metrics['reward_mean']):.3f}",
                    acc=f"{last_eval['eval/accuracy']:.3f}",
                    sps=f"{1.0 / seconds:.2f}",
                )
            bar.close()
            if self._stop:
                if self.checkpointer.latest_step() != step:
                    self.save(step, initial_eval)
                self._wait_for_save()
                return {"interrupted": True, "steps": step}
            final_eval = self.evaluate() if step > 0 and last_eval is initial_eval else last_eval
            if final_eval is not last_eval or not cfg.train.eval_every:
                writer.write_scalars(step, final_eval)
            if self.checkpointer.latest_step() != step:
                self.save(step, initial_eval)
            if cfg.train.export_hf:
                self._export_hf()
            writer.flush()
            self._wait_for_save()
            return self._summary(initial_eval, final_eval, step, clock)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            clock.tick(force=True)
            if writer is not None:
                writer.close()
            self.checkpointer.wait()

    def _export_hf(self) -> None:
        params = sharding.to_host(self.state.params)  # collective: all processes
        if jax.process_index() == 0:
            models.save_hf_checkpoint(nnx.merge(self.graphdef, params), self.workdir / "hf")
            self.tokenizer.save_pretrained(self.workdir / "hf")

    def _summary(self, initial_eval, final_eval, steps, clock: WallClock) -> dict[str, Any]:
        cfg = self.config
        summary = {
            "name": cfg.name,
            "algorithm": cfg.rl.algorithm,
            "hparams": cfg.rl.hyperparameters,
            "imports": list(self.imports),
            "group_size": cfg.rl.group_size,
            "initial_eval_accuracy": initial_eval["eval/accuracy"],
            "final_eval_accuracy": final_eval["eval/accuracy"],
            "eval_problems": int(final_eval["eval/problems"]),
            "steps": int(steps),
            "wall_seconds": round(clock.total(), 2),  # every process that ran in the workdir
            "processes": clock.processes(),
            "config_changes_on_resume": self.config_changes,
            "skipped_updates": int(self.state.skipped_updates),
            "prompts": dataclasses.asdict(self.prompt_stats),
        }
        if jax.process_index() != 0:
            return summary
        return metrics_lib.write_summary(self.workdir, summary, title=cfg.name)

    def close(self) -> None:
        """Stops the reward workers and waits for the last checkpoint."""
        for scorer in (self.scorer, self.eval_scorer):
            if scorer is not None:
                scorer.close()
        self.checkpointer.close()


class WallClock:
    """This process's wall seconds, kept beside those of earlier processes in a JSON file.

    A run killed and resumed N times is N + 1 processes, each recorded from its start;
    `total()` sums them all (up to each one's last `tick`, at most `every_s` before it
    died). Only the enabled (first) process writes.
    """

    def __init__(self, path: Path, *, enabled: bool = True, every_s: float = 5.0):
        self.path, self.enabled, self.every_s = path, enabled, every_s
        self.start = time.time()
        self._written = 0.0
        previous = json.loads(path.read_text()) if path.exists() else []
        self._earlier = [float(s) for s in previous]
        self.tick(force=True)  # this process counts, even if it dies before its next tick

    def elapsed(self) -> float:
        return time.time() - self.start

    def tick(self, force: bool = False) -> None:
        """Record the elapsed time (at most every `every_s` seconds unless `force`)."""
        now = self.elapsed()
        if not self.enabled or (not force and now - self._written < self.every_s):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps([*self._earlier, round(now, 3)]))
        os.replace(tmp, self.path)
        self._written = now

    def total(self) -> float:
        return sum(self._earlier) + self.elapsed()

    def processes(self) -> int:
        return len(self._earlier) + 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def load_trained_model(
    workdir: str | os.PathLike, step: int | None = None, *, mesh=None
) -> tuple[models.Transformer, ExperimentConfig]:
    """The policy of a training workdir's newest (or given) checkpoint, and the run's config.

    The plugin modules the run was trained with (`--import`, recorded with the checkpoint)
    are imported first, so that its algorithm and rewards are registered. Shape-first: the
    model and train state are built abstractly from the run's config and the checkpoint's
    `config.json` (no weights are read from the source checkpoint), and the checkpoint is
    restored straight onto `mesh`'s shardings (default: the first device).

    Raises:
      plugins.PluginError: a recorded plugin module cannot be imported (named).
    """
    directory = Path(workdir) / "checkpoints"
    with checkpoint_lib.Checkpointer(directory) as meta_reader:
        meta = meta_reader.read_meta(step)
    plugins.import_modules(
        meta.get("imports", []), context=f"the run in {workdir} was trained with it"
    )
    config = configs.experiment_config(meta["config"])
    checkpointer = checkpoint_lib.Checkpointer(
        directory, save_reference=config.rl.reference != "frozen"
    )
    try:
        abstract_model = models.abstract_hf_model(config.model.path, **config.model.model_kwargs())
        graphdef, params = nnx.split(abstract_model)
        mesh = mesh if mesh is not None else sharding.make_mesh(data=1, fsdp=1, tensor=1)
        target = train_step_lib.abstract_train_state(
            params,
            make_optimizer(config.optim),
            config.rl,
            reference_dtype=config.model.reference_storage(config.rl.reference),
        )
        shardings = sharding.tree_shardings(target, params, mesh)
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings
        )
        state, _, _ = checkpointer.restore(target, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state.params), config


def train(
    config: ExperimentConfig,
    workdir: str | os.PathLike,
    *,
    imports: tuple[str, ...] = (),
    **kwargs,
) -> dict[str, Any]:
    """Build a `Trainer` (with the plugin modules `imports` recorded), run it, close it;
    returns the summary dict."""
    trainer = Trainer(config, workdir, imports=imports)
    try:
        return trainer.run(**kwargs)
    finally:
        trainer.close()

"""The host loop: prompts → sample → score → train step → log → evaluate → checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import os
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
    lock,
    models,
    plugins,
    process,
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
from aapo_jax.process import WallClock
from aapo_jax.types import PromptBatch, Rollout

logger = logging.getLogger(__name__)

SUMMARY_FILE = metrics_lib.SUMMARY_FILE
# Wall seconds of every process that ran in a workdir, so a resumed run's total counts all.
WALL_FILE = "wall_seconds.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ResumeError(ValueError):
    """A workdir's checkpoint cannot continue under this run's config or train state."""


class RewardFailureError(RuntimeError):
    """Most of the samples failed in reward scoring for `reward.max_failed_steps` steps."""


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
    automatically from the newest checkpoint in `workdir/checkpoints` that restores and
    verifies (an unusable one is named, set aside, and the previous one used). SIGTERM or
    SIGINT finishes the current step, saves and returns; a second one stops at once
    (`process.Interrupted`), keeping the last checkpoint.

    The process holds the workdir's lock (`lock.WorkdirLock`) from construction to
    `close()`: a second run in the same workdir is refused (`lock.WorkdirBusyError`).

    With no eval split (`data.eval_size=0` and no eval file: the paper configs) nothing is
    evaluated, `train.eval_every` is ignored (logged), and the summary's eval accuracies
    are None.

    `imports`: the plugin modules (`--import`) the run's algorithm or rewards come from;
    they are recorded with every checkpoint so that `load_trained_model` can re-import
    them. `started`: when this process's work began (seconds since the epoch; default
    now), for `summary.json`'s `wall_seconds`.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        workdir: str | os.PathLike,
        *,
        imports: tuple[str, ...] = (),
        started: float | None = None,
    ):
        self.config = cfg = config
        self.imports = tuple(imports)
        self.workdir = Path(workdir)
        check_before_loading(cfg)
        self.lock = lock.WorkdirLock(self.workdir, jax.process_index())
        self.scorer = self.eval_scorer = self.clock = self.checkpointer = None
        try:
            self.checkpointer = checkpoint_lib.Checkpointer(
                self.workdir / "checkpoints",
                max_to_keep=cfg.train.keep_checkpoints,
                save_reference=cfg.rl.reference != "frozen",
            )
            self.config_changes = self._check_resume()
            # From the process's start, imports included; it ticks in the background
            # until the loop takes over, so a process killed while loading counts too.
            self.clock = WallClock(
                self.workdir / WALL_FILE,
                enabled=jax.process_index() == 0,
                background=True,
                start=started,
            )
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: ExperimentConfig) -> None:
        self._saving = None
        self.mesh = sharding.make_mesh(**dataclasses.asdict(cfg.mesh))
        self.tokenizer = data_lib.load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        model = models.load_hf_checkpoint(
            cfg.model.path,
            mesh=self.mesh,
            adapter_seed=cfg.train.seed,
            **cfg.model.model_kwargs(),
        )
        self.eos = sampling.eos_ids(model.config.eos_token_id, self.tokenizer.eos_token_id)
        self.pad = int(self.tokenizer.pad_token_id)
        self._load_data()
        # train.steps=-1 (one epoch) becomes a step count once the prompts are known.
        self.config = cfg = configs.resolve_epoch_steps(cfg, self.num_train_prompts)

        tx = make_optimizer(cfg.optim)
        self.graphdef, params, base = models.split_trained(model)
        del model  # its weights now belong to the train state
        self.state, self.state_shardings = train_step_lib.init_train_state(
            params,
            tx,
            cfg.rl,
            seed=cfg.train.seed,
            mesh=self.mesh,
            reference_dtype=cfg.model.reference_storage(cfg.rl.reference),
            base=base,
        )
        self._build_stages(tx)
        if self.eval_examples:  # no eval split: no eval scorer (nor its worker processes)
            self.eval_scorer = evaluation.make_scorer(
                cfg.reward.eval_name,
                timeout_s=cfg.reward.timeout_s,
                num_workers=cfg.reward.num_workers,
            )
        self._failed_in_a_row = 0

    def _check_resume(self) -> list[dict]:
        """The config changes of every resume so far (checkpoint meta + this one's).

        A change outside `configs.RESUMABLE_CHANGES` raises `ResumeError` listing the
        fields, unless `train.allow_config_change`; the allowed ones are logged.
        """
        newest = self.checkpointer.newest_meta()
        if newest is None:
            return []
        step, meta = newest
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
            kv_budget_gib=cfg.sampling.kv_budget_gib,
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
        if cfg.train.eval_size and len(eval_examples) > cfg.train.eval_size:
            logger.info(
                "evaluating on the first %d of %d eval problems (train.eval_size).",
                cfg.train.eval_size,
                len(eval_examples),
            )
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
        # No eval split (data.eval_size=0, no eval file): no evaluation at all.
        eval_prompts = []
        if eval_examples:
            eval_prompts, _ = pipeline.encode_examples(eval_examples, self.tokenizer, **prompt_kw)
        elif cfg.train.eval_every:
            logger.info(
                "train.eval_every=%d is ignored: there is no eval split (data.eval_size=0).",
                cfg.train.eval_every,
            )
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
        """Greedy accuracy on the eval split (score ≥ 1 under `reward.eval_name`); {} when
        there is no eval split."""
        cfg = self.config
        if not self.eval_examples:
            return {}
        report = evaluation.evaluate(
            nnx.merge(self.graphdef, *self.state.policy_weights()),
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
            kv_budget_gib=cfg.sampling.kv_budget_gib,  # the rollout's budget holds here too
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
        try:
            restored = self.checkpointer.restore_newest(self.state)
        except checkpoint_lib.StateMismatchError as e:
            raise ResumeError(
                f"the checkpoint in {self.checkpointer.directory} does not fit this run's "
                f"train state: {e}. It was written for another model or optimizer: use a new "
                "--workdir, or point model.path and optim at what the checkpoint was trained "
                "with."
            ) from e
        if restored is None:
            return None
        state, data_state, meta = restored
        self.state = jax.device_put(state, self.state_shardings)
        self.loader.set_state(data_state)
        logger.info("resumed from step %d in %s", int(state.step), self.workdir)
        return meta["initial_eval"]

    def _check_reward_failures(self, step: int, metrics: dict) -> bool:
        """Whether this step's scoring mostly failed; raises `RewardFailureError` when that
        has lasted `reward.max_failed_steps` steps."""
        cfg = self.config.reward
        if self.scorer is None or not cfg.max_failed_steps:
            return False
        n = self.config.train.prompts_per_step * self.config.rl.group_size
        failed, scored = 0.0, 0
        for prefix in ("reward/", "ref_reward/"):
            if f"{prefix}{rewards.ERRORS}" in metrics:
                failed += float(metrics[f"{prefix}{rewards.TIMEOUTS}"])
                failed += float(metrics[f"{prefix}{rewards.ERRORS}"])
                scored += n
        fraction = min(1.0, failed / max(scored, 1))
        self._failed_in_a_row = (
            self._failed_in_a_row + 1 if fraction > cfg.max_failed_fraction else 0
        )
        if self._failed_in_a_row and self._failed_in_a_row >= cfg.max_failed_steps:
            raise RewardFailureError(
                f"reward scoring failed (timed out or raised) on more than "
                f"{cfg.max_failed_fraction:.0%} of the samples for {self._failed_in_a_row} steps "
                f"in a row (steps {step - self._failed_in_a_row + 1}–{step}; this one: "
                f"{fraction:.0%}) with reward.names={list(cfg.names)}: first error: "
                f"{self.scorer.first_error or 'none (timeouts)'}. Stopping "
                f"(reward.max_failed_fraction={cfg.max_failed_fraction}, "
                f"reward.max_failed_steps={cfg.max_failed_steps}); the last checkpoint (step "
                f"{self.checkpointer.latest_step()}) is kept. Fix the reward, or raise "
                "reward.timeout_s, before resuming."
            )
        return self._failed_in_a_row > 0

    def run(self, *, progress: bool = True) -> dict[str, Any]:
        """Train for `train.steps` steps (minus those already done); returns the summary."""
        from tqdm.auto import tqdm

        cfg = self.config
        clock = self.clock
        writer = None
        bar = tqdm(total=cfg.train.steps, desc=cfg.name, disable=not progress)
        stop = process.StopSignals()
        try:  # the signals' handlers are put back before the clean-up below
            with stop:
                bar.set_postfix_str("restoring the newest checkpoint", refresh=True)
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
                bar.update(step)
                if initial_eval is None:  # a fresh run
                    # With no eval split it is {}: saved so, and restored unlike None.
                    initial_eval = {}
                    if self.eval_examples:
                        bar.set_postfix_str("evaluating the initial policy", refresh=True)
                        initial_eval = self.evaluate()
                        writer.write_scalars(0, initial_eval)
                last_eval = initial_eval
                if step < cfg.train.steps:
                    bar.set_postfix_str("compiling and running the first step", refresh=True)
                while step < cfg.train.steps and not stop.requested:
                    t0 = time.perf_counter()
                    batch = next(self.loader)
                    metrics, scored = self.step(batch)
                    stop.check()
                    seconds = time.perf_counter() - t0
                    step += 1
                    metrics["step_seconds"] = seconds
                    metrics["tokens_per_s"] = float(metrics["completion_tokens"]) / seconds
                    skipped_in_a_row = skipped_in_a_row + 1 if metrics["update_skipped"] else 0
                    limit = cfg.train.max_consecutive_skips
                    if limit and skipped_in_a_row >= limit:
                        writer.write_scalars(step, metrics)
                        first = step - skipped_in_a_row + 1
                        raise FloatingPointError(
                            f"{skipped_in_a_row} updates in a row (steps {first}–{step}) had a "
                            "non-finite loss or gradient and were skipped "
                            f"(train.max_consecutive_skips={limit}); stopping. The last "
                            f"checkpoint (step {self.checkpointer.latest_step()}) is kept: lower "
                            "optim.learning_rate or check the rewards and data before resuming."
                        )
                    try:
                        rewards_failed = self._check_reward_failures(step, metrics)
                    except RewardFailureError:
                        writer.write_scalars(step, metrics)
                        raise
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                        last_eval = self.evaluate()  # {} with no eval split
                        metrics.update(last_eval)
                    if step % cfg.train.log_every == 0 or "eval/accuracy" in metrics:
                        writer.write_scalars(step, metrics)
                    if cfg.train.samples_every and step % cfg.train.samples_every == 0:
                        writer.write_samples(step, self.sample_logs(batch, scored))
                    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                        if rewards_failed:  # not a state worth resuming from
                            logger.warning(
                                "step %d: most rewards failed; its checkpoint is not written.", step
                            )
                        else:
                            self.save(step, initial_eval)
                    clock.tick()
                    bar.update(1)
                    shown = {"reward": f"{float(metrics['reward_mean']):.3f}"}
                    if last_eval:
                        shown["acc"] = f"{last_eval['eval/accuracy']:.3f}"
                    bar.set_postfix(**shown, sps=f"{1.0 / seconds:.2f}")
                bar.close()
                if stop.requested:
                    stop.check()
                    if self.checkpointer.latest_step() != step:
                        self.save(step, initial_eval)
                    self._wait_for_save()
                    return {"interrupted": True, "steps": step}
                final_eval = (
                    self.evaluate() if step > 0 and last_eval is initial_eval else last_eval
                )
                if final_eval and (final_eval is not last_eval or not cfg.train.eval_every):
                    writer.write_scalars(step, final_eval)
                if self.checkpointer.latest_step() != step:
                    self.save(step, initial_eval)
                if cfg.train.export_hf:
                    self._export_hf()
                writer.flush()
                self._wait_for_save()
                return self._summary(initial_eval, final_eval, step, clock)
        finally:
            bar.close()
            clock.tick(force=True)
            if writer is not None:
                writer.close()
            self.checkpointer.wait()

    def _export_hf(self) -> None:
        weights = sharding.to_host(self.state.policy_weights())  # collective: all processes
        if jax.process_index() == 0:
            model = nnx.merge(self.graphdef, *weights)
            models.save_hf_checkpoint(model, self.workdir / "hf")  # adapters merged in
            self.tokenizer.save_pretrained(self.workdir / "hf")
            if model.config.lora_rank:
                models.save_peft_adapters(model, self.workdir / "adapter", self.config.model.path)

    def _summary(self, initial_eval, final_eval, steps, clock: WallClock) -> dict[str, Any]:
        cfg = self.config
        summary = {
            "name": cfg.name,
            "algorithm": cfg.rl.algorithm,
            "hparams": cfg.rl.hyperparameters,
            "imports": list(self.imports),
            "group_size": cfg.rl.group_size,
            # None with no eval split (nothing was evaluated), not a misleading 0.
            "initial_eval_accuracy": initial_eval.get("eval/accuracy"),
            "final_eval_accuracy": final_eval.get("eval/accuracy"),
            "eval_problems": int(final_eval.get("eval/problems", 0)),
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
        """Stops the reward workers, waits for the last checkpoint, releases the workdir."""
        try:
            for scorer in (self.scorer, self.eval_scorer):
                if scorer is not None:
                    scorer.close()
            if self.clock is not None:
                self.clock.stop()
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            self.lock.release()


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
    `config.json` (no weights are read from the source checkpoint, except a LoRA run's
    frozen base, which its checkpoints do not hold), and the checkpoint is
    restored straight onto `mesh`'s shardings (default: the first device). Without
    `step`, a newest checkpoint that does not restore or verify is named in a warning and
    the previous one is used (the workdir is not changed).

    Raises:
      plugins.PluginError: a recorded plugin module cannot be imported (named).
    """
    directory = Path(workdir) / "checkpoints"
    with checkpoint_lib.Checkpointer(directory) as meta_reader:
        if step is not None:
            meta = meta_reader.read_meta(step)
        elif (newest := meta_reader.newest_meta()) is not None:
            meta = newest[1]
        else:
            raise FileNotFoundError(f"no checkpoint in {directory}.")
    plugins.import_modules(
        meta.get("imports", []), context=f"the run in {workdir} was trained with it"
    )
    config = configs.experiment_config(meta["config"])
    checkpointer = checkpoint_lib.Checkpointer(
        directory, save_reference=config.rl.reference != "frozen"
    )
    try:
        mesh = mesh if mesh is not None else sharding.make_mesh(data=1, fsdp=1, tensor=1)
        base = None
        if config.model.lora_rank:
            # The checkpoint holds the adapters; the frozen base is the run's source model.
            model = models.load_hf_checkpoint(
                config.model.path, mesh=mesh, **config.model.model_kwargs()
            )
        else:
            model = models.abstract_hf_model(config.model.path, **config.model.model_kwargs())
        graphdef, params, base = models.split_trained(model)
        del model
        target = train_step_lib.abstract_train_state(
            params,
            make_optimizer(config.optim),
            config.rl,
            reference_dtype=config.model.reference_storage(config.rl.reference),
            base=base,
        )
        shardings = sharding.tree_shardings(target, params, mesh)
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings
        )
        target = target.replace(base=base)
        if step is None:
            state, _, _ = checkpointer.restore_newest(target, set_aside=False)
        else:
            state, _, _ = checkpointer.restore(target, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, *state.policy_weights()), config


def train(
    config: ExperimentConfig,
    workdir: str | os.PathLike,
    *,
    imports: tuple[str, ...] = (),
    started: float | None = None,
    **kwargs,
) -> dict[str, Any]:
    """Build a `Trainer` (with the plugin modules `imports` recorded and `started` its
    clock's start), run it, close it; returns the summary dict."""
    trainer = Trainer(config, workdir, imports=imports, started=started)
    try:
        return trainer.run(**kwargs)
    finally:
        trainer.close()

"""The host training loop: data → rollout → reward → update → log → eval → checkpoint."""

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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aapo_jax import checkpoint as checkpoint_lib
from aapo_jax import configs, models, rewards, rl, sharding
from aapo_jax import data as data_lib
from aapo_jax import metrics as metrics_lib
from aapo_jax.configs import ExperimentConfig
from aapo_jax.data import pipeline, sources

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PLOT_KEYS = ("reward_mean", "eval/accuracy", "zero_std_group_frac", "completion_len_mean")


def _eos_ids(tokenizer, model_config) -> tuple[int, ...]:
    ids = set(rl.sampling.eos_ids(model_config.eos_token_id))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def host_reward_fn(names, weights):
    """A `WeightedSum` of host rewards (one component per name)."""
    return rewards.weighted_sum(
        {
            name: (rewards.get_host_reward(name), float(w))
            for name, w in zip(names, weights, strict=True)
        }
    )


def decode_completions(tokenizer, out) -> list[str]:
    """Completion texts: tokens within the mask, special tokens (EOS) dropped."""
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    return tokenizer.batch_decode(
        [row[m].tolist() for row, m in zip(tokens, mask, strict=True)], skip_special_tokens=True
    )


class Trainer:
    """Builds everything for one `ExperimentConfig` and runs the RL loop in `workdir`.

    Resumes automatically from the newest checkpoint in `workdir/checkpoints`;
    SIGTERM finishes the current step, saves and returns.
    """

    def __init__(self, config: ExperimentConfig, workdir: str | os.PathLike):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = config
        self.mesh = sharding.make_mesh(**dataclasses.asdict(cfg.mesh))
        self.tokenizer = data_lib.load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        self.model = models.load_hf_checkpoint(
            cfg.model.path,
            dtype=jnp.dtype(cfg.model.dtype),
            param_dtype=jnp.dtype(cfg.model.param_dtype or cfg.model.dtype),
            mesh=self.mesh,
            remat=cfg.model.remat,
        )
        self.eos = _eos_ids(self.tokenizer, self.model.config)
        self.pad = int(self.tokenizer.pad_token_id)

        train_examples, eval_examples = sources.load_splits(cfg.data)
        if cfg.train.eval_size:
            eval_examples = eval_examples[: cfg.train.eval_size]
        prompt_kw = dict(
            template=cfg.prompt.template,
            system_prompt=cfg.prompt.system_prompt or None,
            use_chat_template=cfg.prompt.use_chat_template,
            max_prompt_length=cfg.sampling.max_prompt_length,
        )
        encoded, self.prompt_stats = pipeline.encode_examples(
            train_examples, self.tokenizer, **prompt_kw
        )
        self.eval_prompts, self.eval_prompt_stats = pipeline.encode_examples(
            eval_examples, self.tokenizer, **prompt_kw
        )
        self.loader = pipeline.PromptLoader(
            encoded, batch_size=cfg.train.prompts_per_step, seed=cfg.train.seed, pad_id=self.pad
        )

        self.tx = rl.make_optimizer(cfg.optim)
        self.graphdef, state = rl.init_train_state(
            self.model, self.tx, cfg.rl, jax.random.key(cfg.train.seed)
        )
        self.state_shardings = sharding.tree_shardings(state, state.params, self.mesh)
        self.state = sharding.put(state, self.state_shardings)
        self._build_steps()
        self.checkpointer = checkpoint_lib.Checkpointer(
            self.workdir / "checkpoints",
            max_to_keep=cfg.train.keep_checkpoints,
            save_reference=cfg.rl.reference != "frozen",
        )
        self._stop = False

    # -- programs -----------------------------------------------------------

    def _build_steps(self):
        cfg = self.config
        if cfg.reward.kind == "token":
            reward_fn = rewards.get_token_reward(cfg.reward.names[0])
            step = rl.make_rl_step(
                cfg.rl,
                cfg.optim,
                cfg.sampling,
                self.graphdef,
                self.tx,
                reward_fn,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                mesh=self.mesh,
            )
            # Inputs arrive sharded (`sharding.shard_batch`); the state keeps its shardings.
            self._rl_step = jax.jit(
                step, out_shardings=(self.state_shardings, None), donate_argnums=0
            )
            self.scorer = None
        else:
            rollout = rl.make_rollout_fn(
                cfg.rl,
                cfg.sampling,
                self.graphdef,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                mesh=self.mesh,
            )
            self._rollout = jax.jit(rollout)
            update = rl.make_update_fn(cfg.rl, cfg.optim, self.graphdef, self.tx, mesh=self.mesh)
            self._update = jax.jit(
                update, out_shardings=(self.state_shardings, None), donate_argnums=0
            )
            self.scorer = rewards.RewardScorer(
                host_reward_fn(cfg.reward.names, cfg.reward.weights),
                timeout_s=cfg.reward.timeout_s,
                num_workers=cfg.reward.num_workers,
            )
        self.eval_scorer = rewards.RewardScorer(
            rewards.get_host_reward(cfg.reward.eval_name),
            timeout_s=cfg.reward.timeout_s,
            num_workers=cfg.reward.num_workers,
        )

    # -- one step -----------------------------------------------------------

    def _score(self, out, batch: pipeline.HostPromptBatch):
        g = self.config.rl.group_size
        texts = decode_completions(self.tokenizer, out)
        result = self.scorer.score(
            texts,
            [a for a in batch.answers for _ in range(g)],
            entries=[e for e in batch.entries for _ in range(g)],
            completion_lengths=np.asarray(out.lengths).tolist(),
        )
        return texts, result

    @staticmethod
    def _local_rows(outs, rows: int):
        """Host copies of this process's `rows` rows (process i holds rows [i·rows, (i+1)·rows)).

        Only what scoring reads (tokens, mask, lengths) leaves the device: the log-probs stay.
        """
        start = jax.process_index() * rows
        needed = [None if out is None else out.replace(logprobs=None) for out in outs]
        return jax.tree.map(lambda x: x[start : start + rows], sharding.to_host(needed))

    def _token_targets(self, batch: pipeline.HostPromptBatch):
        encoded = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a in batch.answers]
        width = max(len(t) for t in encoded)
        targets = np.full((len(encoded), width), -1, np.int32)
        for row, toks in enumerate(encoded):
            targets[row, : len(toks)] = toks
        return targets, np.asarray([len(t) for t in encoded], np.int32)

    def step(self, batch: pipeline.HostPromptBatch) -> tuple[dict, list[dict]]:
        """One RL iteration on a prompt batch; returns (metrics, sample completions)."""
        cfg = self.config
        ids, mask = sharding.shard_batch((batch.ids, batch.mask), self.mesh)
        samples: list[dict] = []
        if self.scorer is None:
            targets, target_len = self._token_targets(batch)
            targets, target_len = sharding.shard_batch((targets, target_len), self.mesh)
            prompts = rl.PromptBatch(ids=ids, mask=mask, targets=targets, target_len=target_len)
            self.state, metrics = self._rl_step(self.state, prompts)
            return jax.device_get(metrics), samples
        out, ref_out = self._rollout(self.state, ids, mask)
        # Host rewards score this process's own rows: its prompts' G completions each.
        b, g = batch.ids.shape[0], cfg.rl.group_size
        out_local, ref_local = self._local_rows((out, ref_out), b * g)
        texts, result = self._score(out_local, batch)
        extra = {f"reward/{k}": v for k, v in result.stats.items() if not k.startswith("mean/")}
        ref_rewards = None
        if ref_out is not None:
            _, ref_result = self._score(ref_local, batch)
            ref_rewards = sharding.shard_batch(ref_result.rewards.reshape(b, g), self.mesh)
            extra.update(
                {
                    f"ref_reward/{k}": ref_result.stats[k]
                    for k in (rewards.TIMEOUTS, rewards.ERRORS)
                    if k in ref_result.stats
                }
            )
        for name, values in result.components.items():
            extra[f"reward/{name}"] = float(np.mean(values))
        rewards_BxG = sharding.shard_batch(result.rewards.reshape(b, g), self.mesh)
        self.state, metrics = self._update(self.state, ids, mask, out, rewards_BxG, ref_rewards)
        metrics = {**jax.device_get(metrics), **extra}
        n_log = cfg.train.num_samples_logged
        for i in range(min(n_log, len(texts))):
            samples.append(
                {
                    "prompt": batch.questions[i // g],
                    "answer": batch.answers[i // g],
                    "completion": texts[i],
                    "reward": float(result.rewards[i]),
                }
            )
        return metrics, samples

    # -- evaluation ---------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the eval split (score ≥ 1 under `reward.eval_name`)."""
        cfg = self.config
        model = nnx.merge(self.graphdef, self.state.params)
        correct, lengths = [], []
        size = cfg.train.eval_batch_size
        for start in range(0, len(self.eval_prompts), size):
            chunk = self.eval_prompts[start : start + size]
            ids, mask = data_lib.left_pad([p.ids for p in chunk], self.pad)
            out = rl.sampling.generate(
                model,
                ids,
                mask,
                rng=jax.random.key(0),
                max_new_tokens=cfg.sampling.max_new_tokens,
                temperature=0.0,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
            )
            # Every process scores the whole eval split; the log-probs are not needed.
            out = sharding.to_host(out.replace(logprobs=None))
            texts = decode_completions(self.tokenizer, out)
            result = self.eval_scorer.score(
                texts,
                [p.example.answer for p in chunk],
                entries=[dict(p.example.entry) for p in chunk],
            )
            correct.extend((result.rewards >= 1.0 - 1e-6).tolist())
            lengths.extend(np.asarray(out.lengths).tolist())
        return {
            "eval/accuracy": float(np.mean(correct)),
            "eval/completion_len_mean": float(np.mean(lengths)),
            "eval/problems": float(len(correct)),
        }

    # -- the loop -----------------------------------------------------------

    def _meta(self, initial_eval: dict) -> dict:
        return {
            "config": _jsonable(dataclasses.asdict(self.config)),
            "initial_eval": initial_eval,
        }

    def save(self, step: int, initial_eval: dict) -> None:
        self.checkpointer.save(
            step, self.state, data=self.loader.get_state(), meta=self._meta(initial_eval)
        )

    def _restore(self) -> dict | None:
        if self.checkpointer.latest_step() is None:
            return None
        state, data_state, meta = self.checkpointer.restore(self.state)
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
        start_time = time.time()
        writer = metrics_lib.MetricWriter(
            self.workdir,
            enabled=jax.process_index() == 0,
            tensorboard=cfg.train.tensorboard,
            wandb_project=cfg.train.wandb_project or None,
            run_name=cfg.name,
            config=_jsonable(dataclasses.asdict(cfg)),
        )
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            initial_eval = self._restore()
            step = int(self.state.step)
            if initial_eval is None:
                initial_eval = self.evaluate()
                writer.write_scalars(0, initial_eval)
            bar = tqdm(total=cfg.train.steps, initial=step, desc=cfg.name, disable=not progress)
            last_eval = initial_eval
            while step < cfg.train.steps and not self._stop:
                t0 = time.perf_counter()
                metrics, samples = self.step(next(self.loader))
                seconds = time.perf_counter() - t0
                step += 1
                metrics["step_seconds"] = seconds
                metrics["tokens_per_s"] = float(metrics["completion_tokens"]) / seconds
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                if step % cfg.train.log_every == 0 or "eval/accuracy" in metrics:
                    writer.write_scalars(step, metrics)
                if cfg.train.samples_every and step % cfg.train.samples_every == 0:
                    writer.write_samples(step, samples)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save(step, initial_eval)
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
                self.checkpointer.wait()
                return {"interrupted": True, "steps": step}
            final_eval = self.evaluate() if step > 0 and last_eval is initial_eval else last_eval
            if final_eval is not last_eval or not cfg.train.eval_every:
                writer.write_scalars(step, final_eval)
            if self.checkpointer.latest_step() != step:
                self.save(step, initial_eval)
            if cfg.train.export_hf:
                params = sharding.to_host(self.state.params)  # collective: all processes
                if jax.process_index() == 0:
                    models.save_hf_checkpoint(nnx.merge(self.graphdef, params), self.workdir / "hf")
                    self.tokenizer.save_pretrained(self.workdir / "hf")
            writer.flush()
            summary = self._summary(initial_eval, final_eval, step, time.time() - start_time)
            return summary
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            writer.close()
            self.checkpointer.wait()

    def _summary(self, initial_eval, final_eval, steps, wall_seconds) -> dict[str, Any]:
        cfg = self.config
        summary = {
            "name": cfg.name,
            "algorithm": cfg.rl.advantage,
            "loss": cfg.rl.loss,
            "group_size": cfg.rl.group_size,
            "initial_eval_accuracy": initial_eval["eval/accuracy"],
            "final_eval_accuracy": final_eval["eval/accuracy"],
            "eval_problems": int(final_eval["eval/problems"]),
            "steps": int(steps),
            "wall_seconds": round(wall_seconds, 2),
            "skipped_updates": int(self.state.skipped_updates),
            "prompts": dataclasses.asdict(self.prompt_stats),
        }
        if jax.process_index() == 0:
            rows = metrics_lib.read_metrics(self.workdir)
            rewards_seen = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
            if rewards_seen:
                summary["reward_mean_first"] = rewards_seen[0]
                summary["reward_mean_last"] = rewards_seen[-1]
            plots = []
            for key in ("reward_mean", "eval/accuracy"):
                if any(r.get(key) is not None for r in rows):
                    name = key.replace("/", "_") + ".png"
                    metrics_lib.plot_metrics(rows, [key], self.workdir / name, title=cfg.name)
                    plots.append(name)
            metrics_lib.plot_metrics(rows, PLOT_KEYS, self.workdir / "training.png", title=cfg.name)
            summary["plots"] = [*plots, "training.png"]
            (self.workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    def close(self) -> None:
        for scorer in (self.scorer, self.eval_scorer):
            if scorer is not None:
                scorer.close()
        self.checkpointer.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def load_trained_model(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[models.Transformer, ExperimentConfig]:
    """The policy of a training workdir's newest (or given) checkpoint, and the run's config."""
    checkpointer = checkpoint_lib.Checkpointer(Path(workdir) / "checkpoints")
    try:
        config = configs.experiment_config(checkpointer.read_meta(step)["config"])
        model = models.load_hf_checkpoint(
            config.model.path,
            dtype=jnp.dtype(config.model.dtype),
            param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype),
        )
        tx = rl.make_optimizer(config.optim)
        graphdef, state = rl.init_train_state(model, tx, config.rl, jax.random.key(0))
        state, _, _ = checkpointer.restore(state, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state.params), config


def train(config: ExperimentConfig, workdir: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """Build a `Trainer`, run it, close it; returns the summary dict."""
    trainer = Trainer(config, workdir)
    try:
        return trainer.run(**kwargs)
    finally:
        trainer.close()

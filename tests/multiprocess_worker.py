"""One process of the two-process test (tests/test_multiprocess.py), and the shared workload.

    python -m tests.multiprocess_worker rl_steps PROCESS_ID PORT OUT_JSON

Each process runs `jax.distributed.initialize()` with CPU collectives (gloo),
builds the same tiny model and train state from seed 0, places the state on a
global (data=2, fsdp=2) mesh spanning both processes' devices, feeds ITS OWN
half of the prompt rows, and runs RL steps; process 0 writes the result. The
whole trainer on two processes runs through `experiments.train --distributed`
on `trainer_config`, against `train` in one process.
"""

from __future__ import annotations

import json
import sys

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 4, 6, 5


def rl_steps(steps: int = 2) -> dict:
    """`steps` one-program RL steps on a data=2 × fsdp=2 mesh over the first 4 global devices.

    Each process passes rows `[i·B/n, (i+1)·B/n)` of the prompt batch (process i of n).
    Returns the per-step metrics and Σ|θ| of the final parameters.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aapo_jax import configs, models, rl_step, sharding, train_step
    from aapo_jax.optim import make_optimizer
    from aapo_jax.rewards import tokens
    from aapo_jax.sampling import SamplerSettings
    from aapo_jax.types import PromptBatch
    from tests import hf_fixtures

    config = hf_fixtures.tiny_model_config(vocab_size=32)
    rl_cfg = configs.RLConfig(group_size=GROUP)
    optim = configs.OptimConfig(learning_rate=1e-2, total_steps=10, eps=1.0)
    tx = make_optimizer(optim)
    graphdef, params = nnx.split(models.Transformer(config, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1)
    state, shardings = train_step.init_train_state(params, tx, rl_cfg, seed=0, mesh=mesh)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)
    mask = np.ones_like(ids)
    targets = np.full((PROMPTS, 2), -1, np.int32)
    targets[:, 0] = 7
    target_len = np.ones((PROMPTS,), np.int32)
    per_process = PROMPTS // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    local = (ids[rows], mask[rows], targets[rows], target_len[rows])
    prompts = PromptBatch(*sharding.shard_batch(local, mesh))

    settings = SamplerSettings(max_new_tokens=NEW_TOKENS, temperature=1.0)
    step = rl_step.make_token_rl_step(
        rl_cfg, optim, settings, graphdef, tx, tokens.prefix_match, eos_token_id=5, pad_token_id=0
    )
    step = jax.jit(step, out_shardings=(shardings, None, None), donate_argnums=0)
    history = []
    for _ in range(steps):
        state, metrics, _ = step(state, prompts)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    abs_sum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))
    return dict(
        metrics=history,
        param_abs_sum=float(abs_sum(state.params)),
        devices=jax.device_count(),
        processes=jax.process_count(),
    )


def trainer_config(model_dir: str, **train):
    """tests/helpers.py's tiny run (two steps unless `train` says) on a data=2 × fsdp=2
    mesh, with HF export."""
    from tests.helpers import tiny_config

    c = tiny_config(model_dir, **train)
    c.name = "two-process"
    c.optim.eps = 1.0
    c.train.export_hf = True
    c.mesh = dict(data=2, fsdp=2, tensor=1)
    return c


def train(model_dir: str, workdir: str, **train) -> dict:
    """`trainer.train` on `trainer_config` (every process calls it with the same workdir)."""
    from aapo_jax import configs, trainer

    config = configs.experiment_config(trainer_config(model_dir, **train))
    return trainer.train(config, workdir)


def main(argv: list[str]) -> None:
    """argv: MODE PROCESS_ID PORT OUT_JSON; MODE is rl_steps."""
    mode, process_id, port, out = argv[0], int(argv[1]), int(argv[2]), argv[3]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    if mode != "rl_steps":
        raise SystemExit(f"unknown mode {mode!r}: expected rl_steps")
    result = rl_steps()
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])

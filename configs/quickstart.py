"""CPU quickstart: AAPO on reasoning-gym chain_sum from the tiny model shipped in the repo.

    python -m experiments.train --config=configs/quickstart.py --workdir=/tmp/quickstart

The model (aapo_jax/assets/quickstart, made by experiments/pretrain_tiny.py) is a
0.37M-parameter Qwen2-shaped decoder warmed up with supervised answers to ~35%
held-out accuracy; AAPO then trains it with reasoning-gym's own scorer as the
reward and reports greedy accuracy on 500 held-out problems before and after,
in `summary.json` and plots in the workdir. About 2 minutes on 2 idle CPU cores.

Arguments: `algo=NAME` (a name in `aapo_jax.algorithms.ALGORITHMS`: aapo, grpo,
dr_grpo, rloo, reinforce), `group=G` (samples per prompt), `seed=S`, `lora=R` (rank-R
adapters instead of full fine-tuning, lr 1e-3: 0.35 → 0.45 held-out, against 0.47 full),
`variant=full|tiny` (tiny: 2 steps on 8 eval problems, for CI).
"""

import json
from importlib import resources

from configs.base import apply_tiny, base_config, parse_arg, set_algorithm


def quickstart_dir() -> str:
    """The shipped quickstart checkpoint + tokenizer directory."""
    return str(resources.files("aapo_jax") / "assets" / "quickstart")


def get_config(arg: str | None = None):
    args = parse_arg(arg, algo="aapo", group="8", seed="0", variant="full", lora="0")
    task = json.loads((resources.files("aapo_jax") / "assets/quickstart/task.json").read_text())
    c = base_config()
    c.name = "quickstart-{algorithm}-G{group_size}-s{seed}"  # filled in when validated
    c.model.path = quickstart_dir()
    c.model.scan_unroll = -1  # 2 layers on CPU: unrolled is faster, and compiles as fast
    c.data.source = "reasoning_gym"
    c.data.name = task["name"]
    c.data.gym_kwargs = task["kwargs"]
    c.data.train_size = task["train_size"]
    c.data.eval_size = task["eval_size"]
    c.data.seed = task["split_seed"]
    c.prompt.template = task["prompt_template"]
    c.sampling.max_prompt_length = task["max_prompt_length"]
    c.sampling.max_new_tokens = task["max_new_tokens"]
    c.sampling.temperature = 1.0
    c.rl.group_size = int(args["group"])
    c.train.seed = int(args["seed"])
    c.train.steps = 300
    c.train.prompts_per_step = 64
    c.train.eval_every = 50
    c.train.eval_batch_size = 500
    c.train.checkpoint_every = 100
    c.train.samples_every = 25
    c.optim.learning_rate = 3e-5
    c.optim.schedule = "constant"
    c.reward.names = (f"gym:{task['name']}",)
    c.reward.num_workers = 0  # the chain_sum scorer is an integer compare: nothing can hang
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    set_algorithm(c, args["algo"])
    if int(args["lora"]):  # adapters only: a larger step (measured: 1e-3 at rank 16)
        c.model.lora_rank = int(args["lora"])
        c.optim.learning_rate = 1e-3
        c.name += "-lora{}".format(args["lora"])
    if args["variant"] == "tiny":
        apply_tiny(c)
        c.sampling.max_prompt_length = task["max_prompt_length"]
        c.sampling.max_new_tokens = task["max_new_tokens"]
        c.train.eval_size = 8
    elif args["variant"] != "full":
        raise ValueError(f"unknown variant {args['variant']!r}; valid: full, tiny")
    return c

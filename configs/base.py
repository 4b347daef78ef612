"""Shared defaults for every experiment config (not runnable on its own: it has no model)."""

import ml_collections

from aapo_jax import algorithms, configs


def base_config() -> ml_collections.ConfigDict:
    """Every field of `aapo_jax.configs.ExperimentConfig` with its default
    (`configs.default_config`, generated from the dataclasses).

    `optim.total_steps` follows `train.steps` (a shared reference), so overriding
    `--config.train.steps` also lengthens the learning-rate schedule.
    """
    return configs.default_config()


def parse_arg(arg: str | None, **defaults) -> dict[str, str]:
    """`'algo=grpo,variant=tiny'` -> {'algo': 'grpo', 'variant': 'tiny'} over the defaults."""
    values = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ValueError(f"config argument {part!r} must look like key=value")
        key, value = part.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
        values[key] = value
    return values


def set_algorithm(config: ml_collections.ConfigDict, algo: str, **hparams) -> None:
    """Switch to the named algorithm (`aapo_jax.algorithms.ALGORITHMS`) with its default
    hyper-parameters, updated with `hparams` (checked when the config is validated).

    Every hyper-parameter is written into `rl.hparams`, so each can be overridden from
    the command line (`--config.rl.hparams.margin_low=0.1`).
    """
    spec = algorithms.get_algorithm(algo, field="algo")
    config.rl.algorithm = algo
    config.rl.hparams = {**spec.defaults(), **hparams}


def apply_tiny(config: ml_collections.ConfigDict) -> None:
    """Shrink a real config to a CPU smoke run (a tiny model and data file still come from
    --config.model.path / --config.data.path): 2 steps, 2 prompts × 2 samples, 8 new tokens.
    """
    config.train.steps = 2
    config.train.prompts_per_step = 2
    config.train.eval_size = 4
    config.train.eval_batch_size = 4
    config.train.checkpoint_every = 0
    config.rl.group_size = 2
    config.sampling.max_prompt_length = 1024  # room for system prompts in small vocabularies
    config.sampling.max_new_tokens = 8
    config.data.train_size = 32
    config.data.eval_size = 4
    config.reward.num_workers = 0
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    config.name += "-tiny"


def apply_lora(config: ml_collections.ConfigDict, rank: int, base: str = "bf16") -> None:
    """`lora=R` (and `base=nf4`) of a paper config: rank-R adapters on every attention and
    MLP projection with alpha = R (scale 1), the base frozen in bf16 (or nf4: QLoRA),
    10× the full fine-tuning learning rate (LoRA's usual ratio at equal step count), and
    update micro-batches of at most 4 full-length rows per device (one chip holds a whole
    step's rows, so no tensor axis) with full rematerialisation; with nf4 (the 7B setting
    on one 16 GB chip) 2 rows and the rollout in passes of at most 4.5 GiB of KV caches
    (`sampling.kv_budget_gib`)."""
    if base not in ("bf16", "nf4"):
        raise ValueError(f"config argument base={base!r}; valid: bf16, nf4 (QLoRA)")
    if not rank:
        if base != "bf16":
            raise ValueError("config argument base=nf4 quantizes a LoRA base: add lora=RANK")
        return
    config.model.lora_rank = rank
    config.model.lora_alpha = float(rank)
    config.model.lora_base_qtype = "nf4" if base == "nf4" else ""
    config.optim.learning_rate *= 10
    # One chip holds every row of a step: micro-batches of at most 4 full-length rows (2
    # beside a 7B nf4 base), and with nf4 the rollout in passes of at most 4.5 GiB of KV.
    rows = config.sampling.max_prompt_length + config.sampling.max_new_tokens
    config.optim.micro_batch_tokens = (2 if base == "nf4" else 4) * rows
    config.mesh.tensor = 1
    # Beside the base on one chip the update keeps no projection outputs for the backward.
    config.model.remat = "full"
    if base == "nf4":
        config.sampling.kv_budget_gib = 4.5
        # One padded micro-batch at a time: compiling 8 length buckets of the 7B nf4
        # update took more than 24 GB of host memory.
        config.optim.length_buckets = 1
    config.name += f"-lora{rank}" + ("-nf4" if base == "nf4" else "")


def paper_config(
    arg: str | None,
    *,
    name: str,
    max_prompt: int,
    max_completion: int,
    temperature: float,
    customize,
    hparams: dict | None = None,
):
    """What the paper's runs share, then `customize(config)`, then the algorithm (with
    those of `hparams` it has) and the variant.

    Shared, as the authors' TRL 0.16 runs: G=6, 16 prompts/step, 100 steps, lr 1e-6 with
    transformers' warmup (from lr 0 over ceil(ratio · steps) steps), seed 42, top_k 50,
    training log-probs at the sampling temperature, over-long prompts cut on the left (the
    SimpleRL configs drop them instead, as the authors' data_utils does), every training
    row trained on and no evaluation during training (`--eval_strategy no`);
    plus fp32 masters with bf16 compute, and an update on about the real tokens: each
    prompt run once, the rows sorted by length into 8 length buckets, the projections'
    outputs kept for the backward (remat "dots"). `lora=R`, `base=nf4`: `apply_lora`.

    `--config.data.eval_path=FILE` adds a greedy eval before and after training (and every
    `train.eval_every` steps) on the file's first 64 rows (`train.eval_size`; 0: all).
    """
    args = parse_arg(arg, algo="aapo", variant="full", lora="0", base="bf16")
    if args["variant"] not in ("full", "tiny"):
        raise ValueError(f"unknown variant {args['variant']!r}; valid: full, tiny")
    c = base_config()
    c.name = f"{name}-{{algorithm}}"
    c.data.source = "jsonl"
    c.data.train_size = 100_000
    c.data.eval_size = 0  # no rows held out of the train file; an eval file gives all of its
    c.sampling.max_prompt_length = max_prompt
    c.sampling.max_new_tokens = max_completion
    c.sampling.temperature = temperature
    c.sampling.top_p = 1.0
    c.sampling.top_k = 50  # TRL's GRPO sampler (vLLM / generate) default
    c.rl.group_size = 6
    c.rl.logprob_temperature = temperature  # TRL >= 0.16 divides training logits by it
    # TRL 0.16 with one prompt's G rows per device: a token mean per prompt, then the mean.
    c.rl.loss_aggregation = "per_prompt_token_mean"
    c.prompt.overlong = "truncate_left"  # TRL: prompt_ids[:, -max_prompt_length:] (open-rs)
    c.train.prompts_per_step = 16
    c.train.steps = 100
    c.train.seed = 42
    c.train.eval_size = 64  # of an eval file's rows, if one is given
    c.train.eval_batch_size = 16
    c.train.checkpoint_every = 50
    c.optim.learning_rate = 1e-6
    c.optim.warmup_style = "transformers"
    # fp32 master weights and AdamW moments, bf16 forwards, a bf16 frozen reference.
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # The update computes on about the real tokens: sub-batches of rows of like length,
    # each cut to the shortest of T·i/8 that holds it, each prompt run once; the backward
    # recomputes only the attention's matmuls and elementwise work (docs/planning.md).
    c.optim.length_buckets = 8
    c.model.remat = "dots"
    customize(c)
    apply_lora(c, int(args["lora"]), args["base"])
    spec = algorithms.get_algorithm(args["algo"], field="algo")
    own = {k: v for k, v in (hparams or {}).items() if k in spec.hparams}
    set_algorithm(c, args["algo"], **own)
    if args["variant"] == "tiny":
        apply_tiny(c)
    return c


def _simplerl(c: ml_collections.ConfigDict) -> None:
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.03
    # SimpleRL-Zoo golds are bare answers (e.g. 1/2 in LaTeX): they are parsed wrapped in a box.
    c.reward.names = ("accuracy_boxed_gold",)
    c.reward.weights = (1.0,)
    # The authors' parquet as is: `instruction` holds a one-turn chat whose content is the
    # ready-made prompt string (chat markup included), used without a template or system
    # prompt; the gold is `target`.
    c.data.source = "parquet"
    # The authors' code renames the released parquet's `prompt` to `instruction`; a file
    # may carry either (a one-turn chat list whose content is the prompt string).
    c.data.question_key = "instruction|prompt"
    c.data.answer_key = "target"
    c.prompt.use_chat_template = False
    c.prompt.system_prompt = ""
    # The authors' SimpleRL data_utils keeps only prompts of ≤ max_prompt_length tokens.
    c.prompt.overlong = "drop"
    c.train.steps = -1  # one epoch over the training file (TRL max_steps=-1)
    c.train.checkpoint_every = 25  # their save_steps


def simplerl_config(arg: str | None, *, name: str, max_prompt: int, max_completion: int):
    """The SimpleRL-Zoo setting shared by the 7B and Llama configs (see their docstrings)."""
    return paper_config(
        arg,
        name=name,
        max_prompt=max_prompt,
        max_completion=max_completion,
        temperature=1.0,
        customize=_simplerl,
    )

"""DeepSeek-R1-Distill-Qwen-1.5B on the open-rs data (the paper's small-model setting).

    python -m experiments.train --config=configs/r1_distill_1p5b_openrs.py \
        --config.model.path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.data.path=/data/open-rs.jsonl \
        --workdir=/tmp/r1-1p5b-aapo

Arguments: `algo=aapo|grpo|dr_grpo|rloo`, `variant=full|tiny`. Authors'
settings: lr 1e-6 cosine to 10% with 10% warmup, 100 steps, G=6, prompt ≤ 512,
completion ≤ 3584, temperature 0.7, rewards format (weight 1) + cosine
length-scaled accuracy (weight 2) with the `<think>…</think><answer>…</answer>`
system prompt. The cosine reward is `cosine_open_rs`: wrong answers score 0
(short) to -0.5 (long) over a 3584-token scale, as in the authors' script.
"""

from configs.base import apply_tiny, base_config, parse_arg, set_algorithm

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer, and put your final answer within \\boxed{} . The "
    "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. Note that respond by English, NOT use other languages."
)


def get_config(arg: str | None = None):
    args = parse_arg(arg, algo="aapo", variant="full")
    c = base_config()
    c.name = f"r1-distill-1p5b-{args['algo']}"
    c.data.source = "jsonl"
    c.data.train_size = 100_000
    c.data.eval_size = 64
    c.prompt.use_chat_template = True
    c.prompt.system_prompt = SYSTEM_PROMPT
    c.sampling.max_prompt_length = 512
    c.sampling.max_new_tokens = 3584
    c.sampling.temperature = 0.7
    c.rl.group_size = 6
    c.train.prompts_per_step = 16
    c.train.steps = 100
    c.train.eval_batch_size = 16
    c.train.checkpoint_every = 10
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.optim.final_lr_fraction = 0.1
    c.reward.names = ("format", "cosine_open_rs")
    c.reward.weights = (1.0, 2.0)
    c.reward.eval_name = "accuracy"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    set_algorithm(c, args["algo"])
    if args["variant"] == "tiny":
        apply_tiny(c)
    elif args["variant"] != "full":
        raise ValueError(f"unknown variant {args['variant']!r}; valid: full, tiny")
    return c

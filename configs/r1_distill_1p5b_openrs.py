"""DeepSeek-R1-Distill-Qwen-1.5B on the open-rs data (the paper's small-model setting).

    python -m experiments.train --config=configs/r1_distill_1p5b_openrs.py \
        --config.model.path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.data.path=/data/open-rs.jsonl \
        --workdir=/tmp/r1-1p5b-aapo

Arguments: `algo=aapo|grpo|dr_grpo|rloo|reinforce`, `variant=full|tiny`. Authors'
settings: lr 1e-6 cosine to 10% with 10% warmup, 100 steps, G=6, prompt ≤ 512,
completion ≤ 3584, temperature 0.7, rewards format (weight 1) + cosine
length-scaled accuracy (weight 2) with the `<think>…</think><answer>…</answer>`
system prompt. The cosine reward is `cosine_open_rs`: wrong answers score 0
(short) to -0.5 (long) over a 3584-token scale, as in the authors' script.
"""

from configs.base import paper_config

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer, and put your final answer within \\boxed{} . The "
    "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. Note that respond by English, NOT use other languages."
)


def _open_rs(c) -> None:
    c.prompt.use_chat_template = True
    c.prompt.system_prompt = SYSTEM_PROMPT
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.optim.final_lr_fraction = 0.1
    c.reward.names = ("format", "cosine_open_rs")
    c.reward.weights = (1.0, 2.0)
    c.reward.eval_name = "accuracy"


def get_config(arg: str | None = None):
    return paper_config(
        arg,
        name="r1-distill-1p5b",
        max_prompt=512,
        max_completion=3584,
        temperature=0.7,
        customize=_open_rs,
    )

"""Qwen2.5-Math-7B on SimpleRL-Zoo level 3-5 (the paper's main setting).

    python -m experiments.train --config=configs/qwen25_math_7b_simplerl.py \
        --config.model.path=/ckpt/Qwen2.5-Math-7B --config.data.path=/data/simplerl_l3to5.jsonl \
        --workdir=/tmp/qwen7b-aapo

`get_config("algo=grpo")` swaps the algorithm (aapo | grpo | dr_grpo | rloo | reinforce);
`get_config("variant=tiny")` is a 2-step CPU smoke run of the same file.
Authors' settings: lr 1e-6 constant with 3% warmup, G=6, 16 prompts/step,
prompt ≤ 1024, completion ≤ 3072, temperature 1.0, top_p 1.0,
scale_rewards False, boxed-answer accuracy (math-verify, the bare gold
wrapped in \\boxed{}). The prompt is the
model's chat template with the Qwen-Math system prompt.
"""

from configs.base import simplerl_config

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def get_config(arg: str | None = None):
    c = simplerl_config(arg, name="qwen25-math-7b", max_prompt=1024, max_completion=3072)
    c.prompt.use_chat_template = True
    c.prompt.system_prompt = SYSTEM_PROMPT
    return c

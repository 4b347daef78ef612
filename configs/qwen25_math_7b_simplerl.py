"""Qwen2.5-Math-7B on SimpleRL-Zoo level 3-5 (the paper's main setting).

    python -m experiments.train --config=configs/qwen25_math_7b_simplerl.py \
        --config.model.path=/ckpt/Qwen2.5-Math-7B --config.data.path=/data/simplerl_l3to5.parquet \
        --workdir=/tmp/qwen7b-aapo

`get_config("algo=grpo")` swaps the algorithm (aapo | grpo | dr_grpo | rloo | reinforce);
`get_config("variant=tiny")` is a 2-step CPU smoke run of the same file.
Authors' settings (their code, TRL 0.16.1 defaults where their YAML is silent):
lr 1e-6 constant after 3% warmup from 0, G=6, 16 prompts/step, prompt ≤ 1024 (longer
ones dropped, as their data_utils does), completion ≤ 3072, temperature 1.0, top_p 1.0, top_k 50,
seed 42, checkpoints every 25 steps, scale_rewards False, boxed-answer accuracy
(math-verify, the bare gold wrapped in \\boxed{}). Data: the SimpleRL-Zoo parquet as
released, its `instruction` chat turn's content used as the prompt string as is (no
chat template, no system prompt: the string carries the Qwen-Math chat markup), gold
`target`.
"""

from configs.base import simplerl_config


def get_config(arg: str | None = None):
    return simplerl_config(arg, name="qwen25-math-7b", max_prompt=1024, max_completion=3072)

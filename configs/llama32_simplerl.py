"""Llama-3.2-1B/3B-Instruct on SimpleRL-Zoo abel level 3-5.

    python -m experiments.train --config=configs/llama32_simplerl.py:size=3b \
        --config.model.path=/ckpt/Llama-3.2-3B-Instruct \
        --config.data.path=/data/abel_l3to5.parquet \
        --workdir=/tmp/llama3b-aapo

Arguments (comma-separated): `size=1b|3b` (names the run), `algo=aapo|grpo|
dr_grpo|rloo|reinforce`, `variant=full|tiny`. Authors' settings: as the Qwen 7B run
(lr 1e-6 constant, 3% warmup from 0, G=6, 16 prompts/step, temperature 1.0, top_k 50,
seed 42, accuracy reward, the parquet's ready-made prompt strings as is) with prompt
≤ 1024 and completion ≤ 3072.
"""

from configs.base import parse_arg, simplerl_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, size="1b", algo="aapo", variant="full", lora="0", base="bf16")
    if args["size"] not in ("1b", "3b"):
        raise ValueError(f"size={args['size']!r}; valid: 1b, 3b")
    rest = ",".join(f"{k}={v}" for k, v in args.items() if k != "size")
    return simplerl_config(
        rest, name=f"llama32-{args['size']}", max_prompt=1024, max_completion=3072
    )

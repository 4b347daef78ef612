"""DeepSeek-R1-Distill-Qwen-1.5B on the open-rs data (the paper's small-model setting).

    python -m experiments.train --config=configs/r1_distill_1p5b_openrs.py \
        --config.model.path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.data.path=/data/open-rs.jsonl \
        --workdir=/tmp/r1-1p5b-aapo

Arguments: `algo=aapo|grpo|dr_grpo|rloo|reinforce`, `variant=full|tiny`. Authors'
settings (their code, TRL 0.16.1 defaults where their YAML is silent): lr 1e-6 cosine
to 10% with 10% warmup from 0, 100 steps, G=6, 4 prompts/step, prompt ≤ 512 (longer
ones cut on the left), completion ≤ 3584, temperature 0.7 (top_k 50; training
log-probs at the same temperature), seed 42, checkpoints every 50 steps, std-scaled
group rewards (`scale_rewards`), the `<think>…</think><answer>…</answer>` system
prompt (verbatim, `\\boxed{{}}` included), question `problem` and gold `solution`.
Rewards: `format_think_close` (weight 1: "\n</think>\n" exactly once) + `cosine_open_rs`
(weight 2: wrong answers 0 when short to -0.5 when long, correct 1 to 0.5, over 1000
characters, unclipped).
"""

from configs.base import paper_config

# open-rs/configs/AAPO.yaml's `system_prompt` as yaml.safe_load reads it: its "\\boxed{{}}" is
# one backslash and two brace pairs, and TRL passes the string to the chat template as the
# system message's content without formatting it, so the model sees `\boxed{{}}` (not `\boxed{}`).
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer, and put your final answer within \\boxed{{}} . The "
    "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. Note that respond by English, NOT use other languages."
)


def _open_rs(c) -> None:
    c.prompt.use_chat_template = True
    c.prompt.system_prompt = SYSTEM_PROMPT
    c.data.question_key = "problem"
    c.data.answer_key = "solution"  # the worked solution; the reward parses it as LaTeX
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.optim.final_lr_fraction = 0.1
    c.reward.names = ("format_think_close", "cosine_open_rs")
    c.reward.weights = (1.0, 2.0)
    c.reward.eval_name = "accuracy"
    c.train.prompts_per_step = 4  # 4 processes × 6 completions each ÷ G=6
    c.train.checkpoint_every = 50  # their save_steps
    # 24 rows a step: split 8 ways, each update sub-batch of 8 like-length rows would run at
    # the longest of 8. With the heads and MLP split 4 ways the rows split 2 ways, and the
    # update's useful FLOPs rise from 67% to 80% (docs/planning.md). It needs a device count
    # that 4 divides: elsewhere pass --config.mesh.tensor=1.
    c.mesh.tensor = 4


def get_config(arg: str | None = None):
    return paper_config(
        arg,
        name="r1-distill-1p5b",
        max_prompt=512,
        max_completion=3584,
        temperature=0.7,
        customize=_open_rs,
        hparams={"scale_rewards": True},  # TRL's default, not overridden by the authors
    )

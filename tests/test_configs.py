"""Every file in configs/ resolves for every algorithm and runs two steps in tiny mode."""

import dataclasses
import importlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aapo_jax import algorithms, configs, trainer
from tests import hf_fixtures

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RUNNABLE = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))
# The paper configs need a local checkpoint and data file; the quickstart ships its own.
NEEDS_PATHS = {"qwen25_math_7b_simplerl", "llama32_simplerl", "r1_distill_1p5b_openrs"}
SIMPLERL_PROMPT = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within "
    "\\boxed{{}}.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
)
# open-rs/configs/AAPO.yaml's `system_prompt` as yaml.safe_load gives it: the YAML's double-quoted
# "\\boxed{{}}" loads as one backslash and both brace pairs, which TRL passes on unformatted.
OPEN_RS_SYSTEM_PROMPT = (
    r"A conversation between User and Assistant. The user asks a question, and the Assistant "
    r"solves it. The assistant first thinks about the reasoning process in the mind and then "
    r"provides the user with the answer, and put your final answer within \boxed{{}} . The "
    r"reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    r"tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    r"</answer>. Note that respond by English, NOT use other languages."
)


def _module(name):
    return importlib.import_module(f"configs.{name}")


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = hf_fixtures.make_model_dir(root / "model")
    rows = [
        {"problem": f"What is {a} + {b}?", "answer": str(a + b), "solution": f"\\boxed{{{a + b}}}"}
        for a in range(8)
        for b in range(6)
    ]
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    # The SimpleRL-Zoo parquet layout: a one-turn chat holding the ready-made prompt, `target`.
    chat = [
        {
            "instruction": [{"role": "user", "content": SIMPLERL_PROMPT.format(q=r["problem"])}],
            "target": r["answer"],
        }
        for r in rows
    ]
    parquet = root / "train.parquet"
    pq.write_table(pa.Table.from_pylist(chat), parquet)
    return model, {"jsonl": data, "parquet": parquet}


def _with_paths(c, local_assets):
    c.model.path = str(local_assets[0])
    c.data.path = str(local_assets[1][c.data.source])
    return c


def test_every_config_is_covered():
    assert NEEDS_PATHS <= set(RUNNABLE) and "quickstart" in RUNNABLE


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("algo", sorted(algorithms.ALGORITHMS))
def test_config_resolves(name, algo, local_assets):
    c = _module(name).get_config(f"algo={algo}")
    if name in NEEDS_PATHS:
        with pytest.raises(ValueError, match=r"(model|data)\.path="):
            configs.experiment_config(c)
        _with_paths(c, local_assets)
    config = configs.experiment_config(c)
    assert config.rl.algorithm == algo
    expected = algorithms.ALGORITHMS[algo].defaults()
    if name == "r1_distill_1p5b_openrs" and "scale_rewards" in expected:
        expected["scale_rewards"] = True  # TRL's default, which the authors' open-rs run keeps
    assert config.rl.hyperparameters == expected
    assert config.optim.total_steps == config.train.steps


def test_unknown_argument_is_named():
    with pytest.raises(ValueError, match="unknown config argument 'algorithm'"):
        _module("quickstart").get_config("algorithm=grpo")
    with pytest.raises(ValueError, match=r"algo='ppo' is invalid: expected one of \['aapo'"):
        _module("quickstart").get_config("algo=ppo")


def test_every_hyperparameter_is_overridable_by_name():
    """`set_algorithm` writes every hyper-parameter into rl.hparams, so a flag can set each."""
    from absl import flags
    from ml_collections import config_flags

    argv = [
        "train",
        f"--config={CONFIG_DIR / 'quickstart.py'}:algo=grpo",
        "--config.rl.hparams.kl_beta=0.05",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    assert set(values.config.rl.hparams) == set(algorithms.ALGORITHMS["grpo"].hparams)
    config = configs.experiment_config(values.config)
    assert config.rl.hyperparameters["kl_beta"] == 0.05 and config.rl.needs_reference_logprobs


# The open-rs config's tiny run is the training step of test_paper_eval's end-to-end test, and
# the Llama config's tiny variant is the Qwen 7B one's but for its name (checked here).
@pytest.mark.parametrize(
    "name", [n for n in RUNNABLE if n not in ("r1_distill_1p5b_openrs", "llama32_simplerl")]
)
def test_tiny_variant_runs_two_steps(name, local_assets, tmp_path):
    """Each runnable config's tiny variant trains its 2 steps. The Qwen 7B one runs the
    authors' one epoch instead (`train.steps = -1`), which its prompts make 2 steps."""
    c = _module(name).get_config("variant=tiny")
    if name in NEEDS_PATHS:
        _with_paths(c, local_assets)
    config = configs.experiment_config(c)
    if name == "qwen25_math_7b_simplerl":
        llama = _with_paths(_module("llama32_simplerl").get_config("variant=tiny"), local_assets)
        llama = configs.experiment_config(llama)
        assert dataclasses.replace(llama, name=config.name) == config
        c.train.steps = -1  # the tiny variant's 2 steps back to the authors' one epoch
        c.train.prompts_per_step = 16  # 48 rows, 4 held out for eval: ⌊44 / 16⌋ = 2 steps
        config = configs.experiment_config(c)
    summary = trainer.train(config, tmp_path, progress=False)
    assert summary["steps"] == 2
    assert (tmp_path / "summary.json").exists()


# What each paper config must resolve to: the authors' code (JianxXiong/AAPO) and, where their
# YAML is silent, the TRL 0.16.1 defaults it inherits.
_SHARED = {
    "rl.group_size": 6,
    "rl.algorithm": "aapo",
    "rl.hparams.margin_low": 0.2,
    "rl.hparams.margin_high": 0.28,
    "train.seed": 42,
    "optim.learning_rate": 1e-6,
    "optim.warmup_style": "transformers",
    "sampling.top_k": 50,
    "sampling.top_p": 1.0,
    "rl.loss_aggregation": "per_prompt_token_mean",
    # Every training row is trained on, nothing evaluated (`--eval_strategy no`).
    "data.eval_size": 0,
    "data.eval_path": "",
}
_SIMPLERL = {
    **_SHARED,
    "train.steps": -1,  # one epoch (TRL max_steps=-1), resolved from the data
    "train.prompts_per_step": 16,  # 4 processes × 6 rows ÷ G=6 × 4 accumulation steps
    "train.checkpoint_every": 25,  # open-r1/configs/AAPO.yaml save_steps
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.03,
    "sampling.max_prompt_length": 1024,
    "sampling.max_new_tokens": 3072,
    "sampling.temperature": 1.0,
    "rl.logprob_temperature": 1.0,
    "rl.hparams.scale_rewards": False,
    "reward.names": ("accuracy_boxed_gold",),
    "data.source": "parquet",
    "data.question_key": "instruction|prompt",
    "data.answer_key": "target",
    "prompt.use_chat_template": False,
    "prompt.system_prompt": "",
    "prompt.overlong": "drop",  # their data_utils filters to ≤ max_prompt_length
}
AUTHORS = {
    "r1_distill_1p5b_openrs": {
        **_SHARED,
        "train.steps": 100,
        "train.prompts_per_step": 4,
        "train.checkpoint_every": 50,  # open-rs/configs/AAPO.yaml save_steps
        "optim.schedule": "cosine",
        "optim.warmup_ratio": 0.1,
        "optim.final_lr_fraction": 0.1,
        "sampling.max_prompt_length": 512,
        "sampling.max_new_tokens": 3584,
        "sampling.temperature": 0.7,
        "rl.logprob_temperature": 0.7,
        "rl.hparams.scale_rewards": True,
        "reward.names": ("format_think_close", "cosine_open_rs"),
        "reward.weights": (1.0, 2.0),
        "data.source": "jsonl",
        "data.question_key": "problem",
        "data.answer_key": "solution",
        "prompt.use_chat_template": True,
        "prompt.system_prompt": OPEN_RS_SYSTEM_PROMPT,
        "prompt.overlong": "truncate_left",  # TRL's prompt_ids[:, -max_prompt_length:]
    },
    "qwen25_math_7b_simplerl": _SIMPLERL,
    "llama32_simplerl": _SIMPLERL,
}


def _resolved(config, path: str):
    """A field of a validated ExperimentConfig by dotted path (`rl.hparams.X`: resolved)."""
    section, *rest = path.split(".")
    value = getattr(config, section)
    if rest[:1] == ["hparams"]:
        return value.hyperparameters[rest[1]]
    for part in rest:
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_paper_configs_resolve_to_the_authors_values(name, local_assets):
    config = configs.experiment_config(_with_paths(_module(name).get_config(), local_assets))
    for path, want in AUTHORS[name].items():
        got = _resolved(config, path)
        assert got == want, f"{name}: {path} = {got!r}; the authors use {want!r}"
    # transformers: ceil(warmup_ratio · max_steps) warmup steps, from lr 0.
    optim = configs.resolve_epoch_steps(config, 8500).optim
    assert optim.warmup_steps == math.ceil(optim.warmup_ratio * optim.total_steps)


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_paper_configs_train_on_every_row_and_evaluate_an_eval_file(name, local_assets, tmp_path):
    from aapo_jax.data import sources

    c = _with_paths(_module(name).get_config(), local_assets)
    path = local_assets[1][c.data.source]
    want = sources.read_records(
        path, question_key=c.data.question_key, answer_key=c.data.answer_key
    )
    train, evaluation = sources.load_splits(configs.experiment_config(c).data)
    assert train == want and evaluation == []  # every row, in stored order
    # An eval file brings eval back: all of its rows, of which the trainer evaluates 64.
    eval_file = tmp_path / f"eval{path.suffix}"
    eval_file.write_bytes(path.read_bytes())
    c.data.eval_path = str(eval_file)
    config = configs.experiment_config(c)
    train, evaluation = sources.load_splits(config.data)
    assert train == want and evaluation == want
    assert config.train.eval_size == 64
    # The tiny variant keeps its 4 held-out rows.
    tiny = configs.experiment_config(
        _with_paths(_module(name).get_config("variant=tiny"), local_assets)
    )
    assert (tiny.data.eval_size, tiny.data.eval_path, tiny.train.eval_size) == (4, "", 4)
    train, evaluation = sources.load_splits(tiny.data)
    assert len(evaluation) == 4 and not set(train) & set(evaluation)


def test_quickstart_keeps_its_eval():
    full = configs.experiment_config(_module("quickstart").get_config())
    assert (full.data.eval_size, full.train.eval_size, full.train.eval_every) == (500, 0, 50)
    tiny = configs.experiment_config(_module("quickstart").get_config("variant=tiny"))
    assert (tiny.data.eval_size, tiny.train.eval_size) == (4, 8)


def test_one_epoch_resolves_from_the_prompt_count(local_assets):
    c = _with_paths(_module("qwen25_math_7b_simplerl").get_config(), local_assets)
    config = configs.experiment_config(c)
    assert config.train.steps == config.optim.total_steps == -1
    with pytest.raises(ValueError, match="resolved from the data first"):
        _ = config.optim.warmup_steps
    resolved = configs.resolve_epoch_steps(config, 8523)
    assert resolved.train.steps == resolved.optim.total_steps == 8523 // 16
    assert resolved.optim.warmup_steps == math.ceil(0.03 * (8523 // 16))
    with pytest.raises(ValueError, match="10 training prompts make no batch"):
        configs.resolve_epoch_steps(config, 10)
    fixed = configs.experiment_config(_module("quickstart").get_config())
    assert configs.resolve_epoch_steps(fixed, 10) is fixed
    with pytest.raises(ValueError, match=r"(train\.steps|optim\.total_steps)=-2"):
        c.train.steps = -2
        configs.experiment_config(c)


@pytest.mark.parametrize("steps", [0, -2])
def test_bad_run_length_is_named_as_set(steps):
    """`--config.train.steps=0` also sets the linked `optim.total_steps`, validated first;
    the error names the flag the user set, and the values it takes."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={CONFIG_DIR / 'quickstart.py'}", f"--config.train.steps={steps}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    assert values.config.optim.total_steps == steps
    with pytest.raises(ValueError, match=rf"train\.steps={steps} is invalid: expected ≥ 1 \(or -1"):
        configs.experiment_config(values.config)


def test_simplerl_parquet_row_gives_the_authors_prompt_string(local_assets):
    from aapo_jax.data import pipeline, sources, tokenize

    c = _with_paths(_module("qwen25_math_7b_simplerl").get_config(), local_assets)
    c.data.eval_size = 8  # of the 48 test rows
    config = configs.experiment_config(c)
    train, evaluation = sources.load_splits(config.data)
    encoded, _ = pipeline.encode_examples(
        [*train, *evaluation],
        tokenize.load_tokenizer(local_assets[0]),
        template=config.prompt.template,
        system_prompt=config.prompt.system_prompt or None,
        use_chat_template=config.prompt.use_chat_template,
        max_prompt_length=config.sampling.max_prompt_length,
        overlong=config.prompt.overlong,
    )
    rows = pq.read_table(local_assets[1]["parquet"]).to_pylist()
    gold = {r["instruction"][0]["content"]: r["target"] for r in rows}
    assert len(encoded) == len(rows)
    for prompt in encoded:
        assert prompt.text in gold  # the instruction's content, byte for byte
        assert prompt.example.answer == gold[prompt.text]


def test_open_rs_prompt_shows_the_model_the_authors_system_prompt_verbatim(local_assets):
    """TRL puts the YAML's string, `\\boxed{{}}` and all, into the system message as is; nothing
    on our side formats it (which would make it `\\boxed{}`)."""
    from aapo_jax.data import pipeline, sources, tokenize

    c = _with_paths(_module("r1_distill_1p5b_openrs").get_config(), local_assets)
    config = configs.experiment_config(c)
    train, _ = sources.load_splits(config.data)
    tokenizer = tokenize.load_tokenizer(local_assets[0])
    encoded, _ = pipeline.encode_examples(
        train[:4],
        tokenizer,
        template=config.prompt.template,
        system_prompt=config.prompt.system_prompt or None,
        use_chat_template=config.prompt.use_chat_template,
        max_prompt_length=config.sampling.max_prompt_length,
        overlong=config.prompt.overlong,
    )
    assert len(encoded) == 4
    for prompt in encoded:
        messages = [
            {"role": "system", "content": OPEN_RS_SYSTEM_PROMPT},
            {"role": "user", "content": prompt.example.question},
        ]
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt.text == want
        assert "within \\boxed{{}} . The" in prompt.text


def test_simplerl_file_may_name_its_prompt_column_prompt_or_instruction(local_assets, tmp_path):
    from aapo_jax.data import sources

    table = pq.read_table(local_assets[1]["parquet"])
    names = table.column_names
    renamed = tmp_path / "released.parquet"  # the released file, before the authors' rename
    pq.write_table(
        table.rename_columns(["prompt" if n == "instruction" else n for n in names]), renamed
    )
    c = _with_paths(_module("qwen25_math_7b_simplerl").get_config(), local_assets)
    c.data.eval_size = 8
    want, _ = sources.load_splits(configs.experiment_config(c).data)
    c.data.path = str(renamed)
    got, _ = sources.load_splits(configs.experiment_config(c).data)
    assert [e.question for e in got] == [e.question for e in want]
    neither = tmp_path / "neither.parquet"
    pq.write_table(
        table.rename_columns(["text" if n == "instruction" else n for n in names]), neither
    )
    c.data.path = str(neither)
    with pytest.raises(ValueError, match=r"no column 'instruction\|prompt'.*columns present"):
        sources.load_splits(configs.experiment_config(c).data)

"""Evaluation metrics: pass@k against brute force, majority vote, and evaluate on a rigged model."""

import itertools
import math
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aapo_jax import evaluation, models, rewards, sharding
from aapo_jax.data.sources import Example
from aapo_jax.sampling import SamplerSettings
from tests import hf_fixtures

# ---------------------------------------------------------------------------
# pass@k and majority vote


def _brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(
                    _brute_pass_at_k(n, c, k), abs=1e-12
                ), (n, c, k)


def test_pass_at_k_closed_form_cases():
    assert evaluation.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert evaluation.pass_at_k(10, 0, 5) == 0.0
    assert evaluation.pass_at_k(10, 10, 1) == 1.0
    # Large n: no overflow, equals the binomial formula.
    expect = 1 - math.comb(200 - 37, 16) / math.comb(200, 16)
    assert evaluation.pass_at_k(200, 37, 16) == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        evaluation.pass_at_k(n, c, k)


def test_majority_vote():
    assert evaluation.majority_vote(["1", "2", "2", "3"]) == ("2", 1)
    # A tie goes to the answer seen first.
    assert evaluation.majority_vote(["7", "5", "5", "7"]) == ("7", 0)
    assert evaluation.majority_vote(["5", "7", "7", "5"]) == ("5", 0)
    # Missing answers do not vote.
    assert evaluation.majority_vote([None, None, "4"]) == ("4", 2)
    assert evaluation.majority_vote([None, None]) == (None, -1)
    assert evaluation.majority_vote([]) == (None, -1)


def test_paper_protocol_constants():
    prompt = evaluation.PAPER_QUERY_TEMPLATE.format(question="What is 1+1?")
    assert "$\\boxed{ANSWER}$" in prompt
    assert prompt.endswith("What is 1+1?")
    assert (evaluation.PAPER_SAMPLING.temperature, evaluation.PAPER_SAMPLING.top_p) == (0.6, 0.95)
    assert evaluation.math_extract_fn("so the answer is $\\boxed{42}$.") == "42"
    assert evaluation.math_extract_fn("no answer here") is None
    with evaluation.make_scorer("accuracy_boxed_gold", num_workers=0) as scorer:
        result = scorer.score(["$\\boxed{42}$", "$\\boxed{41}$", "42"], ["42", "42", "42"])
    np.testing.assert_array_equal(result.rewards, [1.0, 0.0, 0.0])


def test_make_scorer_names_host_rewards():
    with evaluation.make_scorer("gym:chain_sum", num_workers=0) as scorer:
        entry = {"question": "1 + 2 =", "answer": "3", "metadata": {}}
        result = scorer.score(["3", "<answer>4</answer>"], ["3", "3"], entries=[entry, entry])
    np.testing.assert_array_equal(result.rewards, [1.0, 0.0])
    with pytest.raises(ValueError, match="unknown host reward"):
        evaluation.make_scorer("no_such_reward", num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        evaluation.make_scorer("accuracy", timeout_s=0, num_workers=0)


# ---------------------------------------------------------------------------
# evaluate() on a model whose next-token distribution is set by hand

VOCAB = ["<pad>", "<eos>", "q", "a", "b", "c", "x", "y"]
ID = {t: i for i, t in enumerate(VOCAB)}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(ID, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def _markov_model(transitions: dict[str, dict[str, float]]):
    """A Transformer whose next-token logits depend only on the current token.

    Attention and MLP outputs are zeroed, so the final hidden state is RMSNorm(embed[t]); with
    one-hot embeddings that is √D·e_t and the logits row of t is √D·lm_head[t]. Unlisted
    successors get logit −30.
    """
    d = 16
    config = hf_fixtures.tiny_model_config(
        vocab_size=len(VOCAB),
        hidden_size=d,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    model = models.Transformer(config, rngs=nnx.Rngs(0))
    layers = model.layers  # all layers' weights, stacked
    layers.attn.o_kernel.value = jnp.zeros_like(layers.attn.o_kernel.value)
    layers.mlp.down_kernel.value = jnp.zeros_like(layers.mlp.down_kernel.value)
    model.embed.value = jnp.eye(len(VOCAB), d)
    head = np.full((d, len(VOCAB)), -30.0, np.float32)
    for src, successors in transitions.items():
        for dst, logit in successors.items():
            head[ID[src], ID[dst]] = logit
    model.lm_head.value = jnp.asarray(head / math.sqrt(d))
    return model


# After the prompt "q a" the model always answers x (correct), after "q b" always y (wrong),
# after "q c" x or y with equal odds, except that greedy decoding picks y.
TRANSITIONS = {
    "a": {"x": 0.0},
    "b": {"y": 0.0},
    "c": {"x": 0.0, "y": 1e-3},
    "x": {"<eos>": 0.0},
    "y": {"<eos>": 0.0},
}


# Host rewards (module-level, so that a worker process can import them).


def _exact_answer(completions, *, answers, **kwargs):
    """1.0 for a completion that is exactly the gold answer."""
    del kwargs
    pairs = zip(completions, answers, strict=True)
    return np.asarray([float(c == a) for c, a in pairs], np.float32)


HANG_S = 60.0


def _hangs_on_y(completions, *, answers, **kwargs):
    """1.0 for everything, but "y" takes `HANG_S` seconds: only a timeout can score it 0."""
    del answers, kwargs
    if "y" in completions:
        time.sleep(HANG_S)
    return np.ones(len(completions), np.float32)


def _raises_on_y(completions, *, answers, **kwargs):
    """1.0 for everything, but "y" raises."""
    del answers, kwargs
    if "y" in completions:
        raise RuntimeError("cannot score y")
    return np.ones(len(completions), np.float32)


def _evaluate(examples, scorer=None, model=None, **kwargs):
    """`evaluation.evaluate` on the rigged model; the default verifier is `_exact_answer`."""
    if scorer is None:
        with rewards.RewardScorer(_exact_answer, num_workers=0) as scorer:
            return _evaluate(examples, scorer, model, **kwargs)
    # The sampler settings given as keywords form the one `SamplerSettings` record.
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p")
    settings = dict(max_new_tokens=4, temperature=0.6, top_p=0.95)
    settings.update({k: kwargs.pop(k) for k in names if k in kwargs})
    defaults = dict(
        prompt_fn=evaluation.template_prompt_fn("q {question}"),
        settings=SamplerSettings(**settings),
        batch_size=4,
        progress=False,
        buckets=None,
    )
    model = _markov_model(TRANSITIONS) if model is None else model
    return evaluation.evaluate(
        model, _tokenizer(), examples, scorer=scorer, **{**defaults, **kwargs}
    )


def _examples(questions):
    return [Example(question=q, answer="x") for q in questions]


def test_evaluate_greedy_and_deterministic_samples():
    # 7 problems over batches of 4: the short last batch must not change the results.
    examples = _examples("aabbbab")
    report = _evaluate(examples, n_samples=4, k=2, temperature=1.0, top_p=1.0, details=True)
    assert report["num_problems"] == 7
    assert report["greedy_accuracy"] == pytest.approx(3 / 7)
    assert report["pass@1"] == pytest.approx(3 / 7)
    assert report["pass@2"] == pytest.approx(3 / 7)
    assert report["maj@2"] == pytest.approx(3 / 7)
    assert report["greedy_completion_len"] == 2.0  # the answer, then EOS
    assert report["greedy_truncated_frac"] == 0.0
    assert (report["scorer_timeouts"], report["scorer_errors"]) == (0, 0)
    problems = report["problems"]
    assert [p["greedy_completion"] for p in problems] == ["x", "x", "y", "y", "y", "x", "y"]
    assert problems[0]["completions"] == ["x", "x", "x", "x"]
    assert problems[0]["majority_answer"] == "x"
    assert problems[2]["scores"] == [0.0, 0.0, 0.0, 0.0]


def test_evaluate_sampled_metrics_follow_the_counts():
    examples = _examples("c" * 40)
    report = _evaluate(examples, n_samples=4, k=3, temperature=1.0, top_p=1.0, details=True)
    assert report["greedy_accuracy"] == 0.0  # greedy prefers y
    scores = np.asarray([p["scores"] for p in report["problems"]])
    counts = scores.sum(axis=1).astype(int)
    # Sampling really is ~50/50 (40 × 4 Bernoulli(0.5) draws: 4 standard deviations).
    assert 0.34 < counts.mean() / 4 < 0.66
    assert report["pass@1"] == pytest.approx(counts.mean() / 4)
    expect = np.mean([evaluation.pass_at_k(4, int(c), 3) for c in counts])
    assert report["pass@3"] == pytest.approx(expect)
    assert report["pass@1"] < report["pass@3"] < 1.0
    maj = []
    for p, row in zip(report["problems"], scores, strict=True):
        winner, first = evaluation.majority_vote(p["completions"][:3])
        assert p["majority_answer"] == winner
        maj.append(row[first])
    assert report["maj@3"] == pytest.approx(np.mean(maj))


def test_evaluate_counts_truncation_and_is_seeded():
    # With a budget of 1 token the EOS never fits: every completion is cut off.
    report = _evaluate(_examples("ab"), n_samples=0, max_new_tokens=1)
    assert report["greedy_truncated_frac"] == 1.0
    a = _evaluate(_examples("cccc"), n_samples=4, temperature=1.0, details=True)
    b = _evaluate(_examples("cccc"), n_samples=4, temperature=1.0, details=True)
    assert [p["completions"] for p in a["problems"]] == [p["completions"] for p in b["problems"]]


def test_evaluate_rejects_bad_settings():
    with pytest.raises(ValueError, match="k must be"):
        _evaluate(_examples("a"), n_samples=2, k=3, temperature=1.0)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        _evaluate(_examples("a"), n_samples=0, greedy=False)
    with pytest.raises(ValueError, match="temperature"):
        _evaluate(_examples("a"), n_samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="at least one"):
        _evaluate([])


def test_evaluate_scores_through_the_time_bounded_scorer():
    # "q a" → x scores 1; "q b" → y hangs far past the 1 s bound: the worker is killed and y
    # scores 0 (its reward would have been 1), counted as a timeout.
    with rewards.RewardScorer(_hangs_on_y, timeout_s=1, num_workers=1) as scorer:
        start = time.monotonic()
        report = _evaluate(_examples("ab"), scorer, n_samples=0, details=True)
        assert time.monotonic() - start < HANG_S
    assert [p["greedy_completion"] for p in report["problems"]] == ["x", "y"]
    assert [p["greedy_score"] for p in report["problems"]] == [1.0, 0.0]
    assert report["greedy_accuracy"] == 0.5
    assert (report["scorer_timeouts"], report["scorer_errors"]) == (1, 0)


def test_evaluate_counts_verifier_errors():
    with rewards.RewardScorer(_raises_on_y, num_workers=0) as scorer:
        report = _evaluate(_examples("abb"), scorer, n_samples=0, details=True)
    assert [p["greedy_score"] for p in report["problems"]] == [1.0, 0.0, 0.0]
    assert (report["scorer_timeouts"], report["scorer_errors"]) == (0, 2)


def test_evaluate_on_a_data_parallel_mesh_matches_one_device():
    # 8 problems in batches of 4: each batch's 4 rows are split over the 4 data devices.
    examples = _examples("aabcbabc")
    mesh = sharding.make_mesh(data=4, fsdp=1)
    assert sharding.row_parallel(mesh, 4)
    model = _markov_model(TRANSITIONS)
    one = _evaluate(examples, model=model, n_samples=0, details=True)
    four = _evaluate(
        examples, model=sharding.shard_model(model, mesh), mesh=mesh, n_samples=0, details=True
    )
    completions = [p["greedy_completion"] for p in one["problems"]]
    assert completions == ["x", "x", "y", "y", "y", "x", "y", "y"]
    assert [p["greedy_completion"] for p in four["problems"]] == completions
    for key in ("greedy_accuracy", "greedy_completion_len", "greedy_truncated_frac"):
        assert four[key] == one[key], key


@pytest.mark.parametrize("decode_weights", ["auto", "sharded"])
def test_evaluate_on_an_fsdp_mesh_matches_one_device(decode_weights):
    """Weights split over data × fsdp = 2 × 2: decoding from tensor-parallel copies ("auto")
    or from the training layout gives one device's completions."""
    examples = _examples("aabcbabc")
    mesh = sharding.make_mesh(data=2, fsdp=2)
    model = _markov_model(TRANSITIONS)
    one = _evaluate(examples, model=model, n_samples=0, details=True)
    split = _evaluate(
        examples,
        model=sharding.shard_model(model, mesh),
        mesh=mesh,
        n_samples=0,
        details=True,
        decode_weights=decode_weights,
    )
    assert [p["greedy_completion"] for p in split["problems"]] == [
        p["greedy_completion"] for p in one["problems"]
    ]
    assert split["greedy_accuracy"] == one["greedy_accuracy"]


# -- the paper's protocol (experiments/evaluate.py --paper) ------------------------------------


def test_paper_flag_sets_the_authors_protocol_and_gold(tmp_path):
    import json

    from experiments import evaluate

    task = tmp_path / "math500.jsonl"
    row = {"problem": "Half of one?", "answer": "0.5", "solution": r"It is $\boxed{\frac12}$."}
    task.write_text(json.dumps(row) + "\n")
    args = evaluate.parse_args(["--model=M", f"--task={task}", "--paper=math500"])
    assert (args.n, args.k, args.no_greedy) == (evaluation.PAPER_SAMPLES, 1, True)
    assert (args.temperature, args.top_p) == (0.6, 0.95)
    assert args.max_new_tokens == evaluation.PAPER_SAMPLING.max_new_tokens == 32768
    loaded = evaluate.load_task(args, _tokenizer())
    assert loaded.verifier == "lighteval_latex_gold"
    assert loaded.examples[0].answer == row["solution"]  # MATH-500: LaTeX on the solution
    aime = evaluate.load_task(
        evaluate.parse_args(["--model=M", f"--task={task}", "--paper=aime24"]), _tokenizer()
    )
    assert aime.verifier == "lighteval_expr_gold" and aime.examples[0].answer == "0.5"
    flags = ["--model=M", f"--task={task}", "--paper=amc23", "--max_new_tokens=9"]
    kept = evaluate.parse_args(flags)
    assert kept.max_new_tokens == 9
    # OlympiadBench's question is `question`, though its rows may carry a `problem` too.
    olympiad = tmp_path / "olympiadbench.jsonl"
    row = {"problem": "other text", "question": "What is 2+2?", "answer": "$4$"}
    olympiad.write_text(json.dumps(row) + "\n")
    flags = ["--model=M", f"--task={olympiad}", "--paper=olympiadbench"]
    (example,) = evaluate.load_task(evaluate.parse_args(flags), _tokenizer()).examples
    assert (example.question, example.answer) == ("What is 2+2?", "$4$")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model=M", "--task=gym:chain_sum", "--paper=aime24"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model=M", f"--task={task}", "--paper=gsm8k"])


def test_model_that_is_neither_a_workdir_nor_a_checkpoint_is_named(tiny_model_dir, tmp_path):
    """--model must be a training workdir or a Hugging Face checkpoint with its tokenizer;
    anything else fails before loading (not in transformers' tokenizer fallbacks)."""
    from experiments import evaluate

    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((tiny_model_dir / name).read_bytes())
    for directory, lacks in [
        (tmp_path, "no checkpoints/, no config.json, no tokenizer file"),
        (weights_only, "no checkpoints/, no tokenizer file"),
        (tmp_path / "absent", "does not exist"),
    ]:
        with pytest.raises(
            ValueError, match=rf"--model={re.escape(str(directory))} .*{lacks}; expected a trai"
        ):
            evaluate.main([f"--model={directory}", "--n=0"])
    assert not evaluate.is_training_workdir(tiny_model_dir)
    (tmp_path / "checkpoints").mkdir()
    assert evaluate.is_training_workdir(tmp_path)

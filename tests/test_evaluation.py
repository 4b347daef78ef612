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

VOCAB = ["<pad>", "<eos>", "q", "a", "b", "c", "x", "y", "<bos>"]
ID = {t: i for i, t in enumerate(VOCAB)}


def _tokenizer(adds_bos: bool = False):
    """Word-level over `VOCAB`; `adds_bos`: its special tokens are a BOS in front (as
    DeepSeek-R1-Distill's tokenizer adds one)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(ID, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    bos = {}
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", ID["<bos>"])]
        )
        bos = dict(bos_token="<bos>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left", **bos
    )


def _markov_config():
    """One layer of width 16 over `VOCAB`, 2 heads of 8 sharing 1 kv head."""
    return hf_fixtures.tiny_model_config(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )


def _markov_model(transitions: dict[str, dict[str, float]]):
    """A Transformer whose next-token logits depend only on the current token.

    Attention and MLP outputs are zeroed, so the final hidden state is RMSNorm(embed[t]); with
    one-hot embeddings that is √D·e_t and the logits row of t is √D·lm_head[t]. Unlisted
    successors get logit −30.
    """
    config = _markov_config()
    d = config.hidden_size
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


def _evaluate(examples, scorer=None, model=None, tokenizer=None, **kwargs):
    """`evaluation.evaluate` on the rigged model; the default verifier is `_exact_answer`."""
    if scorer is None:
        with rewards.RewardScorer(_exact_answer, num_workers=0) as scorer:
            return _evaluate(examples, scorer, model, tokenizer, **kwargs)
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
    tokenizer = _tokenizer() if tokenizer is None else tokenizer
    return evaluation.evaluate(model, tokenizer, examples, scorer=scorer, **{**defaults, **kwargs})


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


# -- the completion budget under a model length, special tokens, decode passes ---------------

# After "a" the model says x forever; after "c" it wanders between x and y (odds 1:1), never
# stopping: every completion runs to its budget.
ENDLESS = {
    "a": {"x": 0.0},
    "c": {"x": 0.0, "y": 0.0},
    "x": {"x": 0.0, "y": -1.0},
    "y": {"x": 0.0, "y": 0.0},
}


def test_completion_budgets_are_vllms_cap():
    np.testing.assert_array_equal(evaluation.completion_budgets([3, 10], 8), [8, 8])
    np.testing.assert_array_equal(evaluation.completion_budgets([3, 10], 8, 12), [8, 2])
    with pytest.raises(ValueError, match=r"prompt 1 has 12 tokens .*max_model_length=12"):
        evaluation.completion_budgets([3, 12, 15], 8, 12)


def test_max_model_length_caps_each_rows_completion():
    """Prompts of 2 and 5 tokens under max_model_length = 5 + 3: the long one gets 3 new
    tokens, the short one 6 (< max_new_tokens = 8), both cut off; each is what greedy decoding
    with that row's own budget gives, and the sampled rows are prefixes of uncapped ones."""
    model = _markov_model(ENDLESS)
    examples = _examples(["a", "q q q a"])
    capped = _evaluate(
        examples, model=model, n_samples=0, max_new_tokens=8, max_model_length=8, details=True
    )
    assert [p["greedy_completion"] for p in capped["problems"]] == ["x" * 6, "x" * 3]
    assert capped["greedy_completion_len"] == 4.5 and capped["greedy_truncated_frac"] == 1.0
    assert (capped["max_model_length"], capped["max_new_tokens"]) == (8, 8)
    for example, budget, text in [(examples[0], 6, "x" * 6), (examples[1], 3, "x" * 3)]:
        alone = _evaluate([example], model=model, n_samples=0, max_new_tokens=budget, details=True)
        assert alone["problems"][0]["greedy_completion"] == text
    # Sampling: the same draws, each row cut at its own budget.
    examples = _examples(["c", "q q q c"])
    sampled = dict(model=model, n_samples=2, greedy=False, temperature=1.0, max_new_tokens=8)
    full = _evaluate(examples, details=True, **sampled)["problems"]
    cut = _evaluate(examples, details=True, max_model_length=8, **sampled)["problems"]
    assert set(full[0]["completions"][0] + full[0]["completions"][1]) == {"x", "y"}
    for budget, whole, capped_row in zip((6, 3), full, cut, strict=True):
        assert [c[:budget] for c in whole["completions"]] == capped_row["completions"]
    # A prompt with no room left is named, with the numbers.
    with pytest.raises(ValueError, match=r"prompt 1 has 5 tokens .*max_model_length=5"):
        _evaluate(_examples(["a", "q q q a"]), model=model, n_samples=0, max_model_length=5)


def test_add_special_tokens_puts_the_bos_in_the_prompt_and_its_count():
    from aapo_jax.data import tokenize

    tokenizer = _tokenizer(adds_bos=True)
    bos = tokenizer.bos_token_id
    with_bos = tokenize.encode_prompts(tokenizer, ["q a"], add_special_tokens=True)
    assert with_bos == [[bos, ID["q"], ID["a"]]]
    assert tokenize.encode_prompts(tokenizer, ["q a"]) == [[ID["q"], ID["a"]]]
    ids, mask = tokenize.tokenize_prompts(
        tokenizer, ["q a", "q b"], add_special_tokens=True, buckets=None
    )
    assert (ids[:, 0] == bos).all() and mask.all()
    # max_model_length = 4 after "q a": room for "x" + EOS, or with the BOS for "x" alone.
    runs = {
        add: _evaluate(
            _examples("a"),
            tokenizer=tokenizer,
            n_samples=0,
            max_model_length=4,
            add_special_tokens=add,
            details=True,
        )
        for add in (False, True)
    }
    assert runs[True]["add_special_tokens"] and not runs[False]["add_special_tokens"]
    assert runs[False]["greedy_completion_len"] == 2 and runs[False]["greedy_truncated_frac"] == 0
    assert runs[True]["greedy_completion_len"] == 1 and runs[True]["greedy_truncated_frac"] == 1
    assert runs[True]["problems"][0]["greedy_completion"] == "x"


def test_eval_kv_cache_bytes_and_passes():
    """layers × 2 × (P + G·T) slots × kv heads × head_dim × 4 B per prompt (a shared prompt),
    and the fewest passes of 8 prompts that fit a budget."""
    config = _markov_config()
    settings = SamplerSettings(max_new_tokens=4)
    per_prompt = 1 * 2 * (2 + 3 * 4) * 1 * 8 * 4
    assert evaluation.kv_cache_bytes(config, settings, None, 1, 2, 3) == per_prompt
    passes = lambda gib: evaluation.decode_passes(
        config, settings, None, 8, 2, 3, kv_budget_gib=gib
    )
    assert passes(0.0) == 1
    assert passes(8 * per_prompt / sharding.GiB) == 1
    assert passes(3 * per_prompt / sharding.GiB) == 4
    with pytest.raises(ValueError, match="kv_budget_gib"):
        passes(per_prompt / 2 / sharding.GiB)


def _two_pass_budget(model, mesh, batch: int, num_samples: int) -> float:
    """GiB of KV caches of half of one device's prompts (P = 2, T = 4): two passes."""
    from aapo_jax.sharding import row_ways

    settings = SamplerSettings(max_new_tokens=4)
    ways = row_ways(mesh, batch)
    one = evaluation.kv_cache_bytes(model.config, settings, mesh, ways, 2, num_samples)
    return batch // ways // 2 * one / sharding.GiB


def test_kv_budget_decodes_in_passes_with_the_same_tokens():
    """A budget of half the prompts: two passes per generate call, and the greedy and sampled
    completions of one pass."""
    examples, model = _examples("aabcbabc"), _markov_model(TRANSITIONS)
    for kw in (dict(n_samples=0), dict(n_samples=2, greedy=False)):
        common = dict(model=model, batch_size=8, temperature=1.0, details=True, **kw)
        one = _evaluate(examples, **common)
        budget = _two_pass_budget(model, None, 8, max(kw["n_samples"], 1))
        two = _evaluate(examples, kv_budget_gib=budget, **common)
        assert (one["passes"], two["passes"], two["kv_budget_gib"]) == (1, 2, budget)
        assert one["problems"] == two["problems"]
        if not kw["n_samples"]:
            greedy = [p["greedy_completion"] for p in one["problems"]]
            assert greedy == ["x", "x", "y", "y", "y", "x", "y", "y"]
    assert {c for p in one["problems"][3::4] for c in p["completions"]} == {"x", "y"}


@pytest.mark.parametrize("axes", [dict(data=8, fsdp=1), dict(data=2, fsdp=4)])
def test_kv_budget_passes_on_the_8_fake_devices(axes):
    """16 problems, 2 per device in 2 passes: the sampled completions of one pass, each device
    decoding its own rows (data=8) or XLA splitting them (fsdp)."""
    examples = _examples("aabcbabc" * 2)
    mesh = sharding.make_mesh(**axes, tensor=1)
    model = sharding.shard_model(_markov_model(TRANSITIONS), mesh)
    common = dict(model=model, mesh=mesh, batch_size=16, n_samples=2, greedy=False, temperature=1.0)
    one = _evaluate(examples, details=True, **common)
    budget = _two_pass_budget(model, mesh, 16, 2)
    two = _evaluate(examples, details=True, kv_budget_gib=budget, **common)
    assert (one["passes"], two["passes"]) == (1, 2)
    assert [p["completions"] for p in two["problems"]] == [
        p["completions"] for p in one["problems"]
    ]
    assert {c for p in one["problems"][3::4] for c in p["completions"]} == {"x", "y"}


# -- the paper's protocol (experiments/evaluate.py --paper) ------------------------------------


def test_paper_flag_sets_the_authors_protocol_and_gold(tmp_path):
    import json

    from experiments import evaluate

    task = tmp_path / "math500.jsonl"
    row = {"problem": "Half of one?", "answer": "0.5", "solution": r"It is $\boxed{\frac12}$."}
    task.write_text(json.dumps(row) + "\n")
    args_flags = ["--model=M", f"--task={task}", "--paper=math500"]
    args = evaluate.parse_args(args_flags)
    assert (args.n, args.k, args.no_greedy) == (evaluation.PAPER_SAMPLES, 1, True)
    assert (args.temperature, args.top_p) == (0.6, 0.95)
    assert args.max_new_tokens == evaluation.PAPER_SAMPLING.max_new_tokens == 32768
    loaded = evaluate.load_task(args, _tokenizer())
    # Judged by lighteval 0.8.1 itself unless --judge=math-verify (our transcription).
    assert args.judge == evaluation.PAPER_JUDGE == "lighteval-0.8.1"
    assert loaded.verifier == "lighteval081_latex_gold"
    transcribed = evaluate.parse_args([*args_flags, "--judge=math-verify"])
    assert evaluate.load_task(transcribed, _tokenizer()).verifier == "lighteval_latex_gold"
    assert loaded.examples[0].answer == row["solution"]  # MATH-500: LaTeX on the solution
    aime = evaluate.load_task(
        evaluate.parse_args(["--model=M", f"--task={task}", "--paper=aime24"]), _tokenizer()
    )
    assert aime.verifier == "lighteval081_expr_gold" and aime.examples[0].answer == "0.5"
    flags = ["--model=M", f"--task={task}", "--paper=amc23", "--max_new_tokens=9"]
    kept = evaluate.parse_args(flags)
    assert kept.max_new_tokens == 9
    # lighteval's vLLM path: a 32768-token model length, prompts with special tokens; each
    # can be given explicitly (the BOS choice too) and otherwise off / uncapped.
    assert args.max_model_length == evaluation.PAPER_MAX_MODEL_LENGTH == 32768
    assert args.add_special_tokens is evaluation.PAPER_ADD_SPECIAL_TOKENS is True
    assert (args.kv_budget_gib, kept.max_model_length) == (0.0, 32768)
    flags = ["--model=M", f"--task={task}", "--paper=amc23", "--max_model_length=4096"]
    mine = evaluate.parse_args([*flags, "--noadd_special_tokens", "--kv_budget_gib=2.5"])
    assert (mine.max_model_length, mine.add_special_tokens, mine.kv_budget_gib) == (
        4096,
        False,
        2.5,
    )
    plain = evaluate.parse_args(["--model=M", f"--task={task}"])
    assert (plain.max_model_length, plain.add_special_tokens) == (None, False)
    assert evaluate.parse_args(["--model=M", "--add_special_tokens"]).add_special_tokens
    for bad in ("--max_model_length=0", "--kv_budget_gib=-1"):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--model=M", bad])
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


def test_paper_task_pins_columns_and_names_the_judge(tmp_path, monkeypatch):
    import json

    from experiments import evaluate

    path = tmp_path / "olympiadbench.jsonl"
    path.write_text(json.dumps({"problem": "x", "question": "What is 2+2?", "answer": "4"}))
    task = evaluation.paper_task("olympiadbench", str(path), _tokenizer(), judge="math-verify")
    assert task.verifier == "lighteval_latex_gold"
    assert [(e.question, e.answer) for e in task.examples] == [("What is 2+2?", "4")]
    assert "What is 2+2?" in task.prompt_fn(task.examples[0])
    for bad in (dict(benchmark="gsm8k"), dict(judge="vibes")):
        with pytest.raises(ValueError, match="valid"):
            evaluation.paper_verifier(**{"benchmark": "aime24", **bad})
    # The pinned judge is checked before anything loads, naming how to install it.
    monkeypatch.setenv("AAPO_LIGHTEVAL_DIR", str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"--judge=lighteval-0\.8\.1: .*requirements-lighteval"):
        evaluate.check_judge("lighteval-0.8.1", num_workers=2)
    evaluate.check_judge("math-verify", num_workers=0)


def test_a_short_last_call_still_splits_its_rows_over_the_mesh():
    from aapo_jax import sharding

    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    # 30 problems (AIME) on 8 devices: 32 prompts per call, so every device decodes 4.
    assert evaluation._batch_size(64, 30, mesh) == 32
    assert evaluation._batch_size(64, 30, None) == 30
    assert evaluation._batch_size(16, 30, mesh) == 16

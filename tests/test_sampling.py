"""Generation: greedy parity with transformers, sampling filters and law, masks, compiles."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from aapo_jax import decode_layouts, hlo, models, sampling, sharding
from tests import hf_fixtures

VOCAB = hf_fixtures.TINY["vocab_size"]
PAD = 0
LENGTHS = (9, 3, 6, 1, 12)
WIDTH = 12
T = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("samp")
    return {
        family: hf_fixtures.save_checkpoint(family, root / family, seed=10 + i)
        for i, family in enumerate(("qwen2", "llama3", "qwen2_tied_mqa"))
    }


@pytest.fixture(scope="module")
def qwen(checkpoints):
    return models.load_hf_checkpoint(checkpoints["qwen2"])


def _prompts(seed=0, lengths=LENGTHS, width=WIDTH):
    return hf_fixtures.left_padded_batch(np.random.default_rng(seed), lengths, width, VOCAB)


def _hf_greedy(path, ids, mask, eos):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=T,
            pad_token_id=PAD,
            eos_token_id=eos,
        )
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, T - new.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen2_tied_mqa"])
def test_greedy_matches_transformers_with_early_eos(checkpoints, family):
    model = models.load_hf_checkpoint(checkpoints[family])
    ids, mask = _prompts(1)
    free = sampling.generate(
        model, ids, mask, rng=jax.random.key(0), max_new_tokens=T, temperature=0.0
    )
    # An EOS id the greedy path emits early in some rows but not in all.
    eos = int(free.tokens[0, 2])
    out = sampling.generate(
        model,
        ids,
        mask,
        rng=jax.random.key(0),
        max_new_tokens=T,
        temperature=0.0,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    assert int(out.lengths[0]) <= 3 and int(out.lengths.max()) > 3
    expected = _hf_greedy(checkpoints[family], ids, mask, eos)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_eos_none_generates_the_full_budget(qwen):
    ids, mask = _prompts(2)
    out = sampling.generate(qwen, ids, mask, rng=jax.random.key(1), max_new_tokens=T)
    assert out.tokens.shape == (len(LENGTHS), T)
    assert bool(out.mask.all()) and (np.asarray(out.lengths) == T).all()


def test_mask_and_eos_semantics(qwen):
    ids, mask = _prompts(3)
    free = sampling.generate(
        qwen, ids, mask, rng=jax.random.key(0), max_new_tokens=T, temperature=0.0
    )
    eos = [int(free.tokens[1, 4]), int(free.tokens[2, 0])]
    out = sampling.generate(
        qwen,
        ids,
        mask,
        rng=jax.random.key(0),
        max_new_tokens=T,
        temperature=0.0,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[row], eos))
        n = hits[0] + 1 if hits.size else T
        assert m[row, :n].all() and not m[row, n:].any()
        assert (tokens[row, n:] == PAD).all()
        assert out.lengths[row] == n
        assert (np.asarray(out.logprobs)[row, n:] == 0).all()
    assert int(out.lengths[2]) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward(qwen, temperature):
    ids, mask = _prompts(4)
    out = sampling.generate(
        qwen,
        ids,
        mask,
        rng=jax.random.key(3),
        max_new_tokens=T,
        temperature=temperature,
        eos_token_id=5,
        buckets=None,
    )
    full_ids = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.asarray(out.mask)], axis=1)
    logits = models.compute_logits(qwen, full_ids, full_mask)
    logp = jax.nn.log_softmax(logits[:, WIDTH - 1 : -1], axis=-1)
    expected = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], -1)[..., 0]
    expected = expected * np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=2e-5)


def test_top_k1_and_tiny_top_p_equal_greedy(qwen):
    ids, mask = _prompts(5)
    kw = dict(rng=jax.random.key(7), max_new_tokens=T, eos_token_id=3)
    greedy = sampling.generate(qwen, ids, mask, temperature=0.0, **kw)
    top1 = sampling.generate(qwen, ids, mask, temperature=1.3, top_k=1, **kw)
    tiny_p = sampling.generate(qwen, ids, mask, temperature=1.0, top_p=1e-6, **kw)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(tiny_p.tokens), np.asarray(greedy.tokens))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_token_follows_tempered_softmax(qwen, temperature):
    ids, mask = _prompts(6, lengths=(5,), width=5)
    g = 6000
    out = sampling.generate(
        qwen,
        ids,
        mask,
        rng=jax.random.key(11),
        max_new_tokens=1,
        temperature=temperature,
        num_samples=g,
    )
    logits = np.asarray(models.compute_logits(qwen, ids, mask))[0, -1]
    expected = np.asarray(jax.nn.softmax(jnp.asarray(logits) / temperature))
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=VOCAB) / g
    total_variation = 0.5 * np.abs(counts - expected).sum()
    # Sampling noise alone gives TV ≈ 0.04 for this vocab and sample count.
    assert total_variation < 0.07, total_variation


def test_filters():
    config = sampling.SamplerSettings(max_new_tokens=1, temperature=1.0, top_k=2)
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.25, 0.05]]))
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, config)))
    np.testing.assert_array_equal(kept, [[True, False, True, False]])
    config = sampling.SamplerSettings(max_new_tokens=1, top_p=0.7)
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, config)))
    np.testing.assert_array_equal(kept, [[True, False, True, False]])  # 0.5 + 0.25 ≥ 0.7
    config = sampling.SamplerSettings(max_new_tokens=1, min_p=0.45)
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, config)))
    np.testing.assert_array_equal(kept, [[True, False, True, False]])  # p ≥ 0.45·0.5


def test_determinism_from_key(qwen):
    ids, mask = _prompts(7)
    kw = dict(max_new_tokens=T, temperature=1.0, eos_token_id=4)
    a = sampling.generate(qwen, ids, mask, rng=jax.random.key(5), **kw)
    b = sampling.generate(qwen, ids, mask, rng=jax.random.key(5), **kw)
    c = sampling.generate(qwen, ids, mask, rng=jax.random.key(6), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_group_sampling_prefills_once_and_orders_rows(qwen):
    ids, mask = _prompts(8)
    g = 3
    greedy = sampling.generate(
        qwen, ids, mask, rng=jax.random.key(0), max_new_tokens=T, temperature=0.0
    )
    grouped = sampling.generate(
        qwen, ids, mask, rng=jax.random.key(0), max_new_tokens=T, temperature=0.0, num_samples=g
    )
    np.testing.assert_array_equal(
        np.asarray(grouped.tokens), np.repeat(np.asarray(greedy.tokens), g, axis=0)
    )
    sampled = sampling.generate(
        qwen, ids, mask, rng=jax.random.key(1), max_new_tokens=T, num_samples=g
    )
    rows = np.asarray(sampled.tokens).reshape(len(LENGTHS), g, T)
    assert any(not np.array_equal(rows[b, 0], rows[b, 1]) for b in range(len(LENGTHS)))


def test_policy_and_reference_in_one_program(checkpoints, qwen):
    other = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"])
    ids, mask = _prompts(9)
    config = sampling.SamplingConfig(
        sampling.SamplerSettings(max_new_tokens=T), eos_token_ids=(4,), num_samples=2
    )
    keys = jax.random.split(jax.random.key(2))
    both = sampling.generate_many([qwen, other], ids, mask, rngs=list(keys), config=config)
    for model, key, out in zip([qwen, other], keys, both, strict=True):
        alone = sampling.generate(
            model, ids, mask, rng=key, max_new_tokens=T, eos_token_id=4, num_samples=2
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(alone.tokens))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(alone.logprobs), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(alone.lengths))


def test_inverse_cdf_draws_follow_softmax_and_skip_zero_probability():
    logits = jnp.array([[-jnp.inf, 0.0, 1.0, -jnp.inf, 2.0, -jnp.inf]])
    keys = jax.random.split(jax.random.key(4), 20_000)
    draws = np.asarray(jax.vmap(lambda k: sampling.categorical_inverse_cdf(k, logits))(keys))
    counts = np.bincount(draws.ravel(), minlength=6) / draws.size
    expected = np.asarray(jax.nn.softmax(logits[0]))
    assert counts[[0, 3, 5]].sum() == 0
    # 20k draws: the standard error of each frequency is below 0.0035.
    np.testing.assert_allclose(counts, expected, atol=0.015)


def test_inverse_cdf_largest_uniform_draws_the_last_possible_token(monkeypatch):
    below_one = np.nextafter(np.float32(1), np.float32(0))
    monkeypatch.setattr(
        sampling.jax.random, "uniform", lambda key, shape, dtype: jnp.full(shape, below_one, dtype)
    )
    logits = jnp.array([[0.3, 1.0, -jnp.inf, -jnp.inf], [5.0, -jnp.inf, -jnp.inf, 0.1]])
    np.testing.assert_array_equal(
        np.asarray(sampling.categorical_inverse_cdf(jax.random.key(0), logits)), [1, 3]
    )


@contextlib.contextmanager
def _count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_no_recompile_for_same_bucket(qwen):
    kw = dict(max_new_tokens=T, temperature=1.0, eos_token_id=4, buckets=(16, 32))
    ids, mask = _prompts(10)
    jax.block_until_ready(sampling.generate(qwen, ids, mask, rng=jax.random.key(0), **kw))
    with _count_compiles() as compiles:
        for seed, width in [(11, 12), (12, 14), (13, 16), (14, 9)]:
            ids, mask = _prompts(seed, lengths=(9, 3, 6, 1, 5), width=width)
            out = sampling.generate(qwen, ids, mask, rng=jax.random.key(seed), **kw)
            jax.block_until_ready(out)
    assert compiles == []
    # A different budget is a different program: the counter does see compiles.
    with _count_compiles() as compiles:
        jax.block_until_ready(
            sampling.generate(
                qwen, ids, mask, rng=jax.random.key(0), **{**kw, "max_new_tokens": T + 1}
            )
        )
    assert compiles


def test_bad_arguments_name_the_field(qwen):
    ids, mask = _prompts(0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(qwen, ids, mask, rng=jax.random.key(0), max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(qwen, ids, mask, rng=jax.random.key(0), max_new_tokens=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'topk'"):
        sampling.generate(qwen, ids, mask, rng=jax.random.key(0), max_new_tokens=2, topk=3)
    with pytest.raises(ValueError, match=r"attention_mask \(5, 11\)"):
        sampling.generate(qwen, ids, mask[:, 1:], rng=jax.random.key(0), max_new_tokens=2)


def _numpy_inverse_cdf(logits, u):
    """float64 reference: the first token whose CDF exceeds u·Z, and u·Z's gap to a boundary."""
    p = np.exp(logits - logits.max())
    cdf = np.cumsum(p / p.sum())
    return int(np.searchsorted(cdf, u, side="right")), float(np.min(np.abs(cdf - u)))


def test_inverse_cdf_draw_matches_a_float64_cumulative_sum():
    # V = 37 is no square: the last of the ⌈√37⌉ = 7 blocks is padded. The first block
    # and the last tokens have zero probability, and one row is all but one -inf.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(4, 37)).astype(np.float32)
    logits[:, :7] = -np.inf
    logits[:, 33:] = -np.inf
    logits[3, :] = -np.inf
    logits[3, 20] = 0.0
    below_one = np.nextafter(np.float32(1), np.float32(0))
    us = np.concatenate([[0.0, below_one], rng.uniform(size=300)]).astype(np.float32)
    draw = jax.jit(jax.vmap(sampling.inverse_cdf_draw, in_axes=(0, None)))
    got = np.asarray(draw(jnp.asarray(np.repeat(us[:, None], 4, 1)), jnp.asarray(logits)))
    for row in range(4):
        drawn = got[:, row]
        assert np.all(np.isfinite(logits[row, drawn])), "drew a zero-probability token"
        for u, token in zip(us, drawn, strict=True):
            expected, gap = _numpy_inverse_cdf(logits[row].astype(np.float64), float(u))
            # Only a u within fp32 rounding of a CDF boundary may land on the neighbour.
            assert token == expected or gap < 1e-5, (row, u, token, expected)
    assert np.all(got[:, 3] == 20)
    # The largest uniform draws each row's last possible token.
    np.testing.assert_array_equal(got[1, :3], [32, 32, 32])


def test_draw_uniforms_is_the_per_step_key_stream():
    config = sampling.SamplerSettings(max_new_tokens=5)
    rng = jax.random.key(3)
    uniforms = np.asarray(sampling.draw_uniforms(rng, 6, config))
    assert uniforms.shape == (5, 6)
    later, first = jax.random.split(rng)
    np.testing.assert_array_equal(uniforms[0], jax.random.uniform(first, (6, 1))[:, 0])
    for t in range(1, 5):
        step = jax.random.uniform(jax.random.fold_in(later, t), (6, 1))[:, 0]
        np.testing.assert_array_equal(uniforms[t], step)
    greedy = sampling.SamplerSettings(max_new_tokens=5, temperature=0.0)
    assert sampling.draw_uniforms(rng, 6, greedy) is None


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_row_parallel_generation_equals_one_device(checkpoints, qwen, temperature):
    """Each of 4 devices decodes its own prompts in its own loop: same tokens as one device."""
    other = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"])
    mesh = sharding.make_mesh(data=4, fsdp=1)
    ids, mask = _prompts(11, lengths=(9, 3, 6, 1, 12, 2, 7, 5))
    config = sampling.SamplingConfig(
        sampling.SamplerSettings(max_new_tokens=T, temperature=temperature),
        eos_token_ids=(4,),
        num_samples=2,
    )
    keys = list(jax.random.split(jax.random.key(7)))
    alone = sampling.generate_many([qwen, other], ids, mask, rngs=keys, config=config)
    models_on_mesh = [sharding.shard_model(m, mesh) for m in (qwen, other)]
    split = sampling.generate_many(models_on_mesh, ids, mask, rngs=keys, config=config, mesh=mesh)
    for a, b in zip(alone, split, strict=True):
        assert len(b.tokens.sharding.device_set) == 4
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        # Each device's matmuls see fewer rows: only the fp32 summation order differs.
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    # 6 prompts do not split 4 ways: the program is partitioned by XLA instead, same result.
    ids6, mask6 = ids[:6], mask[:6]
    kw = dict(rng=keys[0], max_new_tokens=T, temperature=temperature, eos_token_id=4)
    np.testing.assert_array_equal(
        np.asarray(sampling.generate(qwen, ids6, mask6, **kw).tokens),
        np.asarray(sampling.generate(models_on_mesh[0], ids6, mask6, mesh=mesh, **kw).tokens),
    )


def test_a_decode_copy_in_the_compute_dtype_gives_the_same_logits(checkpoints):
    """fp32 masters computing in bf16: the copy cast once decodes bit for bit as the masters
    cast at every use."""
    masters = models.load_hf_checkpoint(
        checkpoints["qwen2"], dtype=jnp.bfloat16, param_dtype=jnp.float32
    )
    copy = masters.in_compute_dtype()
    leaves = jax.tree.leaves(nnx.state(copy))
    assert all(x.dtype == jnp.bfloat16 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
    ids, mask = _prompts(3, lengths=(5, 8))
    np.testing.assert_array_equal(
        np.asarray(models.compute_logits(masters, ids, mask), np.float32),
        np.asarray(models.compute_logits(copy, ids, mask), np.float32),
    )


def _decode_loop_gathers(models_on_mesh, ids, mask, keys, config, mesh) -> list[int]:
    """All-gather bytes per iteration of each decode loop in the compiled program."""
    args = (tuple(models_on_mesh), jnp.asarray(ids), jnp.asarray(mask), tuple(keys))
    text = sampling._generate_jit.lower(*args, config, mesh).compile().as_text()
    loops = hlo.collective_bytes(text)["unknown_trip_count_loops"]
    assert loops, "no decode loop found"
    return [loop["bytes_per_iteration"].get("all-gather", 0) for loop in loops]


@pytest.mark.parametrize("layout", ["sharded", "replicated", "tensor"])
def test_decode_layouts_match_one_device_and_move_no_weights_in_the_loop(checkpoints, qwen, layout):
    """On an fsdp mesh of 8 devices (XLA-partitioned), each decode layout over a shared
    prompt gives the tokens and log-probs (to fp tolerance) of one device whose cache
    repeats the prompt per row. From the copies ("replicated"; "tensor": the MLP and the
    vocabulary split over all 8) the decode loop gathers no weights; from the training
    layout ("sharded") it gathers them on every step."""
    other = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"])
    mesh = sharding.make_mesh(data=2, fsdp=4)
    ids, mask = _prompts(12, lengths=(9, 3, 6, 1, 12, 2, 7, 5))
    settings = sampling.SamplerSettings(max_new_tokens=T, temperature=1.0)
    keys = list(jax.random.split(jax.random.key(8)))
    models_on_mesh = [sharding.shard_model(m, mesh) for m in (qwen, other)]
    base = sampling.SamplingConfig(settings, eos_token_ids=(4,), num_samples=2)
    repeated = dataclasses.replace(base, settings=_repeated_prompt(settings))
    alone = sampling.generate_many([qwen, other], ids, mask, rngs=keys, config=repeated)
    config = dataclasses.replace(base, decode_weights=layout)
    out = sampling.generate_many(models_on_mesh, ids, mask, rngs=keys, config=config, mesh=mesh)
    for a, b in zip(alone, out, strict=True):
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    ids_b, mask_b = sampling._bucket_prompts(ids, mask, sampling.DEFAULT_BUCKETS)
    ids_b, mask_b = sharding.put_rows((ids_b, mask_b), mesh)
    gathers = _decode_loop_gathers(models_on_mesh, ids_b, mask_b, keys, config, mesh)
    if layout == "sharded":
        assert min(gathers) > 0
    else:
        # Activations only: less than one layer's weights per step (the tiny model's
        # activations are nearly as large as its weights).
        c = qwen.config
        mlp = 3 * c.hidden_size * c.intermediate_size * 4
        attn = 2 * c.hidden_size * (c.num_heads + c.num_kv_heads) * c.head_dim * 4
        assert max(gathers) < mlp + attn, gathers


def _repeated_prompt(settings):
    return dataclasses.replace(settings, shared_prompt=False)


def test_a_shared_prompt_gives_the_repeated_prompts_tokens(checkpoints, qwen):
    """G rows that read their prompt's keys and values once (the default) draw the tokens,
    log-probs and lengths of rows that each hold a copy, for every model family (greedy
    for one); the decode cache keeps the prompt once per prompt."""
    ids, mask = _prompts(14)
    for family, temperature in (("qwen2", 0.0), ("llama3", 1.0), ("qwen2_tied_mqa", 1.0)):
        kw = dict(rng=jax.random.key(3), max_new_tokens=T, temperature=temperature, num_samples=3)
        model = qwen if family == "qwen2" else models.load_hf_checkpoint(checkpoints[family])
        shared = sampling.generate(model, ids, mask, eos_token_id=4, **kw)
        repeated = sampling.generate(model, ids, mask, eos_token_id=4, shared_prompt=False, **kw)
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
        np.testing.assert_array_equal(np.asarray(shared.lengths), np.asarray(repeated.lengths))
        np.testing.assert_allclose(
            np.asarray(shared.logprobs), np.asarray(repeated.logprobs), atol=1e-5
        )
    config = sampling.SamplingConfig(sampling.SamplerSettings(max_new_tokens=T), num_samples=3)
    state, _ = sampling.start_decode([qwen], ids, mask, [jax.random.key(0)], config)
    (cache,) = state.caches
    assert cache.prompt.k[0].shape[0] == ids.shape[0] and cache.k[0].shape[0] == 3 * ids.shape[0]
    assert cache.size == T and cache.prompt_length == ids.shape[1]


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 2, 4)])
def test_a_shared_prompt_whose_rows_span_devices(checkpoints, qwen, shape):
    """4 prompts × G = 6 rows over 8 devices (the 1.5B paper setting's split: a prompt's
    rows on two devices, the prompts themselves not divisible by 8), tensor decode copies:
    one device's tokens with the prompt repeated per row. On the paper's fsdp 2 × tensor 4
    mesh too, whose decode splits the rows over all 8 devices (the prompts over fsdp)."""
    other = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"])
    mesh = sharding.make_mesh(*shape)
    ids, mask = _prompts(15, lengths=(9, 3, 12, 5))
    settings = sampling.SamplerSettings(max_new_tokens=T, temperature=1.0)
    keys = list(jax.random.split(jax.random.key(10)))
    base = sampling.SamplingConfig(settings, eos_token_ids=(4,), num_samples=6)
    repeated = dataclasses.replace(base, settings=_repeated_prompt(settings))
    alone = sampling.generate_many([qwen, other], ids, mask, rngs=keys, config=repeated)
    pair = [sharding.shard_model(m, mesh) for m in (qwen, other)]
    config = dataclasses.replace(base, decode_weights="tensor")
    out = sampling.generate_many(pair, ids, mask, rngs=keys, config=config, mesh=mesh)
    for a, b in zip(alone, out, strict=True):
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_the_tensor_layout_splits_every_matmul_weight_over_every_device(qwen):
    """The MLP's hidden units, the vocabulary and the attention projections' head_dim are
    split; only the norms stay whole."""
    mesh = sharding.make_mesh(data=2, fsdp=4)
    _, state = nnx.split(qwen)
    shardings = decode_layouts.decode_shardings(state, mesh, "tensor")
    mlp = shardings["layers"]["mlp"]["gate_kernel"].value
    assert mlp.spec == PartitionSpec(None, None, sharding.MESH_AXES[:2])
    assert shardings["embed"].value.spec == PartitionSpec(sharding.MESH_AXES[:2], None)
    for name in ("q_kernel", "k_kernel", "v_kernel"):  # [Ly, D, heads, Dh]
        spec = shardings["layers"]["attn"][name].value.spec
        assert spec == PartitionSpec(None, None, None, sharding.MESH_AXES[:2])
    o_spec = shardings["layers"]["attn"]["o_kernel"].value.spec  # [Ly, H, Dh, D]
    assert o_spec == PartitionSpec(None, None, sharding.MESH_AXES[:2], None)
    assert shardings["layers"]["input_norm"]["scale"].value.is_fully_replicated
    n = sum(x.size for x in jax.tree.leaves(state))
    whole = decode_layouts.layout_bytes(state, mesh, "replicated", 2)
    split = decode_layouts.layout_bytes(state, mesh, "tensor", 2)
    assert whole == 2 * n and split < whole / 4


def test_auto_decode_layout_weighs_the_copies_against_half_a_device():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    memory, _ = sharding.device_memory_bytes(mesh.devices.flat[0])
    share = decode_layouts.DECODE_WEIGHTS_SHARE
    fits = lambda layout: int(share * memory)
    too_big = lambda layout: int(share * memory) + 1
    assert decode_layouts.decode_layout("auto", mesh, fits, prompts=8) == "tensor"
    assert decode_layouts.decode_layout("auto", mesh, too_big, prompts=8) == "sharded"
    assert decode_layouts.decode_layout("replicated", mesh, too_big, prompts=8) == "replicated"
    assert decode_layouts.decode_layout("sharded", mesh, fits, prompts=8) == "sharded"
    assert decode_layouts.decode_layout("tensor", None, fits, prompts=8) == "sharded"
    # A data-parallel mesh decodes each device's rows over whole weights.
    data = sharding.make_mesh(data=8, fsdp=1)
    assert decode_layouts.decode_layout("auto", data, fits, prompts=8) == "replicated"
    assert decode_layouts.decode_layout("tensor", data, fits, prompts=8) == "replicated"
    with pytest.raises(ValueError, match="decode_weights='rows'"):
        decode_layouts.decode_layout("rows", mesh, fits, prompts=8)


class _Device:
    """A stand-in device: a TPU kind the memory table lacks, with or without memory_stats."""

    platform, device_kind = "tpu", "TPU v99"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if self.stats is None:
            raise RuntimeError("MemoryStats is only supported for addressable PjRt devices.")
        return self.stats


def test_device_memory_of_a_tpu_kind_the_table_lacks():
    """A real chip reports its own memory; a compile-only one is named, with the remedies."""
    assert sharding.device_memory_bytes(_Device({"bytes_limit": 123})) == (123, "memory_stats")
    with pytest.raises(ValueError, match=r"'TPU v99'.*decode_weights"):
        sharding.device_memory_bytes(_Device(None))
    assert sharding.device_memory_bytes(_Device(None), override_gb=1.0) == (2**30, "flag")


@pytest.mark.parametrize("mesh_shape", [None, (4, 1), (2, 4)])
def test_decode_step_is_the_loop_body(checkpoints, qwen, mesh_shape):
    """`start_decode` and T-1 calls of `decode_step` (every layer laid out, the planner's
    program) give the loop's tokens and log-probs, on one device, a data-parallel mesh
    (per-device steps) and an fsdp mesh with replicated decode copies."""
    other = models.load_hf_checkpoint(checkpoints["qwen2_tied_mqa"])
    ids, mask = _prompts(13, lengths=(9, 3, 6, 1, 12, 2, 7, 5))
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    mesh = None if mesh_shape is None else sharding.make_mesh(*mesh_shape)
    config = sampling.SamplingConfig(
        sampling.SamplerSettings(max_new_tokens=T, temperature=1.0),
        eos_token_ids=(4,),
        num_samples=2,
        decode_weights="sharded" if mesh is None else "replicated",
    )
    keys = list(jax.random.split(jax.random.key(9)))
    loop = sampling.generate_many([qwen, other], ids, mask, rngs=keys, config=config, buckets=None)
    pair = [qwen, other] if mesh is None else [sharding.shard_model(m, mesh) for m in (qwen, other)]
    decode = sampling.decode_models(pair, config, mesh, ids.shape[0])
    state, uniforms = sampling.start_decode(decode, ids, mask, keys, config)
    if mesh is not None:  # the prefill ran on one device: onto the mesh
        state, uniforms = jax.device_put((state, uniforms), NamedSharding(mesh, PartitionSpec()))
    step = jax.jit(
        lambda m, s, u: sampling.decode_step(
            m,
            s,
            u,
            config,
            kv_len=ids.shape[1] + T,
            prompts=ids.shape[0],
            mesh=mesh,
            unroll=qwen.config.num_layers,
        )
    )
    for _ in range(T - 1):
        state = step(decode, state, uniforms)
    eos = jnp.asarray((4,))
    for out, tokens, logprobs in zip(loop, state.tokens, state.logprobs, strict=True):
        mine = sampling.completion_output(tokens, logprobs, eos)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(mine.tokens))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(mine.logprobs), atol=1e-5)


def test_mean_read_slots_of_the_loop_segments():
    assert sampling.decode_segments(512, 3584) == [896, 1792, 2688, 3584]
    steps = [896 - 1, 896, 896, 896]
    reads = [512 + 896, 512 + 1792, 512 + 2688, 512 + 3584]
    expected = sum(s * r for s, r in zip(steps, reads, strict=True)) / sum(steps)
    assert sampling.mean_read_slots(512, 3584) == pytest.approx(expected)
    assert sampling.mean_read_slots(8, 4) == 8 + 4  # one segment: the whole buffer

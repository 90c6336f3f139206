"""The jitted sampler: parity with transformers, shared-prefix groups, no recompiles, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fst_jax.config import ConfigError
from fst_jax.models.configs import tiny
from fst_jax.models.tokenizer import ByteChatTokenizer
from fst_jax.models.transformer import init_model, positions_from_mask
from fst_jax.models.weights import model_params, params_to_hf
from fst_jax.sampling import (PromptBatch, Sampler, SamplingConfig, chunks, filter_logits,
                               first_argmax, inverse_cdf_draw, share_plan, slot_shape)
from fst_jax.sharding import MeshConfig, make_mesh

PAIRS = [("Be brief.", "What is 2+3?"), ("You are a careful calculator.", "7*6?"),
         ("Answer with a number.", "Tom has 3 apples and buys 4 more. How many?")]


@pytest.fixture(scope="module")
def tok():
    return ByteChatTokenizer()


@pytest.fixture(scope="module")
def model():
    return init_model(tiny("llama", vocab_size=ByteChatTokenizer.vocab_size), seed=3)


def make_sampler(model, tok, mesh=None, **kw):
    cfg = SamplingConfig(**{"max_new_tokens": 12, "prompt_buckets": (64, 128), **kw})
    return Sampler(model, tok, cfg, mesh)


def test_greedy_generation_matches_transformers_generate(model, tok):
    cfg = model.cfg
    hf_cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in
                        params_to_hf(cfg, model_params(model)).items()}, strict=False)
    sampler = make_sampler(model, tok)
    out = sampler.generate(sampler.params, sampler.encode(PAIRS), n=1, temperature=0.0)
    for row, (context, task) in enumerate(PAIRS):
        c, t = tok.encode(context, task)
        ids = torch.tensor([list(c + t)])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                          do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        ref = ref[0, ids.shape[1]:].numpy()
        n = out.lengths[row]
        np.testing.assert_array_equal(out.tokens[row, :n], ref[:n])


def test_sampled_logprobs_equal_teacher_forced_forward_logprobs(model, tok):
    sampler = make_sampler(model, tok)
    prompts = sampler.encode(PAIRS)
    out = sampler.generate(sampler.params, prompts, n=2, seed=1, temperature=0.7)
    rows = np.repeat(prompts.tokens, 2, axis=0)
    pmask = np.repeat(prompts.mask, 2, axis=0)
    tokens = np.concatenate([rows, out.tokens], 1)
    mask = np.concatenate([pmask, out.mask], 1)
    logits = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    lp = jax.nn.log_softmax(logits / 0.7, axis=-1)
    Lp = rows.shape[1]
    ref = np.take_along_axis(np.asarray(lp[:, Lp - 1:-1]), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.where(out.mask, out.logprobs, 0), np.where(out.mask, ref, 0),
                               atol=2e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_group_sampling_equals_unshared_sampling(model, tok, temperature):
    sampler = make_sampler(model, tok)
    grouped = sampler.generate(sampler.params, sampler.encode(PAIRS), n=4, seed=7,
                               temperature=temperature)
    repeated = [p for p in PAIRS for _ in range(4)]
    flat = sampler.generate(sampler.params, sampler.encode(repeated), n=1, seed=7,
                            temperature=temperature)
    # Rows of the flat batch use keys for prompt index r, sample 0; the grouped rows r*n+j use
    # the same row indices, so draws coincide row for row.
    np.testing.assert_array_equal(grouped.tokens, flat.tokens)
    np.testing.assert_allclose(grouped.logprobs, flat.logprobs, atol=1e-5)


def test_twenty_contexts_in_one_bucket_compile_prefill_and_decode_once(model, tok):
    sampler = make_sampler(model, tok, max_new_tokens=4, prompt_buckets=(128,))
    rng = np.random.RandomState(0)
    lengths = set()
    words = "add the numbers carefully and answer with digits only please".split()
    for i in range(20):
        context = " ".join(rng.choice(words, size=rng.randint(1, 8)))
        pairs = [(context, "1+1?"), ("Fixed context.", f"{i}+2?")]
        lengths.add(sum(map(len, tok.encode(*pairs[0]))))
        sampler.generate(sampler.params, sampler.encode(pairs), n=2, seed=i,
                         temperature=float(rng.uniform(0.1, 1.5)), top_p=float(rng.uniform(0.5, 1)),
                         top_k=int(rng.randint(0, 50)))
    assert len(lengths) > 5
    assert sampler.trace_counts == {"prefill": 1, "decode": 1}


def test_same_seed_is_deterministic_and_other_seed_differs(model, tok):
    sampler = make_sampler(model, tok)
    prompts = sampler.encode(PAIRS)
    a = sampler.generate(sampler.params, prompts, n=2, seed=11)
    b = sampler.generate(sampler.params, prompts, n=2, seed=11)
    c = sampler.generate(sampler.params, prompts, n=2, seed=12)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_a_prompt_id_gives_a_prompt_the_same_draws_at_any_position_and_in_any_chunk(model, tok):
    sampler = make_sampler(model, tok, max_prompts_per_batch=2, max_new_tokens=8, prompt_buckets=(128,))
    ids = [7, 123, 40]
    texts = sampler.generate_text(sampler.params, PAIRS, n=2, seed=5, prompt_ids=ids)
    moved = sampler.generate_text(sampler.params, PAIRS[::-1], n=2, seed=5, prompt_ids=ids[::-1])
    assert moved[::-1] == texts
    alone = sampler.generate_text(sampler.params, PAIRS[2:], n=2, seed=5, prompt_ids=ids[2:])
    assert alone[0] == texts[2]
    by_position = sampler.generate_text(sampler.params, PAIRS[::-1], n=2, seed=5)
    assert by_position[::-1] != texts  # without ids a prompt's draws follow its position
    with pytest.raises(ConfigError, match="one prompt id per pair"):
        sampler.generate_text(sampler.params, PAIRS, prompt_ids=[1])
    with pytest.raises(ConfigError, match=r"in \[0, 2\*\*31 / n\)"):
        sampler.generate(sampler.params, sampler.encode(PAIRS[:1]), n=2, prompt_ids=[2**30])


def test_one_request_with_per_sample_knobs_and_row_ids_equals_the_separate_requests(model, tok):
    """A greedy sample, two at T 0.8 and two at T 1 (top-p 1, top-k 0) of each prompt in one
    request, rows named by their own ids, give the same tokens as three requests of one kind."""
    sampler = make_sampler(model, tok, max_new_tokens=8, prompt_buckets=(128,), top_k=5)
    prompts = sampler.encode(PAIRS)
    ids = np.arange(15).reshape(3, 5) * 7 + 100
    together = sampler.generate(sampler.params, prompts, n=5, seed=3,
                                temperature=[0.0, 0.8, 0.8, 1.0, 1.0], top_p=[None, None, None, 1.0, 1.0],
                                top_k=[None, None, None, 0, 0], prompt_ids=ids)
    parts = [sampler.generate(sampler.params, prompts, n=len(js), seed=3, prompt_ids=ids[:, js], **kw)
             for js, kw in (([0], dict(temperature=0.0)), ([1, 2], dict(temperature=0.8)),
                            ([3, 4], dict(temperature=1.0, top_p=1.0, top_k=0)))]
    for js, part in zip(((0,), (1, 2), (3, 4)), parts):
        sub = together.subset(js)
        np.testing.assert_array_equal(sub.tokens, part.tokens)
        np.testing.assert_allclose(sub.logprobs, part.logprobs, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sub.temperature, part.temperature)
    assert not np.array_equal(parts[1].tokens, parts[2].tokens)  # the knobs did differ
    with pytest.raises(ConfigError, match="one value or one per sample"):
        sampler.generate(sampler.params, prompts, n=2, temperature=[0.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="prompt_ids of shape"):
        sampler.generate(sampler.params, prompts, n=2, prompt_ids=ids)


def test_requests_split_into_equal_calls_and_slots_round_to_powers_of_two_dividing_the_devices():
    assert chunks(48, 64) == [range(0, 48)]  # one call, no pair repeated to fill it
    assert [len(c) for c in chunks(400, 64)] == [57, 57, 57, 58, 57, 57, 57]
    assert sum(map(len, chunks(5, 2))) == 5 and len(chunks(5, 2)) == 3
    assert slot_shape(3, 3) == (4, 4) and slot_shape(2, 24) == (2, 32)
    assert slot_shape(1, 3, 8) == (1, 8) and slot_shape(2, 3, 8) == (2, 4) and slot_shape(4, 4, 8) == (4, 4)
    assert slot_shape(1, 1, 6) == (1, 8)  # not a power of two: at least as many slots as devices


def test_rows_stop_at_eos_and_are_padded_after_it(model, tok):
    sampler = make_sampler(model, tok)
    prompts = sampler.encode(PAIRS)
    free = sampler.generate(sampler.params, prompts, n=1, temperature=0.0)
    eos = int(free.tokens[0, 3])  # row 0 emits this token at step 3 under greedy decoding
    stopping = Sampler(model, _with_eos(tok, eos), sampler.config)
    out = stopping.generate(stopping.params, prompts, n=1, temperature=0.0)
    first = np.argmax(free.tokens == eos, axis=1)
    hit = (free.tokens == eos).any(1)
    expected_len = np.where(hit, first + 1, free.tokens.shape[1])
    np.testing.assert_array_equal(out.lengths, expected_len)
    np.testing.assert_array_equal(out.finished, hit)
    for r in range(len(PAIRS)):
        np.testing.assert_array_equal(out.tokens[r, :out.lengths[r]], free.tokens[r, :out.lengths[r]])
        assert (out.tokens[r, out.lengths[r]:] == tok.pad_id).all()
        assert not out.mask[r, out.lengths[r]:].any()


def _with_eos(tok, eos):
    other = ByteChatTokenizer(tok.max_context_tokens)
    other.eos_id = eos
    return other


def test_filter_logits_keeps_top_k_and_nucleus_like_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(5, 40).astype(np.float32)
    top_p = np.array([1.0, 0.5, 0.9, 1.0, 0.3], np.float32)
    top_k = np.array([0, 0, 5, 3, 10], np.int32)
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(top_p), jnp.asarray(top_k)))
    for row in range(5):
        order = np.argsort(-logits[row])
        probs = np.exp(logits[row][order] - logits[row].max())
        probs /= probs.sum()
        keep_p = int(np.sum(np.cumsum(probs) - probs < top_p[row]))
        keep = keep_p if top_k[row] == 0 else min(keep_p, top_k[row])
        expected = np.full(40, -np.inf, np.float32)
        expected[order[:keep]] = logits[row][order[:keep]]
        np.testing.assert_array_equal(out[row], expected)


def test_top_k_one_equals_greedy(model, tok):
    sampler = make_sampler(model, tok)
    prompts = sampler.encode(PAIRS)
    greedy = sampler.generate(sampler.params, prompts, n=2, temperature=0.0)
    topk1 = sampler.generate(sampler.params, prompts, n=2, seed=4, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(greedy.tokens, topk1.tokens)


@pytest.mark.parametrize("mesh_cfg, gather", [(MeshConfig(data=8), True),
                                              (MeshConfig(data=2, fsdp=2, tensor=2), True),
                                              (MeshConfig(data=2, fsdp=2, tensor=2), False)])
def test_sampling_on_eight_devices_equals_one_device(model, tok, mesh_cfg, gather):
    pairs = (PAIRS * 3)[:8]
    single = make_sampler(model, tok)
    sharded = make_sampler(model, tok, mesh=make_mesh(mesh_cfg), gather_weights=gather)
    assert sharded.gathers == (gather and mesh_cfg.fsdp > 1)
    a = single.generate(single.params, single.encode(pairs), n=2, seed=3)
    b = sharded.generate(sharded.params, sharded.encode(pairs), n=2, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_generate_text_splits_requests_into_equal_power_of_two_chunks(model, tok):
    sampler = make_sampler(model, tok, max_prompts_per_batch=2, max_new_tokens=4,
                           prompt_buckets=(128,))
    texts = sampler.generate_text(sampler.params, PAIRS, n=2, seed=0, temperature=0.0)
    assert [len(t) for t in texts] == [2, 2, 2]
    # Chunks are (2 contexts x 1 prompt) and (1 context x 2 prompts): one program each.
    assert sampler.trace_counts["decode"] == 2
    again = sampler.generate_text(sampler.params, PAIRS[1:] + PAIRS, n=2, seed=0, temperature=0.0)
    assert again[2:] == texts
    assert sampler.trace_counts["decode"] == 2


def test_inverse_cdf_draws_follow_the_categorical_distribution():
    rng = np.random.RandomState(0)
    probs = rng.dirichlet(np.ones(300) * 0.3).astype(np.float32)
    probs[::7] = 0.0  # filtered-out entries must never be drawn
    probs /= probs.sum()
    draws = 20000
    u = jax.random.uniform(jax.random.key(0), (draws,))
    weights = jnp.broadcast_to(jnp.asarray(probs) * 3.0, (draws, 300))  # unnormalised is fine
    idx = np.asarray(inverse_cdf_draw(weights, u, block=64))
    freq = np.bincount(idx, minlength=300) / draws
    assert freq[::7].sum() == 0
    assert np.abs(freq - probs).max() < 4 * np.sqrt(probs.max() / draws)


def test_first_argmax_equals_argmax_including_ties():
    x = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -0.5, -0.5]])
    np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.argmax(np.asarray(x), -1))


def test_unrolled_and_scanned_layer_decoding_give_the_same_samples(model, tok):
    unrolled = make_sampler(model, tok, unroll_layers=True)
    scanned = make_sampler(model, tok, unroll_layers=False)
    a = unrolled.generate(unrolled.params, unrolled.encode(PAIRS), n=2, seed=5)
    b = scanned.generate(scanned.params, scanned.encode(PAIRS), n=2, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


CONTEXTS = ["Be brief.", "You are a careful calculator. Show no work.", "Answer with a number."]
TASKS = ["What is 2+3?", "7*6?", "Tom has 3 apples and buys 4 more. How many?", "9-4?"]


def _teacher_forced_logprobs(model, prompts, out, temperature):
    rows = np.repeat(prompts.tokens, out.n, axis=0)
    tokens = np.concatenate([rows, out.tokens], 1)
    mask = np.concatenate([np.repeat(prompts.mask, out.n, axis=0), out.mask], 1)
    logits = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    lp = jax.nn.log_softmax(logits / temperature, axis=-1)
    Lp = rows.shape[1]
    return np.take_along_axis(np.asarray(lp[:, Lp - 1:-1]), out.tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("layout", ["problem_major", "unbalanced"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_two_level_sharing_equals_unshared_sampling(model, tok, layout, temperature):
    if layout == "problem_major":  # an FST group: every problem under each of 3 contexts
        pairs = [(c, t) for t in TASKS for c in CONTEXTS]
    else:  # contexts shared by 1, 2 and 4 prompts, interleaved
        pairs = [(CONTEXTS[i], TASKS[j % 4]) for j, i in enumerate([2, 0, 2, 1, 2, 1, 2])]
    sampler = make_sampler(model, tok)
    shared = sampler.encode(pairs)
    plan = share_plan(shared, sampler.config.prompt_buckets, tok.pad_id)
    assert len({tuple(r[m]) for r, m in zip(plan.ctx_tokens, plan.ctx_mask)}) == len(
        {c for c, _ in pairs})  # each context's tokens are prefilled in exactly one slot
    # context_lengths 0: every prompt is its own task, no context keys/values are shared.
    unshared = PromptBatch(shared.tokens, shared.mask, np.zeros_like(shared.context_lengths),
                           shared.lengths)
    a = sampler.generate(sampler.params, shared, n=2, seed=11, temperature=temperature)
    b = sampler.generate(sampler.params, unshared, n=2, seed=11, temperature=temperature)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    if temperature > 0:
        ref = _teacher_forced_logprobs(model, shared, a, temperature)
        np.testing.assert_allclose(np.where(a.mask, a.logprobs, 0), np.where(a.mask, ref, 0),
                                   atol=2e-5)


def test_share_plan_groups_prompts_by_context_in_power_of_two_slots(tok):
    sampler_cfg = SamplingConfig(prompt_buckets=(64, 128))
    pairs = [(CONTEXTS[i], TASKS[j % 4]) for j, i in enumerate([2, 0, 2, 1, 2])]
    rows = [tok.encode(c, t) for c, t in pairs]
    Lp = 128
    tokens = np.full((5, Lp), tok.pad_id, np.int32)
    mask = np.zeros((5, Lp), bool)
    for i, (c, t) in enumerate(rows):
        tokens[i, Lp - len(c + t):] = c + t
        mask[i, Lp - len(c + t):] = True
    prompts = PromptBatch(tokens, mask, np.asarray([len(c) for c, _ in rows], np.int32),
                          mask.sum(1).astype(np.int32))
    plan = share_plan(prompts, sampler_cfg.prompt_buckets, tok.pad_id)
    assert plan.ctx_tokens.shape[0] == 4 and plan.num_slots == 4 * 4  # 3 -> 4 contexts, 3 -> 4 slots
    np.testing.assert_array_equal(plan.prompt_of_slot[plan.slot_of_prompt], np.arange(5))
    for p, (c, t) in enumerate(rows):
        s = plan.slot_of_prompt[p]
        ctx = plan.ctx_tokens[s // 4][plan.ctx_mask[s // 4]]
        assert tuple(ctx) == c
        assert tuple(plan.task_tokens[s][plan.task_mask[s]]) == t
        assert plan.task_start[s] == len(c)


def test_prefill_in_query_chunks_gives_the_same_samples_with_less_attention_memory(model, tok):
    """Long prompts (the byte tokenizer: ~100-200 tokens in bucket 256) prefilled 48 queries at a
    time (256 is not a multiple: the last chunk is padded): the same tokens and log-probs as all
    at once, and a compiled prefill with less than half the temporary memory."""
    pairs = [(c * 2, q * 3) for c, q in PAIRS]
    whole = make_sampler(model, tok, prompt_buckets=(256,), prefill_query_chunk=None)
    chunked = make_sampler(model, tok, prompt_buckets=(256,), prefill_query_chunk=48)
    prompts = whole.encode(pairs)
    a = whole.generate(whole.params, prompts, n=2, seed=5)
    b = chunked.generate(chunked.params, prompts, n=2, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)

    def temp_bytes(sampler):
        plan = share_plan(prompts, sampler.config.prompt_buckets, tok.pad_id)
        args = [sampler.graphdef, sampler.params, *(jnp.asarray(x) for x in (
            plan.ctx_tokens, plan.ctx_mask, plan.task_tokens, plan.task_mask, plan.task_start))]
        compiled = sampler._prefill.lower(*args, n=2).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(chunked) < 0.5 * temp_bytes(whole)

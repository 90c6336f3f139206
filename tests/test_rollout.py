"""fst_jax/rollout.py: the group mix, per-problem advantages and the batch layout on a tiny model."""

import numpy as np
import pytest

from fst_jax.models.configs import tiny
from fst_jax.models.tokenizer import ByteChatTokenizer
from fst_jax.models.transformer import init_model
from fst_jax.rl.advantages import AdvantageConfig
from fst_jax.rollout import check_group_mix, rollout
from fst_jax.sampling import Sampler, SamplingConfig
from fst_jax.tasks import make_task
from fst_jax.tasks.rewards import FunctionScorer

REWARDS = [1, 0, 0, 0,   1, 1, 0, 1]  # problem 0: rows 0-3, problem 1: rows 4-7 (contexts 0,0,1,1)


@pytest.fixture(scope="module")
def sampler():
    model = init_model(tiny("llama", vocab_size=ByteChatTokenizer.vocab_size), seed=0)
    return Sampler(model, ByteChatTokenizer(), SamplingConfig(max_new_tokens=8, prompt_buckets=(128, 256)))


def run(sampler, group_by):
    problems = make_task("arithmetic").examples("train", 2)
    seen = []

    def score(examples, completions):
        seen.append([e.id for e in examples])
        return [(float(r), f"row {i}") for i, r in enumerate(REWARDS)]

    ro = rollout(sampler, sampler.params, problems, ["Be brief.", "Think first."], 4,
                 FunctionScorer(make_task("arithmetic"), score), seed=3,
                 advantage=AdvantageConfig(group_by=group_by, drop_zero_variance=False))
    return problems, seen, ro


def grpo(r):
    r = np.asarray(r, float)
    return (r - r.mean()) / (r.std() + 1e-6)


def test_every_problem_gets_G_over_K_rollouts_of_each_context_and_rows_are_scored_in_order(sampler):
    problems, seen, ro = run(sampler, "problem")
    assert ro.problem_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ro.context_ids.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert seen == [[problems[p].id for p in ro.problem_ids]]
    assert ro.reward_per_context() == [np.mean([1, 0, 1, 1]), np.mean([0, 0, 0, 1])]


def test_advantages_are_computed_once_per_problem_across_its_contexts(sampler):
    _, _, ro = run(sampler, "problem")
    want = np.concatenate([grpo(REWARDS[:4]), grpo(REWARDS[4:])])
    np.testing.assert_allclose(np.asarray(ro.batch.advantages), want, atol=1e-5)


def test_problem_context_grouping_gives_each_context_its_own_baseline(sampler):
    _, _, ro = run(sampler, "problem_context")
    want = np.concatenate([grpo(REWARDS[i:i + 2]) for i in range(0, 8, 2)])
    np.testing.assert_allclose(np.asarray(ro.batch.advantages), want, atol=1e-5)


def test_batch_rows_hold_the_sampled_prompt_and_completion_in_the_samplers_columns(sampler):
    _, _, ro = run(sampler, "problem")
    b = ro.batch
    prompts = sampler.encode([(c, p.prompt) for p in make_task("arithmetic").examples("train", 2)
                              for c in ["Be brief.", "Think first."]])
    P = prompts.tokens.shape[1]
    assert b.tokens.shape == (8, P + 8)  # the sampler's prompt bucket + max_new_tokens
    for r in range(8):
        np.testing.assert_array_equal(b.tokens[r, :P], prompts.tokens[r // 2])
        n = ro.lengths[r]
        assert b.loss_mask[r, P:P + n].all() and not b.loss_mask[r, P + n:].any()
        assert sampler.tokenizer.decode(b.tokens[r, P:P + n]) == ro.completions[r]


def test_k_must_divide_g():
    assert check_group_mix(8, 4) == 2
    with pytest.raises(ValueError, match="do not divide"):
        check_group_mix(6, 4)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_the_trainer_scores_a_rollout_under_the_temperature_it_was_sampled_at(sampler, temperature):
    """Sampler and trainer log-probs agree on a rollout at any temperature (the CISPO ratio is 1
    on policy); scored at temperature 1 instead, a temperature-0.5 rollout would not agree."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fst_jax.rl.batch import shard_batch
    from fst_jax.rl.train_step import LearnerConfig, init_train_state, make_train_step
    from fst_jax.sharding import MeshConfig, make_mesh

    hot = Sampler(nnx.merge(sampler.graphdef, sampler.params), ByteChatTokenizer(),
                  dataclasses.replace(sampler.config, temperature=temperature))
    problems = make_task("arithmetic").examples("train", 2)
    ro = rollout(hot, hot.params, problems, ["Be brief."], 4,
                 FunctionScorer(make_task("arithmetic"), lambda ex, c: [(0.0, "")] * len(c)), seed=1,
                 advantage=AdvantageConfig(drop_zero_variance=False))
    np.testing.assert_allclose(ro.batch.temperature[:8], temperature)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    cfg = LearnerConfig()
    fresh = lambda: nnx.merge(sampler.graphdef, jax.tree.map(jnp.copy, sampler.params))  # noqa: E731
    graphdef, state = init_train_state(fresh(), cfg, mesh)  # the step donates its state
    step = make_train_step(graphdef, state, cfg, mesh)
    _, m = step(state, shard_batch(ro.batch, mesh))
    assert float(m["logp_diff_max"]) < 1e-4
    if temperature != 1.0:
        _, state = init_train_state(fresh(), cfg, mesh)
        cold = ro.batch.replace(temperature=np.ones_like(ro.batch.temperature))
        _, m = step(state, shard_batch(cold, mesh))
        assert float(m["logp_diff_mean"]) > 0.05

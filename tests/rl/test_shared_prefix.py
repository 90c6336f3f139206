"""The shared-prefix path (each group's prompt run once) against the dense one."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from fst_jax.models import configs
from fst_jax.models.transformer import init_model
from fst_jax.rl.batch import build_train_batch, shard_batch
from fst_jax.rl.lora import LoraConfig, init_lora, lora_adapters
from fst_jax.rl.shared_prefix import PrefixLayout, choose_layout, make_prefix_layout, prompt_runs
from fst_jax.rl.train_step import (init_train_state, make_ref_logprobs, make_train_step,
                                   token_logprobs)
from fst_jax.sharding import MeshConfig, make_mesh
from rl_helpers import CFG, one_device_mesh, to_host


def rollout_batch(problems=4, contexts=2, samples=2, seed=0, vocab=128):
    """A batch laid out as a rollout lays one out: ``samples`` consecutive rows per (problem,
    context) prompt, problem-major; prompts of 3-11 tokens, completions of 1-9 tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, rng.integers(3, 12)) for _ in range(problems * contexts)]
    rows = problems * contexts * samples
    comps = [rng.integers(1, vocab, rng.integers(1, 10)) for _ in range(rows)]
    rewards = [float(rng.random() < 0.5) for _ in range(rows)]
    return build_train_batch([prompts[r // samples] for r in range(rows)], comps,
                             [-rng.random(len(c)) * 3 for c in comps], rewards,
                             [r // (contexts * samples) for r in range(rows)],
                             [(r // samples) % contexts for r in range(rows)], pad_id=0)


def layout_of(batch, micro_batches=1, devices=1):
    first, same = prompt_runs(batch.tokens, batch.positions, batch.mask, batch.completion_mask)
    return choose_layout(int(first), np.asarray(same), batch.tokens.shape[1], micro_batches,
                         devices)


def prompt_width(batch):
    return int(np.argmax(batch.completion_mask.any(0)))


def test_layout_groups_the_rows_of_each_prompt():
    batch = rollout_batch(samples=4)
    assert layout_of(batch) == PrefixLayout(prompt_width(batch), 4)


def test_rows_whose_prompts_differ_are_never_grouped():
    batch = rollout_batch(samples=4)
    tokens = batch.tokens.copy()
    tokens[2:4, prompt_width(batch) - 1] += 1  # rows 2-3 of the first prompt now differ
    assert layout_of(batch.replace(tokens=tokens)).rows == 2
    tokens[3, prompt_width(batch) - 1] += 1  # row 3 alone: no two consecutive rows share it
    assert layout_of(batch.replace(tokens=tokens)) is None
    positions = batch.positions.copy()
    positions[1] += 1
    assert layout_of(batch.replace(positions=positions)) is None


def test_layout_leaves_each_micro_batch_whole_groups_evenly_over_devices():
    batch = rollout_batch(problems=2, contexts=2, samples=4)  # 16 rows, 4 prompts of 4
    assert layout_of(batch, micro_batches=2).rows == 4
    assert layout_of(batch, micro_batches=8).rows == 2  # 4 groups cannot fill 8 micro-batches
    assert layout_of(batch, micro_batches=2, devices=4).rows == 2  # 8 groups: 4 per micro-batch
    assert layout_of(batch, micro_batches=16) is None


def test_batch_without_completions_or_shared_prompts_runs_dense():
    batch = rollout_batch()
    assert layout_of(batch.replace(completion_mask=np.zeros_like(batch.completion_mask))) is None
    distinct = rollout_batch(samples=1)
    assert layout_of(distinct) is None


def test_layout_is_found_on_a_mesh_from_a_sharded_batch():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    batch = rollout_batch(problems=4, contexts=4, samples=2)  # 32 rows
    assert make_prefix_layout(mesh, 2)(shard_batch(batch, mesh)) == PrefixLayout(
        prompt_width(batch), 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_shared_prefix_logprobs_and_entropies_equal_dense(family):
    """With LoRA adapters, per-row temperatures and chunked logits, over completion columns."""
    model = init_model(configs.tiny(family), seed=1)
    lora_cfg = LoraConfig(rank=4)
    lora = init_lora(nnx.state(model), lora_cfg, seed=2)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # b != 0: the adapters change the output
    batch = rollout_batch(samples=2, seed=3)
    batch = batch.replace(temperature=np.linspace(0.6, 1.2, len(batch.tokens), dtype=np.float32))
    layout = layout_of(batch)

    @jax.jit
    def both(tokens, positions, mask, temperature):
        kw = dict(with_entropy=True, adapters=lora_adapters(lora, lora_cfg), chunk=8,
                  temperature=temperature)
        return (token_logprobs(model, tokens, positions, mask, **kw),
                token_logprobs(model, tokens, positions, mask, prefix=layout, **kw))

    (logp, ent), (logp_s, ent_s) = both(batch.tokens, batch.positions, batch.mask, batch.temperature)
    done = batch.completion_mask
    np.testing.assert_allclose(np.asarray(logp_s)[done], np.asarray(logp)[done], atol=2e-6)
    np.testing.assert_allclose(np.asarray(ent_s)[done], np.asarray(ent)[done], atol=2e-6)
    assert not np.asarray(logp_s)[:, :layout.prompt_len].any()


def _state(cfg, model_cfg, mesh):
    g, state = init_train_state(init_model(model_cfg), cfg, mesh)
    # the policy moved off the reference, so the KL term and its gradient are not zero
    return g, state.replace(params=jax.tree.map(lambda x: x * 1.05, state.params),
                            lora=jax.tree.map(lambda x: x + 0.01, state.lora))


@pytest.mark.parametrize("lora,remat,micro_batches,fsdp,check", [
    (False, False, 2, True, True), (True, True, 2, False, False), (True, False, 1, True, False)])
def test_shared_prefix_train_step_equals_dense(lora, remat, micro_batches, fsdp, check):
    """Loss, KL, every metric and the updated weights (which, with this optimizer, are the
    gradients) match; the run's first-step check (``check``) reports the difference."""
    cfg = dataclasses.replace(CFG, micro_batches=micro_batches,
                              lora=LoraConfig(rank=4 if lora else 0))
    mesh = make_mesh(MeshConfig(data=1, fsdp=8)) if fsdp else one_device_mesh()
    batch = shard_batch(rollout_batch(problems=4, contexts=4, samples=2), mesh)  # 16 prompts x 2
    out = []
    for shared in (False, True):
        c = dataclasses.replace(cfg, shared_prefix=shared)
        g, state = _state(c, configs.tiny("llama", remat=remat), mesh)
        state, m = make_train_step(g, state, c, mesh)(state, batch, check_shared_prefix=check)
        out.append((to_host((state.params, state.lora)), {k: float(v) for k, v in m.items()}))
    (w_dense, m_dense), (w_shared, m_shared) = out
    if check:
        assert m_shared.pop("shared_prefix_logp_diff") < 2e-6
        assert m_shared.pop("shared_prefix_loss_diff") < 1e-6
    assert m_shared.keys() == m_dense.keys()  # the dense run had nothing to check
    for key, value in m_dense.items():
        np.testing.assert_allclose(m_shared[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert m_shared["kl"] > 1e-4 and m_shared["applied"] == 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), w_shared, w_dense)


def test_shared_prefix_reference_logprobs_equal_dense():
    cfg = dataclasses.replace(CFG, micro_batches=2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    host = rollout_batch(problems=4, contexts=4, samples=2)
    batch = shard_batch(host, mesh)
    ref = []
    for shared in (False, True):
        c = dataclasses.replace(cfg, shared_prefix=shared)
        g, state = _state(c, configs.tiny("qwen3"), mesh)
        ref.append(np.asarray(make_ref_logprobs(g, state, c, mesh)(state, batch)))
    done = host.completion_mask
    np.testing.assert_allclose(ref[1][done], ref[0][done], atol=2e-6)

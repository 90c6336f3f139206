import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from fst_jax.rl.advantages import AdvantageConfig
from fst_jax.rl.batch import shard_batch
from fst_jax.rl.kl import KL_ESTIMATORS
from fst_jax.rl.losses import POLICY_LOSSES, LossConfig, register_loss
from fst_jax.rl.train_step import make_ref_logprobs, make_train_step, token_logprobs
from fst_jax.sharding import MeshConfig, make_mesh
from rl_helpers import CFG, host_batch, new_state, on_policy, one_device_mesh, to_host


@pytest.fixture(scope="module")
def single():
    """(mesh, graphdef, train_step, ref_logprobs) on one device, one micro-batch."""
    mesh = one_device_mesh()
    g, state = new_state(CFG, mesh)
    return mesh, g, make_train_step(g, state, CFG, mesh), make_ref_logprobs(g, state, CFG, mesh)


def _one_step(cfg, mesh, step=None):
    g, state = new_state(cfg, mesh)
    step = step or make_train_step(g, state, cfg, mesh)
    batch = shard_batch(host_batch(), mesh)
    state, metrics = step(state, batch)
    return to_host(state.params), {k: float(v) for k, v in metrics.items()}


def _assert_same(a, b, tol):
    (pa, ma), (pb, mb) = a, b
    for key in ("loss", "loss_policy", "loss_kl", "grad_norm", "entropy", "logp_pearson"):
        np.testing.assert_allclose(ma[key], mb[key], rtol=tol, atol=tol, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol), pa, pb)


@pytest.fixture(scope="module")
def reference_step(single):
    mesh, _, step, _ = single
    return _one_step(CFG, mesh, step)


def test_micro_batch_accumulation_equals_one_large_step(reference_step):
    accumulated = _one_step(dataclasses.replace(CFG, micro_batches=4), one_device_mesh())
    _assert_same(accumulated, reference_step, 1e-6)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_mesh_matches_single_device(shape, reference_step):
    mesh = make_mesh(MeshConfig(*shape))
    _assert_same(_one_step(CFG, mesh), reference_step, 2e-6)


def test_non_finite_step_is_skipped_and_leaves_state_unchanged(single):
    mesh, g, step, _ = single
    _, state = new_state(CFG, mesh)
    before = to_host((state.params, state.opt_state))
    batch = host_batch()
    t = np.argmax(batch.loss_mask[0])
    bad = batch.replace(sampler_logp=batch.sampler_logp.copy())
    bad.sampler_logp[0, t] = np.nan
    state, metrics = step(state, shard_batch(bad, mesh))
    assert float(metrics["applied"]) == 0 and int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, to_host((state.params, state.opt_state)), before)
    state, metrics = step(state, shard_batch(batch, mesh))
    assert float(metrics["applied"]) == 1 and int(state.skipped) == 1 and int(state.step) == 2
    assert float(metrics["lr"]) == pytest.approx(CFG.optimizer.lr)


def test_on_policy_batch_has_no_mismatch_no_clipping_and_zero_kl_with_an_unfilled_reference(single):
    mesh, g, step, ref_fn = single
    _, state = new_state(CFG, mesh)
    state, m = step(state, on_policy(host_batch(), ref_fn, state, mesh))
    assert float(m["logp_diff_max"]) < 1e-5 and float(m["logp_pearson"]) > 0.99999
    assert float(m["clip_high"]) == 0 and float(m["clip_low"]) == 0
    assert abs(float(m["kl"])) < 1e-6 and abs(float(m["loss_kl"])) < 1e-8
    assert float(m["tokens"]) == host_batch().loss_mask.sum()
    assert 0 < float(m["entropy"]) <= np.log(128) + 1e-4


def test_training_raises_logprob_of_positive_advantage_completions(single):
    mesh, g, step, ref_fn = single
    _, state = new_state(CFG, mesh)
    host = host_batch()
    batch = on_policy(host, ref_fn, state, mesh)
    start = np.asarray(batch.sampler_logp)
    for _ in range(4):
        state, m = step(state, batch)
    # the reference copy stays the base model while the policy moves
    np.testing.assert_allclose(ref_fn(state, batch), start, atol=1e-6)
    model = nnx.merge(g, state.weights())
    trained = np.asarray(token_logprobs(model, batch.tokens, batch.positions, batch.mask)[0])
    per_row = np.where(host.loss_mask, trained - start, 0).sum(1) / np.maximum(host.loss_mask.sum(1), 1)
    pos, neg = host.advantages > 0, host.advantages < 0
    assert per_row[pos].min() > 0 and per_row[neg].max() < 0
    assert float(m["kl"]) > 0



def test_dr_grpo_loss_and_gradient_do_not_depend_on_the_prompt_bucket():
    """Dr. GRPO divides by the generation budget: the same completions give the same loss and
    gradient whether their prompts are padded to a small or a large prompt bucket."""
    cfg = dataclasses.replace(CFG, loss=LossConfig(name="dr_grpo"))
    mesh = one_device_mesh()
    out = []
    for prompt_bucket in (16, 64):
        g, state = new_state(cfg, mesh)
        batch = host_batch(prompt_buckets=(prompt_bucket,), completion_buckets=(16,))
        state, m = make_train_step(g, state, cfg, mesh)(state, shard_batch(batch, mesh))
        out.append((to_host(state.params), {k: float(v) for k, v in m.items()}))
    (_, small), (_, large) = out
    assert large["loss"] / small["loss"] == pytest.approx(1.0, rel=1e-5)
    _assert_same(out[1], out[0], 1e-5)


def test_logged_kl_covers_the_completions_of_dropped_groups_at_their_sampling_temperature(single):
    """Every group has zero reward variance (all dropped, nothing to train on): the step still
    logs the KL of all its completions to the reference, under logits / the rows' temperature."""
    mesh, g, step, ref_fn = single
    _, state = new_state(CFG, mesh)
    state, _ = step(state, shard_batch(host_batch(), mesh))  # the policy leaves the reference
    dropped = host_batch(rewards=[1.0] * 8, temperature=0.5)
    completions = host_batch(advantage=AdvantageConfig(drop_zero_variance=False)).loss_mask
    assert not dropped.loss_mask.any() and completions.any()
    batch = shard_batch(dropped, mesh)
    model = nnx.merge(g, state.weights())
    logp = token_logprobs(model, batch.tokens, batch.positions, batch.mask, temperature=batch.temperature)[0]
    kl_tok = np.asarray(KL_ESTIMATORS[CFG.kl.estimator](logp, ref_fn(state, batch)))
    expected = kl_tok[completions].mean()
    _, m = step(state, batch)
    assert float(m["applied"]) == 0 and expected > 1e-4
    assert float(m["kl"]) == pytest.approx(expected, rel=1e-4)


@pytest.fixture
def negative_entropy():
    """A loss registered from this file: ``-entropy`` per token, token mean."""
    register_loss("test_negative_entropy", "token")(lambda inp, cfg: (-inp.entropy, {}))
    yield LossConfig(name="test_negative_entropy")
    del POLICY_LOSSES["test_negative_entropy"]


def test_a_registered_loss_gets_the_trainers_entropy_in_the_update_and_the_metrics(negative_entropy):
    _, m = _one_step(dataclasses.replace(CFG, loss=negative_entropy), one_device_mesh())
    assert m["entropy"] > 0
    assert m["loss_policy"] == pytest.approx(-m["entropy"], rel=1e-6)
    assert m["loss"] == pytest.approx(m["loss_policy"] + m["loss_kl"], rel=1e-6)

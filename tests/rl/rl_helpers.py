"""Shared tiny-model fixtures for the learner tests."""

import jax
import numpy as np

from fst_jax.models import configs
from fst_jax.models.transformer import init_model
from fst_jax.rl.batch import build_train_batch, shard_batch
from fst_jax.rl.kl import KLConfig
from fst_jax.rl.optimizer import OptimizerConfig
from fst_jax.rl.train_step import LearnerConfig, init_train_state
from fst_jax.sharding import MeshConfig, make_mesh

MODEL = configs.tiny("llama")
# eps=1 makes Adam's first update about lr * g for these small gradients, so comparing weights
# after one step compares gradients (with eps=1e-8 the update is lr * sign(g) for any g).
CFG = LearnerConfig(optimizer=OptimizerConfig(lr=0.5, warmup_steps=0, eps=1.0),
                    kl=KLConfig(beta=0.01))


def one_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def host_batch(seed=0, rows=8, rewards=None, **layout):
    """8 rows, 4 problems (interleaved), 2 contexts; the default rewards give problems 0 and 1
    reward variance (2 and 3 are dropped by default).
    ``layout``: further ``build_train_batch`` keywords (buckets, ``num_rows``, ...)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, MODEL.vocab_size, rng.integers(3, 12)) for _ in range(rows)]
    comps = [rng.integers(1, MODEL.vocab_size, rng.integers(2, 14)) for _ in range(rows)]
    logps = [-rng.random(len(c)) * 3 for c in comps]
    if rewards is None:
        rewards = [float(i % 3 == 0) if i < 4 else float(i % 2) for i in range(rows)]
    groups = [i % 4 for i in range(rows)]
    return build_train_batch(prompts, comps, logps, rewards, groups, [i % 2 for i in range(rows)],
                             pad_id=0, **layout)


def new_state(cfg, mesh, seed=0):
    return init_train_state(init_model(MODEL, seed), cfg, mesh, seed)


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


def on_policy(batch, ref_fn, state, mesh):
    """The batch with sampler log-probs set to the current policy's (``ref_logp`` is left
    unfilled: train_step computes it)."""
    b = shard_batch(batch, mesh)
    return b.replace(sampler_logp=ref_fn(state, b))

"""Rows with different contexts (other prompt tokens and lengths inside the same length buckets)
reuse one compiled train_step; only a new bucket compiles again."""

import logging

import jax
import numpy as np
import pytest

import fst_jax.rl.train_step as train_step_module
from fst_jax.rl.batch import build_train_batch, shard_batch
from fst_jax.rl.train_step import make_train_step
from rl_helpers import CFG, MODEL, new_state, one_device_mesh

PROMPT_BUCKETS, COMPLETION_BUCKETS = (32, 64), (16, 32)


def batch_with_contexts(contexts, seed):
    """8 rows, 4 problems x 2 contexts: prompt = context tokens + task tokens."""
    rng = np.random.default_rng(seed)
    tasks = [rng.integers(1, MODEL.vocab_size, rng.integers(2, 6)) for _ in range(4)]
    prompts = [np.concatenate([contexts[i % 2], tasks[i // 2]]) for i in range(8)]
    comps = [rng.integers(1, MODEL.vocab_size, rng.integers(2, 15)) for _ in range(8)]
    logps = [-rng.random(len(c)) * 3 for c in comps]
    return build_train_batch(prompts, comps, logps, [float(i % 3 == 0) for i in range(8)],
                             [i // 2 for i in range(8)], [seed * 2 + i % 2 for i in range(8)],
                             pad_id=0, prompt_buckets=PROMPT_BUCKETS,
                             completion_buckets=COMPLETION_BUCKETS)


def context(length, seed):
    return np.random.default_rng(100 + seed).integers(1, MODEL.vocab_size, length)


@pytest.fixture
def counted(monkeypatch, caplog):
    """(traces, compiles): how often train_step's step function was traced (its body calls
    ``policy_loss`` once per trace) and compiled by XLA (jax's compile log)."""
    traces = []
    real = train_step_module.policy_loss

    def counting_policy_loss(*args, **kwargs):
        traces.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step_module, "policy_loss", counting_policy_loss)

    def compiles():
        return sum("Compiling jit(step_fn)" in r.getMessage() for r in caplog.records)

    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        yield lambda: len(traces), compiles


def test_batches_with_other_contexts_in_the_same_buckets_reuse_one_compilation(counted):
    traces, compiles = counted
    mesh = one_device_mesh()
    g, state = new_state(CFG, mesh)
    step = make_train_step(g, state, CFG, mesh)
    batches = [batch_with_contexts([context(4, 0), context(9, 1)], seed=0),
               batch_with_contexts([context(20, 2), context(1, 3)], seed=1),
               batch_with_contexts([context(12, 4), context(25, 5)], seed=2)]
    # the rows really differ: other prompt contents, prompt lengths and context ids ...
    lengths = [sorted(set(b.mask[:, :32].sum(1))) for b in batches]
    assert lengths[0] != lengths[1] != lengths[2]
    assert len({tuple(b.context_ids) for b in batches}) == 3
    # ... but the buckets give them one shape
    assert {b.tokens.shape for b in batches} == {(8, 32 + 16)}

    losses = []
    for b in batches:
        state, m = step(state, shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    assert len(set(losses)) == 3 and all(np.isfinite(losses))
    assert (traces(), compiles()) == (1, 1)

    # A prompt past the first bucket is a new shape: the counters see the second compilation.
    longer = batch_with_contexts([context(40, 6), context(3, 7)], seed=3)
    assert longer.tokens.shape == (8, 64 + 16)
    state, _ = step(state, shard_batch(longer, mesh))
    assert (traces(), compiles()) == (2, 2)

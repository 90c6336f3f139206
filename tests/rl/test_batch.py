import numpy as np
import pytest

from fst_jax.rl.advantages import AdvantageConfig
from fst_jax.padding import bucket
from fst_jax.rl.batch import build_train_batch

PROMPTS = [[5, 6, 7], [8, 9], [5, 6, 7, 10, 11]]
COMPLETIONS = [[20, 21], [22, 23, 24], [25]]
LOGPS = [[-0.1, -0.2], [-0.3, -0.4, -0.5], [-0.6]]


def _build(**kw):
    args = dict(pad_id=0, advantage=AdvantageConfig(drop_zero_variance=False))
    args.update(kw)
    return build_train_batch(PROMPTS, COMPLETIONS, LOGPS, [1.0, 0.0, 0.5], ["a", "b", "a"],
                             [0, 1, 1], **args)


def test_rows_are_left_padded_prompt_then_right_padded_completion():
    b = _build()
    assert b.tokens.shape == (3, 32)  # prompt bucket 16 + completion bucket 16
    np.testing.assert_array_equal(b.tokens[1, 14:19], [8, 9, 22, 23, 24])
    assert not b.mask[1, :14].any() and b.mask[1, 14:19].all() and not b.mask[1, 19:].any()
    np.testing.assert_array_equal(np.where(b.loss_mask[1])[0], [16, 17, 18])
    np.testing.assert_allclose(b.sampler_logp[1, 16:19], [-0.3, -0.4, -0.5])
    assert b.sampler_logp[1][~b.loss_mask[1]].sum() == 0
    np.testing.assert_array_equal(b.positions[1, 14:19], [0, 1, 2, 3, 4])


def test_group_keys_are_renumbered_and_advantages_are_per_group():
    b = _build()
    np.testing.assert_array_equal(b.group_ids, [0, 1, 0])
    np.testing.assert_allclose(b.advantages, [1.0, 0.0, -1.0], atol=1e-4)
    np.testing.assert_array_equal(b.context_ids, [0, 1, 1])


def test_padding_rows_and_buckets_give_static_shapes():
    b = _build(num_rows=8, prompt_buckets=(8, 64), completion_buckets=(4, 8))
    assert b.tokens.shape == (8, 12)
    assert not b.mask[3:].any() and not b.loss_mask[3:].any()
    assert b.group_ids.max() < 8 and np.all(b.advantages[3:] == 0)


def test_dropped_groups_have_no_loss_tokens():
    b = _build(advantage=AdvantageConfig())  # group "b" has a single row: zero variance
    assert not b.loss_mask[1].any() and b.loss_mask[0].any() and b.loss_mask[2].any()


def test_bucket_rounds_up_and_rejects_too_long():
    assert bucket(17) == 32 and bucket(3) == 16 and bucket(5, (4, 8)) == 8
    with pytest.raises(ValueError):
        bucket(9, (4, 8))


def test_mismatched_logprobs_are_rejected():
    with pytest.raises(ValueError, match="token for token"):
        build_train_batch(PROMPTS, COMPLETIONS, [[-0.1]] * 3, [0, 1, 0], [0, 0, 0], [0, 0, 0],
                          pad_id=0)


def test_completion_budget_is_the_completion_width_or_the_given_budget_never_below_a_completion():
    np.testing.assert_array_equal(_build(num_rows=4, completion_buckets=(4, 8)).completion_budget, [4] * 4)
    np.testing.assert_array_equal(_build(completion_budget=96).completion_budget, [96] * 3)
    with pytest.raises(ValueError, match="completion_budget 2"):
        _build(completion_budget=2)  # the second completion has 3 tokens

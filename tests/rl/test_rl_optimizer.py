import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.rl.optimizer import OptimizerConfig, learning_rate


def test_warmup_is_linear_then_constant():
    lr = learning_rate(OptimizerConfig(lr=1.0, warmup_steps=4))
    np.testing.assert_allclose([lr(s) for s in range(6)], [0.25, 0.5, 0.75, 1, 1, 1])


def test_cosine_decays_to_final_ratio():
    lr = learning_rate(OptimizerConfig(lr=1.0, warmup_steps=2, schedule="cosine", total_steps=12,
                                       final_lr_ratio=0.1))
    np.testing.assert_allclose([lr(1), lr(7), lr(12), lr(50)], [1.0, 0.55, 0.1, 0.1], atol=1e-6)


def test_cosine_needs_a_horizon():
    with pytest.raises(ConfigError, match="total_steps"):
        OptimizerConfig(schedule="cosine")

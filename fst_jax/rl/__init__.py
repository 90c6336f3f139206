"""Slow-weights RL learner: batches, advantages, policy losses, KL to the base, the train step."""

from fst_jax.rl.advantages import ADVANTAGES, AdvantageConfig, compute_advantages, register_advantage
from fst_jax.rl.batch import TrainBatch, build_train_batch, shard_batch
from fst_jax.rl.kl import KL_ESTIMATORS, KLConfig, register_kl
from fst_jax.rl.lora import LoraConfig, apply_lora, init_lora
from fst_jax.rl.losses import (AGGREGATIONS, POLICY_LOSSES, LossConfig, LossInput,
                               aggregation_weights, loss_input, policy_loss, register_aggregation,
                               register_loss)
from fst_jax.rl.optimizer import OptimizerConfig, learning_rate, make_optimizer
from fst_jax.rl.train_step import (LearnerConfig, TrainState, init_train_state, make_ref_logprobs,
                                   make_train_step, token_logprobs)

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "AdvantageConfig", "KLConfig", "KL_ESTIMATORS", "LearnerConfig",
    "LoraConfig", "LossConfig", "LossInput", "OptimizerConfig", "POLICY_LOSSES", "TrainBatch",
    "TrainState", "aggregation_weights", "apply_lora", "build_train_batch", "compute_advantages",
    "init_lora", "init_train_state", "learning_rate", "loss_input", "make_optimizer",
    "make_ref_logprobs", "make_train_step", "policy_loss", "register_advantage",
    "register_aggregation", "register_kl", "register_loss", "shard_batch", "token_logprobs",
]

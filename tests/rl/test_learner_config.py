import pytest

from fst_jax.config import ConfigError, load_config
from fst_jax.rl.train_step import LearnerConfig


def test_learner_config_loads_from_dotted_overrides():
    cfg = load_config(LearnerConfig, None, [
        "loss.name=dapo", "loss.epsilon_high=0.3", "advantage.name=rloo", "kl.estimator=k2",
        "kl.beta=0", "optimizer.schedule=cosine", "optimizer.total_steps=100",
        "lora.rank=8", "lora.targets=[wq, wv]", "micro_batches=4"])
    assert cfg.loss.aggregation_name == "token" and cfg.lora.targets == ("wq", "wv")
    assert cfg.optimizer.total_steps == 100 and cfg.micro_batches == 4


@pytest.mark.parametrize("override,match", [
    ("loss.name=ppo9", "policy loss"), ("advantage.name=mean", "advantage estimator"),
    ("kl.estimator=k5", "KL estimator"), ("trainable=(", "regex"), ("micro_batches=0", "micro"),
    ("shared_prefix=sometimes", "shared_prefix: expected true/false"),
])
def test_learner_config_rejects_unknown_names_and_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(LearnerConfig, None, [override])

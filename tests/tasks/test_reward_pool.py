"""RewardPool: serial and process-pool scoring; a hanging or crashing reward costs only its call."""

import os
import time

import pytest

from fst_jax.config import ConfigError
from fst_jax.fast.evaluator import SamplerEvaluator, ScoringConfig
from fst_jax.tasks import Example, make_task
from fst_jax.tasks.rewards import RewardConfig, RewardPool


class MoodyTask:
    """Reward by completion text: 'hang' sleeps for an hour, 'die' kills its process, 'raise'
    raises, 'nan' returns NaN, anything else scores 1."""

    name, seed_context, original_prompt = "moody", "", ""

    def examples(self, split, n, seed=0):
        return [Example(f"m{i}", f"p{i}", "a") for i in range(n)]

    def reward(self, example, completion):
        if completion == "hang":
            time.sleep(3600)
        if completion == "die":
            os._exit(7)
        if completion == "raise":
            raise RuntimeError("boom")
        if completion == "nan":
            return float("nan"), "x"
        return 1.0, f"ok {example.id}"


def test_pool_with_a_hanging_call_finishes_the_rest_of_the_batch():
    task = MoodyTask()
    texts = ["a", "hang", "die", "raise", "nan", "b", "c", "hang"]
    with RewardPool(task, RewardConfig(workers=2, timeout_s=1.0)) as pool:
        out = pool.score(task.examples("train", 8), texts)
        assert [s for s, _ in out] == [1.0, 0, 0, 0, 0, 1.0, 1.0, 0]
        assert "timed out after 1 s" in out[1][1] and "timed out" in out[7][1]
        assert "crashed (exit code 7)" in out[2][1]
        assert "RuntimeError: boom" in out[3][1] and "invalid score nan" in out[4][1]
        assert out[6] == (1.0, "ok m6")
        again = pool.score(task.examples("train", 3), ["x", "y", "z"])  # replaced workers serve on
        assert [s for s, _ in again] == [1.0, 1.0, 1.0]


def test_serial_pool_scores_in_process_like_safe_reward():
    task = MoodyTask()
    pool = RewardPool(task, RewardConfig(workers=0))
    out = pool.score(task.examples("train", 3), ["a", "raise", "nan"])
    assert [s for s, _ in out] == [1.0, 0.0, 0.0] and "boom" in out[1][1]
    pool.close()


def test_pool_scores_a_real_task_like_in_process_scoring():
    task = make_task("codeio")
    examples = task.examples("train", 6)
    texts = [f"<answer>{e.answer}</answer>" if i % 2 else "<answer>0</answer>" for i, e in enumerate(examples)]
    with RewardPool(task, RewardConfig(workers=2)) as pool:
        assert pool.score(examples, texts) == RewardPool(task).score(examples, texts)


def test_bad_config_and_mismatched_batches_raise():
    with pytest.raises(ConfigError):
        RewardConfig(workers=-1)
    with pytest.raises(ConfigError):
        RewardConfig(timeout_s=0)
    with pytest.raises(ValueError, match="2 examples but 1 completions"):
        RewardPool(MoodyTask()).score(MoodyTask().examples("train", 2), ["a"])


def test_unpicklable_task_is_rejected_when_the_pool_is_built():
    task = MoodyTask()
    task.hook = lambda: None
    with pytest.raises(TypeError, match="cannot be pickled"):
        RewardPool(task, RewardConfig(workers=1))


class _CountingScorer(RewardPool):
    def __init__(self, task):
        super().__init__(task)
        self.calls = []

    def score(self, examples, completions):
        self.calls.append(len(completions))
        return super().score(examples, completions)


class _EchoGenerator:
    def generate_text(self, params, pairs, n=1, seed=0, **kw):
        return [[f"#### {len(ctx)}"] * n for ctx, _ in pairs]


def test_evaluator_scores_each_batch_with_one_scorer_call():
    task = make_task("arithmetic")
    scorer = _CountingScorer(task)
    ev = SamplerEvaluator(_EchoGenerator(), task, ScoringConfig(samples_per_example=2), scorer=scorer)
    ev.evaluate_many(task.examples("train", 3), [{"c": "one"}, {"c": "three"}])
    assert scorer.calls == [2 * 3 * 2]
    with pytest.raises(ValueError, match="scorer is for task"):
        SamplerEvaluator(_EchoGenerator(), task, scorer=RewardPool(MoodyTask()))

"""The sampler-backed evaluator: one generator call per batch of pairs, cache by policy step,
metric-call accounting, averaged samples, and rewards that raise."""

from fst_jax.fast import SamplerEvaluator, ScoringConfig
from fst_jax.tasks import make_task

from fast_fakes import FakeGenerator

TASK = make_task("arithmetic")
EXAMPLES = TASK.examples("train", 4, seed=1)


def test_many_candidates_are_scored_with_one_generate_call_and_counted():
    gen = FakeGenerator(EXAMPLES)
    ev = SamplerEvaluator(gen, TASK)
    results = ev.evaluate_many(EXAMPLES[:3], [{"context": "Answer with ####."}, {"context": "plain"}])
    assert len(gen.calls) == 1 and len(gen.calls[0]["pairs"]) == 6
    assert results[0].scores == [1.0, 1.0, 1.0] and [r.metric_calls for r in results] == [3, 3]
    assert gen.calls[0]["pairs"][0] == ("Answer with ####.", EXAMPLES[0].prompt)
    expected = [1.0 if int(e.answer) % 3 == 0 else 0.0 for e in EXAMPLES[:3]]
    assert results[1].scores == expected


def test_cache_hits_cost_no_calls_and_a_new_policy_step_misses():
    gen = FakeGenerator(EXAMPLES)
    ev = SamplerEvaluator(gen, TASK, params="p0", policy_step=0)
    ev.evaluate(EXAMPLES[:2], {"context": "plain"})
    again = ev.evaluate(EXAMPLES[:3], {"context": "plain"})
    assert again.metric_calls == 1 and len(gen.calls[-1]["pairs"]) == 1  # only the new example
    assert ev.evaluate(EXAMPLES[:3], {"context": "plain"}).metric_calls == 0 and len(gen.calls) == 2
    ev.set_policy("broken", 1)
    moved = ev.evaluate(EXAMPLES[:3], {"context": "plain"})
    assert moved.metric_calls == 3 and moved.scores == [0.0, 0.0, 0.0]
    assert all(k.startswith("1|") for k in ev.cache)


def test_duplicate_candidates_share_rollouts_and_are_charged_once():
    gen = FakeGenerator(EXAMPLES)
    results = SamplerEvaluator(gen, TASK).evaluate_many(EXAMPLES, [{"context": "a"}, {"context": "a"}])
    assert len(gen.calls[0]["pairs"]) == 4 and sum(r.metric_calls for r in results) == 4


class AlternatingGenerator(FakeGenerator):
    def reply(self, params, context, prompt, sample):
        return f"#### {self.answers[prompt] + sample % 2}"  # right, wrong, right, ...


def test_several_samples_per_example_are_averaged_and_each_counts():
    gen = AlternatingGenerator(EXAMPLES)
    ev = SamplerEvaluator(gen, TASK, ScoringConfig(samples_per_example=4, temperature=0.7, seed=3))
    result = ev.evaluate(EXAMPLES[:2], {"context": "x"})
    assert result.scores == [0.5, 0.5] and result.metric_calls == 8
    assert result.outputs[0] == [f"#### {int(EXAMPLES[0].answer) + j % 2}" for j in range(4)]
    assert gen.calls[0]["n"] == 4
    data = ev.make_reflective_dataset({"context": "x"}, result, ["context"])
    assert len(data["context"]) == 8 and data["context"][0]["Inputs"] == EXAMPLES[0].prompt
    assert set(data["context"][0]) == {"Inputs", "Generated Outputs", "Feedback"}


def test_generator_seeds_differ_per_call_and_policy_step():
    gen = FakeGenerator(EXAMPLES)
    ev = SamplerEvaluator(gen, TASK)
    ev.evaluate(EXAMPLES, {"context": "a"})
    ev.evaluate(EXAMPLES, {"context": "b"})
    ev.set_policy(None, 5)
    ev.evaluate(EXAMPLES, {"context": "a"})
    assert len({c["seed"] for c in gen.calls}) == 3


class RaisingTask:
    name = "raising"

    def reward(self, example, completion):
        raise ValueError("bad parse")


def test_reward_that_raises_scores_zero_with_feedback_and_does_not_crash():
    ev = SamplerEvaluator(FakeGenerator(EXAMPLES), RaisingTask())
    result = ev.evaluate(EXAMPLES[:2], {"context": "x"})
    assert result.scores == [0.0, 0.0]
    assert "ValueError: bad parse" in result.traces[0].feedbacks[0]

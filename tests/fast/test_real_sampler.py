"""A GEPA round on the real jitted Sampler with a tiny random model: the text is garbage, so
this checks determinism, one generator call per evaluation batch, metric-call accounting, the
context-length guard from the tokenizer, and the policy reflecting through the same sampler."""

import pytest

from fst_jax.fast import GEPAConfig, ReflectionConfig, ScoringConfig, run_gepa_round
from fst_jax.tasks import make_task

from fst_jax import sampling  # noqa: E402
from fst_jax.models.configs import tiny  # noqa: E402
from fst_jax.models.tokenizer import ByteChatTokenizer  # noqa: E402
from fst_jax.models.transformer import init_model  # noqa: E402

TASK = make_task("arithmetic")
ANCHOR = TASK.examples("train", 4, seed=0)
TEMPLATE = "Improve this prompt:\n{current_text}\n\n{examples}\nAnswer between ``` fences."


class CountingSampler:
    """Wraps the real sampler to log every generate_text call."""

    def __init__(self, sampler):
        self.sampler, self.tokenizer, self.calls = sampler, sampler.tokenizer, []

    def generate_text(self, params, pairs, **kw):
        self.calls.append(len(pairs) * kw.get("n", 1))
        return self.sampler.generate_text(params, pairs, **kw)


@pytest.fixture(scope="module")
def sampler():
    tok = ByteChatTokenizer(max_context_tokens=40)
    model = init_model(tiny("llama", vocab_size=ByteChatTokenizer.vocab_size), seed=0)
    cfg = sampling.SamplingConfig(max_new_tokens=8, prompt_buckets=(256, 2048), max_context_tokens=40,
                                  max_prompts_per_batch=2)
    return sampling.Sampler(model, tok, cfg)


def round_once(sampler, backend):
    gen = CountingSampler(sampler)
    config = GEPAConfig(max_metric_calls=None, max_proposals=2, minibatch_size=2, skip_perfect=False,
                        eval=ScoringConfig(samples_per_example=2, temperature=1.0, seed=1),
                        reflection=ReflectionConfig(backend=backend, template=TEMPLATE, max_output_chars=20,
                                                    temperature=1.0))
    fn = (lambda prompt: "```\n" + "Say the number. " * 10 + "\n```") if backend == "callable" else None
    result = run_gepa_round(gen, sampler.params, TASK, ANCHOR, [{"context": "Solve it."}], config, reflection_fn=fn)
    return gen, result


def test_real_sampler_round_is_deterministic_accounted_and_guarded(sampler):
    # One test, so that the tiny model is built and compiled once per pytest worker.
    (gen_a, a), (gen_b, b) = round_once(sampler, "policy"), round_once(sampler, "policy")
    strip = lambda r: {k: v for k, v in r.optimizer.state_dict().items() if k != "seconds"}  # noqa: E731
    assert strip(a) == strip(b) and gen_a.calls == gen_b.calls
    assert gen_a.calls[0] == len(ANCHOR) * 2  # the seed scored on the whole anchor in one call
    budget = a.budget
    assert (budget.proposals, budget.reflection_calls, budget.reflection_failures) == (2, 2, 0)
    assert budget.accepted + budget.rejected + budget.skipped == 2
    # every generated row was a scored rollout except the one-row reflection calls
    assert budget.metric_calls == sum(gen_a.calls) - budget.reflection_calls

    # An over-long proposal is cut to the tokenizer's context limit before it is scored.
    gen_c, c = round_once(sampler, "callable")
    assert c.budget.metric_calls == sum(gen_c.calls)
    assert any(rec.get("parse") == "truncated" for rec in c.optimizer.history)
    for member in c.optimizer.population.members:
        assert sampler.tokenizer.count_context_tokens(member.components["context"]) <= 40

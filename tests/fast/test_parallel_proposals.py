"""Parallel GEPA proposals (``GEPAConfig.parallel_proposals`` = P > 1) on the fake generator:
P parents drawn in proposal order, one batched reflection call, one generator call for all
children's minibatches, acceptance in proposal order, budget accounting, and resume equality;
then one round on the jitted sampler with a tiny random model (determinism, one device call
for all meta-prompts)."""

import hashlib
import random

from fst_jax.fast import (SELECTORS, EpochShuffledSampler, GEPAConfig, GEPAOptimizer, Population,
                          ReflectionConfig, SamplerEvaluator, ScoringConfig, make_reflection_lm, run_gepa_round)
from fst_jax.models.configs import tiny
from fst_jax.models.tokenizer import ByteChatTokenizer
from fst_jax.models.transformer import init_model
from fst_jax.sampling import Sampler, SamplingConfig
from fst_jax.tasks import make_task

from fast_fakes import FakeGenerator

TASK = make_task("arithmetic")
ANCHOR = TASK.examples("train", 12, seed=0)
SEEDS = [{"context": "Answer the question."}, {"context": "Think carefully."}]
REPLIES = ["```\nThink carefully.\n```", "```\nThink carefully and end with '#### <number>'.\n```",
           "```\nAnswer the question.\n```", "```\nBe brief, think carefully.\n```"]


def reflect(prompt):
    return REPLIES[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(REPLIES)]


def config(**kw):
    kw.setdefault("reflection", ReflectionConfig(backend="callable"))
    return GEPAConfig(max_metric_calls=None, skip_perfect=False, **kw)


class ReflectingGenerator(FakeGenerator):
    """The fake generator that also answers meta-prompts (the policy reflects): any prompt that
    is not an anchor problem gets ``reflection_reply``."""

    reflection_reply = "```\nEnd with #### and the number.\n```"

    def reply(self, params, context, prompt, sample):
        if prompt not in self.answers:
            return self.reflection_reply
        return super().reply(params, context, prompt, sample)


def test_parents_and_minibatches_of_a_step_are_drawn_in_proposal_order_from_the_seeded_rng():
    cfg = config(parallel_proposals=5, selector="epsilon_greedy", epsilon=0.6, seed=11)
    opt = GEPAOptimizer(cfg, SamplerEvaluator(FakeGenerator(ANCHOR), TASK),
                        make_reflection_lm(cfg.reflection, fn=reflect), ANCHOR)
    opt.start(SEEDS)
    start = Population.from_dict(opt.population.to_dict())
    records = opt.step()
    rng, sampler = random.Random(11), EpochShuffledSampler([e.id for e in ANCHOR], cfg.minibatch_size, 11)
    expected = [(SELECTORS["epsilon_greedy"](start, rng, 0.6), sampler.next_batch()) for _ in range(5)]
    assert [(r["parent"], r["batch"]) for r in records] == expected
    assert len({p for p, _ in expected}) == 2  # both seeds were drawn: the draw is not trivial
    assert [r["proposal"] for r in records] == [0, 1, 2, 3, 4] and opt.history == records


def test_policy_reflects_on_all_parents_in_one_call_and_children_are_scored_in_one_call():
    gen = ReflectingGenerator(ANCHOR)
    cfg = GEPAConfig(parallel_proposals=4, max_metric_calls=None, skip_perfect=False,
                     reflection=ReflectionConfig(backend="policy", max_tokens=64))
    evaluator = SamplerEvaluator(gen, TASK, params="P")
    opt = GEPAOptimizer(cfg, evaluator, make_reflection_lm(cfg.reflection, generator=gen,
                                                           params_fn=lambda: evaluator.params), ANCHOR)
    opt.start([SEEDS[0]])
    gen.calls.clear()
    records = opt.step()
    # two generator calls for four proposals: the parents' minibatches are cached since seeding,
    # and the accepted child's anchor rollouts since its minibatches (4 x 3 covers the anchor)
    reflection, children = gen.calls
    assert [c for c, _ in reflection["pairs"]] == [""] * 4 and len(children["pairs"]) == 12
    assert reflection["seed"] == cfg.seed * 1_000_003 % 2**31  # the first proposal's seed
    child = ReflectingGenerator.reflection_reply.strip("`\n")
    batches = [r["batch"] for r in records]
    by_prompt = {e.prompt: e.id for e in ANCHOR}
    assert [(c, by_prompt[p]) for c, p in children["pairs"]] == [(child, i) for b in batches for i in b]
    # the four proposals wrote the same child: the first is accepted, the rest are duplicates of it
    assert [r["outcome"] for r in records] == ["accepted"] + ["skipped:duplicate"] * 3
    assert opt.budget.reflection_calls == 4 and opt.budget.metric_calls == 12 + 12


def scripted(replies):
    """A reflection function answering the i-th prompt it sees with ``replies[i]``."""
    it = iter(replies)
    return lambda prompt: next(it)


def test_acceptance_runs_in_proposal_order_and_skips_a_duplicate_of_an_accepted_child():
    # seed "bad" scores 0 everywhere; "####" contexts score 1 everywhere; "bad" children score 0
    replies = ["```\n#### A\n```", "```\nbad B\n```", "```\n#### A\n```", "```\n#### C\n```"]
    cfg = config(parallel_proposals=4)
    opt = GEPAOptimizer(cfg, SamplerEvaluator(BadAwareGenerator(ANCHOR), TASK),
                        make_reflection_lm(cfg.reflection, fn=scripted(replies)), ANCHOR)
    opt.start([{"context": "bad seed"}])
    records = opt.step()
    assert [r["outcome"] for r in records] == ["accepted", "rejected", "skipped:duplicate", "accepted"]
    assert records[2]["child_scores"] == [1.0] * 3  # scored with the others, then found a duplicate
    members = opt.population.members
    assert [(m.id, m.components["context"], m.proposal) for m in members[1:]] == [(1, "#### A", 0), (2, "#### C", 3)]
    assert [r.get("child") for r in records] == [1, None, None, 2]
    assert [r["best"] for r in records] == [1.0] * 4 and opt.since_improvement == 3
    b = opt.budget
    assert (b.proposals, b.accepted, b.rejected, b.skipped, b.skip_reasons) == (4, 2, 1, 1, {"duplicate": 1})


class BadAwareGenerator(FakeGenerator):
    def reply(self, params, context, prompt, sample):
        return "no idea" if "bad" in context else super().reply(params, context, prompt, sample)


def test_parallel_round_counts_every_scored_rollout_and_every_proposal():
    gen = FakeGenerator(ANCHOR)
    result = run_gepa_round(gen, "p", TASK, ANCHOR, SEEDS, config(parallel_proposals=4, max_proposals=10),
                            reflection_fn=reflect)
    b, history = result.budget, result.optimizer.history
    assert b.metric_calls == sum(len(c["pairs"]) * c["n"] for c in gen.calls)
    assert b.proposals == 10 == len(history) == b.accepted + b.rejected + b.skipped  # steps of 4, 4, 2
    assert [r["proposal"] for r in history] == list(range(10))
    assert [r["metric_calls"] for r in history] == sorted(r["metric_calls"] for r in history)
    assert history[-1]["metric_calls"] == b.metric_calls
    assert len(gen.calls) <= 1 + 3 * 4  # seeds, then at most parents / children / anchor per step


def without_time(state):
    return {k: v for k, v in state.items() if k != "seconds"}


def test_parallel_round_resumes_to_the_identical_continuation(tmp_path):
    straight = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, SEEDS,
                              config(parallel_proposals=3, max_proposals=8, seed=1), reflection_fn=reflect)
    path = tmp_path / "state.json"
    run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, SEEDS, config(parallel_proposals=3, max_proposals=3, seed=1),
                   reflection_fn=reflect, state_path=path)
    resumed = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, SEEDS,
                             config(parallel_proposals=3, max_proposals=8, seed=1), reflection_fn=reflect, state_path=path)
    assert without_time(resumed.optimizer.state_dict()) == without_time(straight.optimizer.state_dict())
    assert resumed.budget.proposals == 8 and resumed.budget.accepted >= 1  # seed 1: an accepted child (seed 0 has none)


def test_one_proposal_per_step_reflects_on_the_population_left_by_the_previous_proposal():
    gen = FakeGenerator(ANCHOR)
    replies = ["```\n#### A\n```", "```\n#### B\n```"]
    cfg = config(max_proposals=2, selector="current_best")
    opt = GEPAOptimizer(cfg, SamplerEvaluator(gen, TASK), make_reflection_lm(cfg.reflection, fn=scripted(replies)),
                        ANCHOR)
    opt.start([SEEDS[0]])
    first, second = opt.step(), opt.step()
    assert [len(r) for r in (first, second)] == [1, 1]
    assert first[0]["outcome"] == "accepted" and second[0]["parent"] == first[0]["child"]
    assert second[0]["outcome"] == "rejected"  # "#### B" only ties its perfect parent "#### A"
    # seeds; then per proposal: the child's minibatch, and for the accepted one the rest of the
    # anchor (parents' rollouts are cached by then)
    assert [len(c["pairs"]) for c in gen.calls] == [12, 3, 9, 3]


def test_parallel_round_on_the_jitted_sampler_is_deterministic_and_reflects_in_one_device_call():
    tok = ByteChatTokenizer(max_context_tokens=40)
    sampler = Sampler(init_model(tiny("llama", vocab_size=ByteChatTokenizer.vocab_size), seed=0), tok,
                      SamplingConfig(max_new_tokens=8, prompt_buckets=(256, 2048), max_context_tokens=40))
    template = "Improve this prompt:\n{current_text}\n\n{examples}\nAnswer between ``` fences."
    anchor = ANCHOR[:4]

    def round_once():
        calls = []

        class Counting:
            tokenizer = sampler.tokenizer

            def generate_text(self, params, pairs, **kw):
                calls.append((len(pairs), kw.get("max_new_tokens")))
                return sampler.generate_text(params, pairs, **kw)

        cfg = GEPAConfig(max_metric_calls=None, max_proposals=3, parallel_proposals=3, minibatch_size=2,
                         skip_perfect=False, eval=ScoringConfig(temperature=1.0, seed=1),
                         reflection=ReflectionConfig(template=template, max_output_chars=20, max_tokens=16,
                                                     temperature=1.0))
        result = run_gepa_round(Counting(), sampler.params, TASK, anchor, [{"context": "Solve it."}], cfg)
        return calls, result

    (calls_a, a), (calls_b, b) = round_once(), round_once()
    assert calls_a == calls_b
    assert without_time(a.optimizer.state_dict()) == without_time(b.optimizer.state_dict())
    assert [c for c in calls_a if c[1] == 16] == [(3, 16)]  # the three meta-prompts in one call
    assert a.budget.proposals == 3 and a.budget.reflection_calls == 3
    assert a.budget.metric_calls == sum(n for n, m in calls_a if m is None)

"""GEPA rounds end to end on a fake deterministic generator: acceptance of an improved context,
determinism under a replayed reflection LM, budget accounting, guards, carried populations,
and save/resume to the identical continuation."""

import hashlib
import json
import logging

import pytest

from fst_jax import distributed
from fst_jax.config import ConfigError, load_config, save_config
from fst_jax.fast import GEPAConfig, GEPAOptimizer, ReflectionConfig, SamplerEvaluator, make_reflection_lm, run_gepa_round
from fst_jax.tasks import make_task

from fast_fakes import FakeGenerator

TASK = make_task("arithmetic")
ANCHOR = TASK.examples("train", 12, seed=0)
SEED = {"context": "Answer the question."}
REPLIES = ["```\nThink carefully.\n```",
           "Sure:\n```text\nThink carefully and end your reply with '#### <number>'.\n```",
           "```\nAnswer the question.\n```"]


def reflect(prompt):
    """A deterministic reflection LM: the reply is chosen by the prompt's hash."""
    return REPLIES[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(REPLIES)]


def config(**kw):
    kw.setdefault("reflection", ReflectionConfig(backend="callable"))
    return GEPAConfig(max_metric_calls=None, **kw)


def without_time(state):
    return {k: v for k, v in state.items() if k != "seconds"}


def test_improved_context_is_accepted_and_round_is_deterministic_under_replay(tmp_path):
    cache = str(tmp_path / "reflection.json")
    record = config(max_proposals=8, reflection=ReflectionConfig(backend="callable", cache_mode="record", cache_path=cache))
    recorded = run_gepa_round(FakeGenerator(ANCHOR), "params", TASK, ANCHOR, [SEED], record, reflection_fn=reflect)
    replay = config(max_proposals=8, reflection=ReflectionConfig(backend="callable", cache_mode="replay", cache_path=cache))
    runs = [run_gepa_round(FakeGenerator(ANCHOR), "params", TASK, ANCHOR, [SEED], replay) for _ in range(2)]
    states = [without_time(r.optimizer.state_dict()) for r in [recorded] + runs]
    assert states[0] == states[1] == states[2]
    result = runs[0]
    assert result.budget.accepted >= 1
    assert "####" in result.contexts[0]["context"]
    best = result.members[0]
    assert best.origin == "reflection" and best.parents and result.optimizer.population.aggregate()[best.id] == 1.0
    assert result.stop_reason.startswith("proposals")


def test_budget_counts_every_scored_rollout_once_and_every_proposal_outcome():
    gen = FakeGenerator(ANCHOR)
    result = run_gepa_round(gen, "params", TASK, ANCHOR, [SEED], config(max_proposals=8), reflection_fn=reflect)
    b = result.budget
    assert b.metric_calls == sum(len(c["pairs"]) * c["n"] for c in gen.calls)
    assert b.proposals == 8 == b.accepted + b.rejected + b.skipped == len(result.optimizer.history)
    assert b.skipped == sum(b.skip_reasons.values())
    assert b.reflection_calls == 8 - b.skip_reasons.get("perfect", 0)
    assert b.reflection_tokens > 0 and b.reflection_failures == 0


def test_metric_call_budget_stops_the_round():
    result = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED],
                            GEPAConfig(max_metric_calls=20, reflection=ReflectionConfig(backend="callable")),
                            reflection_fn=reflect)
    assert result.stop_reason.startswith("metric calls") and result.budget.metric_calls >= 20


def test_a_round_whose_reflections_all_fail_logs_an_error(caplog):
    def timed_out(prompt):
        raise TimeoutError("reflection endpoint timed out")

    with caplog.at_level(logging.INFO, logger="fst_jax.fast.optimizer"):
        result = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=3),
                                reflection_fn=timed_out)
    assert result.budget.reflection_failures == result.budget.reflection_calls == 3
    assert [m.components for m in result.members] == [SEED]
    assert any(r.levelname == "ERROR" and "all 3 reflections failed" in r.getMessage() for r in caplog.records)


def test_a_round_stopped_by_max_proposals_with_most_of_its_budget_unspent_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="fst_jax.fast.optimizer"):
        spent = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED],
                               GEPAConfig(max_proposals=2, max_metric_calls=10_000, reflection=ReflectionConfig(backend="callable")), reflection_fn=reflect)
    assert spent.stop_reason.startswith("proposals") and spent.budget.metric_calls < 5_000
    [warning] = [r.getMessage() for r in caplog.records if "max_proposals" in r.getMessage()]
    assert f"{spent.budget.proposal_calls} of its 10000 metric calls" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fst_jax.fast.optimizer"):
        run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED],
                       GEPAConfig(max_proposals=2, max_metric_calls=spent.budget.proposal_calls + 1,
                                  reflection=ReflectionConfig(backend="callable")), reflection_fn=reflect)
    assert not [r for r in caplog.records if "max_proposals" in r.getMessage()]


def test_the_decision_to_stop_is_process_0s_shared_by_every_process(monkeypatch):
    """Each check sends this process's own decision to ``broadcast_host_object`` and obeys
    the reply (process 0's), also against its own clock: every process stops at one proposal."""
    def as_process_0_says(*said):
        sent, replies = [], iter(said)
        monkeypatch.setattr(distributed, "broadcast_host_object", lambda own: sent.append(own) or next(replies))
        return sent

    sent = as_process_0_says(None, None, "wall time 9.0s >= 5.0s")
    result = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=50, max_seconds=3600),
                            reflection_fn=reflect)
    assert result.stop_reason == "wall time 9.0s >= 5.0s" and result.budget.proposals == 2 and sent == [None] * 3
    sent = as_process_0_says(None, "wall time 9.0s >= 5.0s")
    result = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=50, max_seconds=1e-9),
                            reflection_fn=reflect)
    assert result.budget.proposals == 1 and all(s.startswith("wall time") for s in sent)  # its own clock said stop


def step_once(reply, seed=SEED, **kw):
    evaluator = SamplerEvaluator(FakeGenerator(ANCHOR), TASK)
    cfg = config(**kw)
    opt = GEPAOptimizer(cfg, evaluator, make_reflection_lm(cfg.reflection, fn=lambda p: reply), ANCHOR)
    opt.start([seed])
    [record] = opt.step()
    return opt, record


def test_perfect_parent_minibatch_is_skipped_without_reflection():
    opt, record = step_once("unused", seed={"context": "Finish with #### and the number."})
    assert record["outcome"] == "skipped:perfect" and opt.budget.reflection_calls == 0


@pytest.mark.parametrize("reply, outcome", [
    ("```\nAnswer the question.\n```", "skipped:unchanged"),
    ("```\n```", "skipped:empty"),
    ("I'm sorry, I can't.", "skipped:malformed"),
])
def test_bad_replies_are_skipped_and_counted(reply, outcome):
    opt, record = step_once(reply)
    assert record["outcome"] == outcome
    assert opt.budget.skip_reasons == {outcome.split(":")[1]: 1} and len(opt.population.members) == 1


def test_overlong_reply_is_rejected_or_truncated_per_config():
    long_reply = "```\nEnd with ####. " + "Please double check. " * 20 + "\n```"
    opt, record = step_once(long_reply, reflection=ReflectionConfig(backend="callable", max_context_tokens=8,
                                                                   overlong="reject"))
    assert record["outcome"] == "skipped:overlong"
    opt, record = step_once(long_reply, reflection=ReflectionConfig(backend="callable", max_context_tokens=8))
    assert record["parse"] == "truncated" and record["outcome"] == "accepted"
    assert len(opt.population.members[1].components["context"]) <= 32


def test_carried_population_is_rescored_under_the_current_weights():
    first = run_gepa_round(FakeGenerator(ANCHOR), "good", TASK, ANCHOR, [SEED], config(max_proposals=6),
                           reflection_fn=reflect, policy_step=0)
    carried = first.members
    assert max(first.optimizer.population.aggregate()) == 1.0
    second = run_gepa_round(FakeGenerator(ANCHOR), "broken", TASK, ANCHOR, carried, config(max_proposals=1),
                            reflection_fn=reflect, policy_step=5)
    pop = second.optimizer.population
    assert [m.origin for m in pop.members[:len(carried)]] == ["carried"] * len(carried)
    assert [m.born_step for m in pop.members[:len(carried)]] == [m.born_step for m in carried]
    assert [m.components for m in pop.members[:len(carried)]] == [m.components for m in carried]
    assert pop.scored_step == 5 and all(s == 0.0 for row in pop.scores for s in row)


def test_saved_state_resumes_to_the_identical_continuation(tmp_path):
    straight = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=7),
                              reflection_fn=reflect)
    path = tmp_path / "gepa_state.json"
    run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=3),
                   reflection_fn=reflect, state_path=path)
    assert json.loads(path.read_text())["budget"]["proposals"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["gepa_state.json"]  # no temp file left behind
    resumed = run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=7),
                             reflection_fn=reflect, state_path=path)
    assert without_time(resumed.optimizer.state_dict()) == without_time(straight.optimizer.state_dict())
    assert json.loads(path.read_text())["budget"]["proposals"] == 7


def test_resuming_at_another_policy_step_is_refused(tmp_path):
    path = tmp_path / "s.json"
    run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=1),
                   reflection_fn=reflect, state_path=path)
    with pytest.raises(ValueError, match="policy step"):
        run_gepa_round(FakeGenerator(ANCHOR), "p", TASK, ANCHOR, [SEED], config(max_proposals=2),
                       reflection_fn=reflect, state_path=path, policy_step=3)


def test_config_validation_overrides_and_yaml_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="registered"):
        GEPAConfig(selector="nope")
    with pytest.raises(ConfigError, match="max_proposals"):
        GEPAConfig(max_proposals=0)
    cfg = load_config(GEPAConfig, None, ["selector=epsilon_greedy", "reflection.backend=openai", "eval.samples_per_example=4"])
    assert (cfg.selector, cfg.reflection.backend, cfg.eval.samples_per_example) == ("epsilon_greedy", "openai", 4)
    save_config(cfg, tmp_path / "gepa.yaml")
    assert load_config(GEPAConfig, tmp_path / "gepa.yaml") == cfg

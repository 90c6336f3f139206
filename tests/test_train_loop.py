"""The FST loop (fst_jax/jobs/train.py) on the smoke config: a tiny random model, byte tokenizer."""

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from fst_jax.config import ConfigError, load_config
from fst_jax.jobs import train as train_module
from fst_jax.jobs.train import TrainJob, run_train_job
from fst_jax.metrics import read_jsonl
from fst_jax.models.loading import load_model
from fst_jax.tasks import make_task
from fst_jax.tasks.arithmetic import ArithmeticTask
from fst_jax.tasks.base import register_task
from coin_task import NAME as COIN_TASK

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke_fst.yaml"


def smoke_job(tmp_path, *overrides) -> TrainJob:
    return load_config(TrainJob, SMOKE, [f"output_dir={tmp_path}", "logging.tensorboard=false",
                                         f"task={COIN_TASK}", *overrides])


class Spy:
    """Records the GEPA rounds and rollouts of a run (arguments and results)."""

    def __init__(self, monkeypatch):
        self.rounds, self.rollouts = [], []
        real_round, real_rollout = train_module.run_gepa_round, train_module.rollout

        def gepa_round(generator, params, task, anchor, seeds, config, **kw):
            result = real_round(generator, params, task, anchor, seeds, config, **kw)
            self.rounds.append({"anchor": [e.id for e in anchor], "seeds": seeds, "kw": kw, "result": result,
                                "params": jax.tree.map(np.asarray, params)})
            return result

        def rollout(sampler, params, problems, contexts, *args, **kw):
            result = real_rollout(sampler, params, problems, contexts, *args, **kw)
            self.rollouts.append({"problems": [e.id for e in problems], "contexts": list(contexts),
                                  "params": jax.tree.map(np.asarray, params), "result": result})
            return result

        monkeypatch.setattr(train_module, "run_gepa_round", gepa_round)
        monkeypatch.setattr(train_module, "rollout", rollout)


@pytest.fixture(scope="module")
def fst_run(tmp_path_factory):
    """A 4-step fst run with T = 2, K = 2, G = 4, observed by a Spy."""
    out = tmp_path_factory.mktemp("fst")
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        summary = run_train_job(smoke_job(out))
    return out, spy, summary


def test_fst_runs_a_gepa_round_every_T_steps_and_trains_the_weights(fst_run):
    out, spy, summary = fst_run
    assert [r["kw"]["policy_step"] for r in spy.rounds] == [0, 2]
    assert [r["step"] for r in read_jsonl(out / "gepa.jsonl")] == [0, 2]
    steps = read_jsonl(out / "steps.jsonl")
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and all(r["applied"] == 1 for r in steps)
    first, last = spy.rollouts[0]["params"], spy.rollouts[-1]["params"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last)))
    assert summary["steps_done"] == 4 and len(summary["contexts"]) >= 1
    assert {"reward.png", "kl_vs_reward.png", "contexts.png", "result.json"} <= {p.name for p in out.iterdir()}


def test_the_first_step_logs_the_shared_prefix_learner_against_the_dense_one(fst_run):
    """G/K = 2 rows share each (context, problem) prompt, so the learner takes each prompt once;
    the run's first step also computes the dense path and logs the differences."""
    out, _, _ = fst_run
    steps = read_jsonl(out / "steps.jsonl")
    assert steps[0]["shared_prefix_logp_diff"] < 1e-5 and steps[0]["shared_prefix_loss_diff"] < 1e-6
    assert not any("shared_prefix_logp_diff" in r for r in steps[1:])


def test_each_gepa_round_logs_every_proposal_with_its_text_and_minibatch_scores(fst_run):
    out, _, _ = fst_run
    for round_ in read_jsonl(out / "gepa.jsonl"):
        proposals = round_["proposal_log"]
        assert [p["proposal"] for p in proposals] == list(range(round_["proposals"]))
        scored = [p for p in proposals if p["outcome"] in ("accepted", "rejected")]
        assert len(scored) == round_["accepted"] + round_["rejected"]
        for p in scored:
            assert p["text"].strip() and len(p["child_scores"]) == len(p["parent_scores"]) == len(p["batch"])


def test_anchor_set_is_the_problems_of_the_next_T_batches(fst_run):
    _, spy, _ = fst_run
    for r, start in zip(spy.rounds, (0, 2)):
        following = [i for ro in spy.rollouts[start:start + 2] for i in ro["problems"]]
        assert r["anchor"] == list(dict.fromkeys(following))


def test_carried_contexts_are_rescored_under_the_new_policy_step(fst_run):
    _, spy, _ = fst_run
    first, second = spy.rounds
    assert first["seeds"] == [{"context": ArithmeticTask().seed_context}]
    assert second["seeds"] == first["result"].members  # the previous top-K, as Members
    population = second["result"].optimizer.population
    assert population.scored_step == 2
    carried = [m for m in population.members if m.origin == "carried"]
    assert len(carried) == len(first["result"].members)
    # fresh scores: the carried members were scored again on the new anchor set
    assert population.instance_ids == second["anchor"] != first["anchor"]


def test_contexts_are_mixed_G_over_K_inside_every_problem_group(fst_run):
    _, spy, _ = fst_run
    for ro in spy.rollouts:
        res = ro["result"]
        assert len(ro["contexts"]) == 2
        for p in np.unique(res.problem_ids):
            ctx = res.context_ids[res.problem_ids == p]
            assert sorted(ctx.tolist()) == [0, 0, 1, 1]  # G = 4, K = 2
        rows = len(res.rewards)
        np.testing.assert_array_equal(np.asarray(res.batch.group_ids)[:rows], res.problem_ids)


def test_rl_mode_never_calls_gepa_and_keeps_the_original_prompt(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(train_module, "run_gepa_round", lambda *a, **k: pytest.fail("GEPA ran in mode rl"))
    run_train_job(smoke_job(tmp_path, "mode=rl", "steps=2"))
    assert [ro["contexts"] for ro in spy.rollouts] == [[ArithmeticTask().original_prompt]] * 2
    assert not (tmp_path / "gepa.jsonl").exists()
    assert all(r["applied"] == 1 for r in read_jsonl(tmp_path / "steps.jsonl"))


def test_gepa_mode_leaves_the_weights_bit_identical(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    job = smoke_job(tmp_path, "mode=gepa", "steps=3")
    run_train_job(job)
    model, _ = load_model(job.model, seed=job.seed)
    from flax import nnx

    initial = jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(model)))
    assert len(spy.rounds) == 2 and len(spy.rollouts) == 3
    for seen in [r["params"] for r in spy.rounds] + [r["params"] for r in spy.rollouts]:
        for a, b in zip(jax.tree.leaves(seen), initial, strict=True):
            np.testing.assert_array_equal(a, b)


def test_k_not_dividing_g_and_unknown_mode_are_rejected_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_problem must be divisible by fast.gepa.top_k"):
        smoke_job(tmp_path, "samples_per_problem=6", "fast.gepa.top_k=4")
    with pytest.raises(ConfigError, match="mode"):
        smoke_job(tmp_path, "mode=slow")
    with pytest.raises(ConfigError, match="fast: gepa.max_proposals or gepa.max_seconds"):
        smoke_job(tmp_path, "fast.gepa.max_proposals=null")


def test_unreachable_reflection_endpoint_is_logged_and_the_run_goes_on(tmp_path, caplog):
    job = smoke_job(tmp_path, "steps=2", "fast.gepa.reflection.backend=openai",
                    "fast.gepa.reflection.url=http://127.0.0.1:9/v1/chat/completions",
                    "fast.gepa.reflection.retries=0", "fast.gepa.reflection.timeout_s=2")
    with caplog.at_level(logging.WARNING):
        summary = run_train_job(job)
    assert summary["steps_done"] == 2
    (round_,) = read_jsonl(tmp_path / "gepa.jsonl")
    # every proposal that asked the endpoint was skipped (a parent with perfect scores asks nothing)
    assert round_["skip_reasons"]["reflection_error"] > 0 and round_["accepted"] == round_["rejected"] == 0
    assert sum(round_["skip_reasons"].values()) == round_["proposals"]
    assert "reflection failed" in caplog.text


@register_task("test_raising_arithmetic")
class RaisingArithmetic(ArithmeticTask):
    """Arithmetic whose reward always raises."""

    name = "test_raising_arithmetic"

    def reward(self, example, completion):
        raise RuntimeError("verifier crashed")


def test_raising_reward_scores_zero_logged_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.WARNING):
        summary = run_train_job(smoke_job(tmp_path, "mode=rl", "steps=2", "task=test_raising_arithmetic"))
    assert summary["steps_done"] == 2
    for ro in spy.rollouts:
        res = ro["result"]
        assert not res.rewards.any() and all("verifier crashed" in f for f in res.feedbacks)
    assert "verifier crashed" in caplog.text


def test_non_finite_step_is_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    real = train_module.rollout

    def poisoned(*args, **kw):
        ro = real(*args, **kw)
        if kw["seed"] == 1:  # the second step (seed = job seed * 1000003 + step)
            ro.batch = ro.batch.replace(sampler_logp=np.full_like(ro.batch.sampler_logp, np.nan))
        return ro

    monkeypatch.setattr(train_module, "rollout", poisoned)
    run_train_job(smoke_job(tmp_path, "mode=rl", "steps=3", "learner.advantage.drop_zero_variance=false"))
    steps = read_jsonl(tmp_path / "steps.jsonl")
    assert [r["applied"] for r in steps] == [1, 0, 1]
    assert [r["skipped"] for r in steps] == [0, 1, 1]


def test_config_round_trips_and_the_run_folder_records_it(fst_run):
    out, _, _ = fst_run
    saved = load_config(TrainJob, out / "config.yaml")
    assert saved == dataclasses.replace(saved, output_dir=str(out))
    assert json.loads((out / "result.json").read_text())["mode"] == "fst"


def test_original_prompt_and_seed_context_come_from_task_options(tmp_path):
    job = smoke_job(tmp_path, "task_options={original_prompt: 'Solve it.', seed_context: 'Be brief.'}")
    task = make_task(job.task, **job.task_options)
    assert (task.original_prompt, task.seed_context) == ("Solve it.", "Be brief.")


def test_a_continual_schedule_switches_tasks_at_stage_boundaries_and_resumes_across_a_switch(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    schedule = (f"schedule=[{{task: {COIN_TASK}, steps: 2}}, "
                "{task: test_raising_arithmetic, steps: 2, task_options: {original_prompt: 'Stage two.'}}]")
    job = smoke_job(tmp_path, "mode=fst", "steps=4", "fast.every=4", schedule)
    first = run_train_job(job, max_steps_this_run=3)  # stops inside the second stage
    assert first["steps_done"] == 3
    run_train_job(job)
    steps = read_jsonl(tmp_path / "steps.jsonl")
    assert [(r["step"], r["task"]) for r in steps] == [(0, COIN_TASK), (1, COIN_TASK),
                                                      (2, "test_raising_arithmetic"), (3, "test_raising_arithmetic")]
    # a round opens each stage (T = 4 would otherwise give one), on that stage's problems only
    rounds = read_jsonl(tmp_path / "gepa.jsonl")
    assert [(r["step"], r["task"]) for r in rounds] == [(0, COIN_TASK), (2, "test_raising_arithmetic")]
    assert spy.rounds[1]["anchor"] == list(dict.fromkeys(i for ro in spy.rollouts[2:] for i in ro["problems"]))
    assert spy.rounds[1]["seeds"] == spy.rounds[0]["result"].members  # the population carries over


def test_each_stage_of_a_schedule_ends_with_an_evaluation_of_its_final_weights_on_its_own_task(
        tmp_path, monkeypatch):
    """At a stage boundary the weights that finished stage A are evaluated on A's task (with A's
    prompt) before stage B's first evaluation; the last stage's end is evaluated once."""
    evaluated = []
    real_run = train_module.EvaluationHook.run

    def run(self, generator, params, base, task, contexts, original=None):
        evaluated.append((task.name, original, jax.tree.map(np.asarray, params)))
        return real_run(self, generator, params, base, task, contexts, original)

    monkeypatch.setattr(train_module.EvaluationHook, "run", run)
    spy = Spy(monkeypatch)
    schedule = (f"schedule=[{{task: {COIN_TASK}, steps: 2}}, "
                "{task: test_raising_arithmetic, steps: 2, task_options: {original_prompt: 'Stage two.'}}]")
    job = smoke_job(tmp_path, "mode=rl", "steps=4", "eval.every=2", "eval.num_examples=2", "eval.k=1",
                    "eval.kl=false", schedule)
    run_train_job(job)
    logged = [(r["step"], r["task"]) for r in read_jsonl(tmp_path / "eval.jsonl")]
    b = "test_raising_arithmetic"
    assert logged == [(0, COIN_TASK), (2, COIN_TASK), (2, b), (4, b)]
    assert [original for _, original, _ in evaluated][1:3] == [make_task(COIN_TASK).original_prompt, "Stage two."]
    # the stage-A evaluation at step 2 scored the weights after stage A's two updates: the
    # weights that then sample stage B's first rollout
    for got, want in zip(jax.tree.leaves(evaluated[1][2]), jax.tree.leaves(spy.rollouts[2]["params"])):
        np.testing.assert_array_equal(got, want)


def test_resume_refuses_a_changed_configuration_naming_its_dotted_keys(tmp_path):
    run_train_job(smoke_job(tmp_path, "mode=rl", "steps=2"), max_steps_this_run=1)
    for overrides, keys in ((["learner.optimizer.lr=2e-3", "fast.every=3"], ["fast.every", "learner.optimizer.lr"]),
                            (["data.train_examples=16"], ["data.train_examples"]),
                            (["mode=fst"], ["mode"])):
        with pytest.raises(ConfigError) as err:
            run_train_job(smoke_job(tmp_path, "mode=rl", "steps=2", *overrides))
        message = str(err.value)
        assert "\n" not in message and all(key in message for key in keys), message
    assert len(read_jsonl(tmp_path / "steps.jsonl")) == 1  # nothing ran under a changed config
    # more steps, another progress bar, checkpoint cadence, weight gathering or learner path
    # (equal results to rounding): the same run, extended
    summary = run_train_job(smoke_job(tmp_path, "mode=rl", "steps=3", "logging.progress=true",
                                      "checkpoint.save_every_steps=1", "sampling.gather_weights=true",
                                      "learner.shared_prefix=false"))
    assert summary["steps_done"] == 3


@pytest.fixture(scope="module")
def micro_batched_rl_run(tmp_path_factory):
    """An uninterrupted 4-step rl run over a pool of 4 problems (2 per step: a new shuffled epoch
    every 2 steps) with 2 micro-batches per update, observed by a Spy."""
    out = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        run_train_job(smoke_job(out, *RESUME_OVERRIDES))
    return out, spy


def _without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


RESUME_OVERRIDES = ("mode=rl", "data.train_examples=4", "learner.micro_batches=2", "checkpoint.save_every_steps=0")


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_a_resumed_run_reads_the_same_problems_and_samples_from_the_restored_weights(
        stop_after, micro_batched_rl_run, tmp_path, monkeypatch):
    """The bug classes peers shipped: resume reset the shuffle state, skipped or repeated data with
    micro-batches, or sampled from the initial weights instead of the restored ones."""
    out, whole = micro_batched_rl_run
    problems = [ro["problems"] for ro in whole.rollouts]
    assert sorted(problems[0] + problems[1]) == sorted(problems[2] + problems[3])  # epochs: each problem once
    assert problems[:2] != problems[2:]  # ... reshuffled
    job = smoke_job(tmp_path, *RESUME_OVERRIDES)
    run_train_job(job, max_steps_this_run=stop_after)
    spy = Spy(monkeypatch)
    run_train_job(job)
    assert [ro["problems"] for ro in spy.rollouts] == problems[stop_after:]
    first = jax.tree.leaves(spy.rollouts[0]["params"])
    for got, want in zip(first, jax.tree.leaves(whole.rollouts[stop_after]["params"])):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(whole.rollouts[0]["params"])))
    assert (_without_times(read_jsonl(tmp_path / "steps.jsonl"))
            == _without_times(read_jsonl(out / "steps.jsonl")))

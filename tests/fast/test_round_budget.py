"""The search budget of a GEPA round at the paper's shapes: re-scoring the carried contexts is
charged on top of ``max_metric_calls`` by default (``rescoring_counts_toward_budget``), logged
apart from the proposals' calls, and a configuration whose round cannot afford
``min_proposals`` worst-case proposals is refused (GEPAConfig, TrainJob, GEPAJob, dry run)."""

import dataclasses
import hashlib

import pytest

from fst_jax.config import ConfigError
from fst_jax.fast import GEPAConfig, ReflectionConfig, ScoringConfig, run_gepa_round
from fst_jax.jobs.gepa import GEPAJob
from fst_jax.jobs.preflight import gepa_round_line
from fst_jax.jobs.train import FastConfig, TrainJob
from fst_jax.tasks import make_task

from fast_fakes import FakeGenerator

TASK = make_task("arithmetic")
CARRIED = [{"context": f"Answer the question ({i})."} for i in range(4)]  # K = 4 carried contexts


def reflect(prompt):
    """A deterministic reflection LM that never repeats itself: by the prompt's hash, a better
    context (right on even answers) or one as good as the seeds (right on multiples of 3)."""
    h = hashlib.sha256(prompt.encode()).hexdigest()
    return f"```\n{['Think carefully', 'Answer the question'][int(h, 16) % 2]} ({h[:8]}).\n```"


def paper_round(anchor_size, **kw):
    """A round of the paper's shapes: K 4 carried contexts, budget 960, minibatch 3."""
    anchor = TASK.examples("train", anchor_size, seed=0)
    cfg = GEPAConfig(max_metric_calls=960, max_proposals=400, reflection=ReflectionConfig(backend="callable"), **kw)
    return run_gepa_round(FakeGenerator(anchor), "p", TASK, anchor, CARRIED, cfg, reflection_fn=reflect)


@pytest.mark.parametrize("anchor_size, at_least", [(192, 5), (384, 3)])
def test_at_the_paper_shapes_a_round_makes_many_proposals_and_logs_rescoring_apart(anchor_size, at_least):
    result = paper_round(anchor_size)
    b = result.budget
    assert b.rescore_calls == 4 * anchor_size
    assert b.proposal_calls + b.rescore_calls == b.metric_calls
    assert b.proposal_calls >= 960 and result.stop_reason.startswith("metric calls")
    # a proposal costs at most 2 x 3 + anchor_size calls: 960 of them buy at least this many
    assert b.proposals >= at_least
    assert result.optimizer.history[-1]["proposal_calls"] == b.proposal_calls


def test_rescoring_charged_to_the_budget_leaves_the_search_what_remains():
    result = paper_round(192, rescoring_counts_toward_budget=True)
    b = result.budget
    assert b.rescore_calls == 768 and b.metric_calls >= 960
    assert b.proposals < paper_round(192).budget.proposals


def test_a_round_that_cannot_afford_min_proposals_is_refused_with_its_numbers():
    charged = GEPAConfig(max_metric_calls=960, rescoring_counts_toward_budget=True)
    with pytest.raises(ConfigError, match=r"min_proposals=1 .*may make 0.*960.*1536.*-576.*390.*raise max_metric_calls to 1537"):
        charged.require_affordable(anchor_size=384, carried=4)
    charged.require_affordable(anchor_size=192, carried=4)  # 192 left: one proposal is sure
    with pytest.raises(ConfigError, match=r"min_proposals=2 .*may make 1.*raise max_metric_calls to 967"):
        dataclasses.replace(charged, min_proposals=2).require_affordable(anchor_size=192, carried=4)
    GEPAConfig(max_metric_calls=960, min_proposals=5).require_affordable(anchor_size=192, carried=4)
    with pytest.raises(ConfigError, match="min_proposals=6"):
        GEPAConfig(max_metric_calls=960, min_proposals=6).require_affordable(anchor_size=192, carried=4)
    GEPAConfig(max_metric_calls=None, rescoring_counts_toward_budget=True).require_affordable(anchor_size=384, carried=4)
    with pytest.raises(ConfigError, match="max_proposals"):
        GEPAConfig(max_proposals=2, min_proposals=3)


def fst_job(problems_per_step, **gepa):
    return TrainJob(problems_per_step=problems_per_step, samples_per_problem=8,
                    fast=FastConfig(every=6, gepa=GEPAConfig(max_proposals=400, max_metric_calls=960, **gepa)))


def test_train_and_gepa_jobs_refuse_a_round_without_proposals():
    fst_job(64)  # anchor 384: the search budget is 960 on top of re-scoring
    with pytest.raises(ConfigError, match=r"cannot afford.*1536"):
        fst_job(64, rescoring_counts_toward_budget=True)
    with pytest.raises(ConfigError, match="cannot afford"):
        fst_job(32, rescoring_counts_toward_budget=True, eval=ScoringConfig(samples_per_example=2))
    with pytest.raises(ConfigError, match="cannot afford"):
        GEPAJob(anchor_size=64, gepa=GEPAConfig(max_metric_calls=40, rescoring_counts_toward_budget=True))


def test_dry_run_states_the_rounds_rescoring_and_least_proposals():
    line = gepa_round_line(fst_job(32))
    assert "anchor 192" in line and "re-scoring 768" in line and "on top of" in line
    assert "at most 198" in line and "at least 5 proposals" in line
    assert gepa_round_line(TrainJob(mode="rl")) is None

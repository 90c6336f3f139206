"""The side-by-side runner: per-mode jobs, the report's numbers on hand-made run folders, and one
end-to-end comparison of rl, gepa and fst on the tiny smoke config, resumed across a stop."""

import json
from pathlib import Path

import numpy as np
import pytest

from fst_jax.config import ConfigError, load_config
from fst_jax.evaluation import kl_token_mean
from fst_jax.jobs.compare import CompareJob, mode_job, report, run_compare, seeded
from fst_jax.jobs.train import TrainJob
from fst_jax.metrics import read_jsonl
from fst_jax.report.comparison import kl_at_matched_reward
from fst_jax.report.curves import sigmoid_curve
from fst_jax.runs import RunFolder

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke_fst.yaml"


def _write_run(folder: Path, mode: str, steps, means, kls, reward=0.5, finished=True):
    folder.mkdir(parents=True)
    with open(folder / "steps.jsonl", "w") as f:
        for s in range(max(steps)):
            f.write(json.dumps({"step": s, "mode": mode, "reward_mean": reward}) + "\n")
    with open(folder / "eval.jsonl", "w") as f:
        for s, m, k in zip(steps, means, kls):
            f.write(json.dumps({"step": s, "mode": mode, "eval/mean@4": m, "eval/pass@1": m / 2,
                                "eval/kl_to_base": k, "eval/kl_to_base_original": 2 * k,
                                "eval/ood/arithmetic/mean@4": 0.1}) + "\n")
    if finished:
        (folder / "result.json").write_text(json.dumps({"steps_done": max(steps), "steps": max(steps)}))
    if mode != "rl":
        (folder / "contexts.json").write_text(json.dumps(
            [{"id": 0, "components": {"context": f"best {mode} context"}}]))


def test_mode_job_gives_each_mode_its_own_folder_checkpoints_and_the_weights_the_report_needs(tmp_path):
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}/cmp",
                                        f"checkpoint.directory={tmp_path}/ckpt"])
    sub = mode_job(job, "rl")
    assert (sub.mode, sub.output_dir, sub.export_hf) == ("rl", f"{tmp_path}/cmp/rl", True)
    assert sub.checkpoint.directory == f"{tmp_path}/ckpt/rl"
    # the report needs the fst run's weights only when its evaluations do not log the 2x2
    logs_only = load_config(CompareJob, SMOKE, ["export_hf=false", "eval.every=2", "eval.two_by_two=true"])
    assert not mode_job(logs_only, "fst").export_hf
    assert mode_job(load_config(CompareJob, SMOKE, ["export_hf=false"]), "fst").export_hf
    relative = load_config(CompareJob, SMOKE, ["checkpoint.directory=checkpoints"])
    assert mode_job(relative, "gepa").checkpoint.directory == "checkpoints"  # inside output_dir/gepa
    with pytest.raises(ConfigError, match="not one of"):
        mode_job(job, "sft")


def test_each_seed_moves_data_order_sampling_and_gepa_but_not_the_validation_problems(tmp_path):
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "seeds=[0, 2]", "seed=1", "data.seed=3",
                                          "eval.seed=7"])
    sub = mode_job(job, "fst", 2)
    assert (sub.seed, sub.data.seed, sub.data.shuffle_seed, sub.fast.gepa.seed) == (3, 5, 2, 2)
    assert sub.eval == job.eval and type(sub) is TrainJob
    assert sub.output_dir == f"{tmp_path}/fst/seed2" and mode_job(job, "rl").output_dir == f"{tmp_path}/rl/seed0"
    assert seeded(job.train_job(), 0) == job.train_job()
    with pytest.raises(ConfigError, match="not one of the comparison's seeds"):
        mode_job(job, "rl", 1)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        load_config(CompareJob, SMOKE, ["seeds=[1, 1]"])


def test_compare_config_states_its_primary_metric_and_comparisons_in_the_reports_names():
    # quoted: unquoted, YAML reads "a: b" as a mapping
    job = load_config(CompareJob, SMOKE, ["eval.k=4", 'primary_metric="fst-rl: best mean@4"',
                                          "comparisons=['fst-rl: KL at matched mean@4 (evaluated context)']"])
    assert job.primary_metric == "fst-rl: best mean@4"
    with pytest.raises(ConfigError, match="unknown"):
        load_config(CompareJob, SMOKE, ["comparisons=['fst-rl: peak accuracy']"])


def test_run_compare_refuses_a_config_without_evaluations(tmp_path):
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.every must be > 0"):
        run_compare(job)


def test_kl_at_matched_reward_takes_the_highest_reward_both_weight_runs_reached(tmp_path):
    _write_run(tmp_path / "rl", "rl", [0, 10, 20, 30], [0.1, 0.3, 0.4, 0.35], [0.0, 0.02, 0.05, 0.07])
    _write_run(tmp_path / "fst", "fst", [0, 10, 20, 30], [0.1, 0.45, 0.5, 0.6], [0.0, 0.01, 0.015, 0.02])
    runs = {m: RunFolder(tmp_path / m).read(m) for m in ("rl", "fst")}
    out = kl_at_matched_reward(runs, "eval/mean@4")
    # rl peaked at 0.4: rl first reached it at step 20 (KL 0.05), fst at step 10 (KL 0.01).
    assert out == {"reward": 0.4, "kl": {"rl": 0.05, "fst": 0.01}, "kl_original": {"rl": 0.1, "fst": 0.02},
                   "step": {"rl": 20, "fst": 10}}


def test_kl_at_matched_reward_never_matches_the_untrained_step_0_evaluation(tmp_path):
    # Both runs start above anything fst reaches later: the match is fst's best trained checkpoint.
    _write_run(tmp_path / "rl", "rl", [0, 6, 12], [0.23, 0.12, 0.25], [0.0, 0.008, 0.018])
    _write_run(tmp_path / "fst", "fst", [0, 6, 12], [0.23, 0.10, 0.11], [0.0, 0.004, 0.010])
    out = kl_at_matched_reward({m: RunFolder(tmp_path / m).read(m) for m in ("rl", "fst")}, "eval/mean@4")
    assert out == {"reward": 0.11, "kl": {"rl": 0.008, "fst": 0.010}, "kl_original": {"rl": 0.016, "fst": 0.02},
                   "step": {"rl": 6, "fst": 12}}


def test_report_on_hand_made_runs_has_peak_steps_fits_ood_and_figures(tmp_path):
    steps = list(range(0, 101, 10))
    rl = sigmoid_curve(steps, 0.4, 40.0, 2.0, 0.1).tolist()
    fst = sigmoid_curve(steps, 0.6, 20.0, 2.0, 0.1).tolist()
    _write_run(tmp_path / "rl", "rl", steps, rl, np.linspace(0, 0.1, len(steps)))
    _write_run(tmp_path / "gepa", "gepa", steps, [0.1] * len(steps), [0.0] * len(steps))
    _write_run(tmp_path / "fst", "fst", steps, fst, np.linspace(0, 0.05, len(steps)), finished=False)
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "eval.every=10", "eval.k=4"])
    summary = report(job)
    n = summary["per_mode"]
    assert n["rl"]["sigmoid"]["A"] == pytest.approx(0.4, abs=0.01)
    assert n["fst"]["sigmoid"]["A"] == pytest.approx(0.6, abs=0.01)
    assert n["rl"]["max_mean"] == pytest.approx(max(rl)) and n["fst"]["finished"] is False
    peak = summary["steps_to_rl_peak"]
    assert peak["peak"] == pytest.approx(max(rl))
    assert peak["steps"]["rl"] == 100 and peak["steps"]["fst"] < 100 and peak["steps"]["gepa"] is None
    assert n["gepa"]["ood"] == {"eval/ood/arithmetic/mean@4": 0.1}
    assert summary["two_by_two"] == {"skipped": "no finished fst run"}
    out = tmp_path / "report"
    for fig in ("reward_vs_step.png", "kl_vs_reward.png", "training_reward.png", "sigmoid_fits.png"):
        assert (out / fig).stat().st_size > 0 and fig in summary["figures"]
    md = (out / "summary.md").read_text()
    assert f"{n['fst']['sigmoid']['A']:.4f}" in md and "best fst context" in md and "never" in md
    assert "| KL, evaluated context | KL, original prompt |" in md
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_report_sums_the_gepa_rounds_and_averages_parent_and_child_minibatch_scores(tmp_path):
    steps = [0, 5, 10]
    _write_run(tmp_path / "rl", "rl", steps, [0.1, 0.2, 0.3], [0.0, 0.01, 0.02])
    _write_run(tmp_path / "fst", "fst", steps, [0.1, 0.2, 0.3], [0.0, 0.01, 0.02])
    rounds = [
        {"step": 0, "metric_calls": 40, "proposals": 3, "accepted": 1, "rejected": 1, "skipped": 1,
         "skip_reasons": {"leak": 1}, "best_anchor_score": 0.25, "proposal_log": [
             {"proposal": 0, "outcome": "accepted", "parent_scores": [0, 0, 1], "child_scores": [1, 1, 1]},
             {"proposal": 1, "outcome": "rejected", "parent_scores": [1, 0, 0], "child_scores": [0, 0, 0]},
             {"proposal": 2, "outcome": "skipped:leak", "parent_scores": [0, 0, 0]}]},
        {"step": 5, "metric_calls": 12, "proposals": 2, "accepted": 0, "rejected": 0, "skipped": 2,
         "skip_reasons": {"leak": 1, "malformed": 1}, "best_anchor_score": 0.5},  # logged before proposal_log
    ]
    (tmp_path / "fst" / "gepa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "eval.every=5", "eval.k=4"])
    summary = report(job, two_by_two=False)
    assert summary["fast_channel"]["rl"] is None
    fast = summary["fast_channel"]["fst"]
    assert (fast["rounds"], fast["proposals"], fast["accepted"], fast["rejected"], fast["skipped"]) == (2, 5, 1, 1, 3)
    assert fast["skip_reasons"] == {"leak": 2, "malformed": 1} and fast["metric_calls_per_round"] == [40, 12]
    assert fast["scored_children"] == 2
    assert fast["minibatch_mean_parent"] == pytest.approx(1 / 3) and fast["minibatch_mean_child"] == pytest.approx(0.5)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| fst | 2 | 5 | 1 | 1 | 3 (leak 2, malformed 1) | 40, 12 | 0.250, 0.500 | 0.333 / 0.500 |" in md


def test_report_takes_the_2x2_from_the_fst_runs_final_evaluation_without_weights_or_sampling(tmp_path, monkeypatch):
    import fst_jax.models.loading as loading

    for mode in ("rl", "gepa", "fst"):
        _write_run(tmp_path / mode, mode, [0, 2, 4], [0.1, 0.2, 0.3], [0.0, 0.01, 0.02])
    grid = {"base/original": 0.125, "base/evolved": 0.25, "trained/original": 0.375, "trained/evolved": 0.5}
    with open(tmp_path / "fst" / "eval.jsonl", "a") as f:  # an earlier step's 2x2 is not the final one
        for step, scale in ((2, 0.5), (4, 1.0)):
            f.write(json.dumps({"step": step, "mode": "fst", "eval/mean@4": 0.3,
                                **{f"eval/2x2/{k}": v * scale for k, v in grid.items()}}) + "\n")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("sampled the 2x2 again"))
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "eval.every=2", "eval.k=4", "steps=4"])
    tbt = report(job)["two_by_two"]
    assert tbt["table"] == grid and tbt["source"] == "final evaluation"
    assert tbt["contexts"]["evolved"] == "best fst context"
    assert "computed by the final evaluation" in (tmp_path / "report" / "summary.md").read_text()


def test_continual_report_normalises_each_stage_by_the_best_mode_on_that_stages_task(tmp_path):
    # two stages of 10 steps; evaluations every 5 steps on the stage's own task (the one at step
    # 10 opens stage b, evaluated on b)
    evals = {"rl": [("a", 0, .1), ("a", 5, .4), ("b", 10, .0), ("b", 15, .2), ("b", 20, .3)],
             "fst": [("a", 0, .1), ("a", 5, .2), ("b", 10, .5), ("b", 15, .6), ("b", 20, .1)]}
    for mode, rows in evals.items():
        (tmp_path / mode).mkdir()
        (tmp_path / mode / "steps.jsonl").write_text("".join(
            json.dumps({"step": s, "mode": mode, "reward_mean": 0.0}) + "\n" for s in range(20)))
        (tmp_path / mode / "eval.jsonl").write_text("".join(
            json.dumps({"step": s, "mode": mode, "task": t, "eval/mean@2": v}) + "\n" for t, s, v in rows))
    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "eval.every=5", "eval.k=2", "steps=20",
                                        "schedule=[{task: a, steps: 10}, {task: b, steps: 10}]"])
    summary = report(job, modes=("rl", "fst"), two_by_two=False)
    a, b = summary["continual"]
    assert (a["task"], a["start"], a["end"], b["start"], b["end"]) == ("a", 0, 10, 10, 20)
    assert a["best"] == {"rl": 0.4, "fst": 0.2} and a["normalised"] == {"rl": 1.0, "fst": 0.5}
    assert b["best"] == {"rl": 0.3, "fst": 0.6} and b["normalised"] == {"rl": 0.5, "fst": 1.0}
    assert "continual.png" in summary["figures"] and (tmp_path / "report" / "continual.png").exists()
    assert "| a | 0-10 | 1.000 (0.400) | 0.500 (0.200) |" in (tmp_path / "report" / "summary.md").read_text()


def test_run_compare_skips_finished_modes_and_stops_at_a_mode_that_stopped_early(tmp_path, monkeypatch):
    import fst_jax.jobs.compare as compare

    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "eval.every=2"])
    _write_run(tmp_path / "rl", "rl", [0, 2, 4], [0.1, 0.2, 0.3], [0.0, 0.1, 0.2])  # finished,
    (tmp_path / "rl" / "hf").mkdir()  # with its exported weights
    calls = []

    def fake_train(sub, reflection_fn=None, max_steps_this_run=None):
        calls.append((sub.mode, sub.output_dir, max_steps_this_run))
        return {"steps_done": 1}  # SIGTERM / time slice: stopped before sub.steps

    monkeypatch.setattr(compare, "run_train_job", fake_train)
    monkeypatch.setattr(compare, "report", lambda job, modes, two_by_two: {"modes": modes})
    assert run_compare(job, max_steps_this_run=1) == {"modes": ("rl", "gepa", "fst")}
    assert calls == [("gepa", f"{tmp_path}/gepa", 1)]  # rl skipped; fst never started


def test_run_compare_runs_every_mode_at_every_seed_skipping_finished_runs(tmp_path, monkeypatch):
    import fst_jax.jobs.compare as compare

    job = load_config(CompareJob, SMOKE, [f"output_dir={tmp_path}", "eval.every=2", "seeds=[0, 1]", "steps=4"])
    _write_run(tmp_path / "rl" / "seed0", "rl", [0, 2, 4], [0.1, 0.2, 0.3], [0.0, 0.1, 0.2])
    (tmp_path / "rl" / "seed0" / "hf").mkdir()
    calls = []

    def fake_train(sub, reflection_fn=None, max_steps_this_run=None):
        calls.append((sub.mode, sub.seed, sub.output_dir))
        return {"steps_done": sub.steps}

    monkeypatch.setattr(compare, "run_train_job", fake_train)
    monkeypatch.setattr(compare, "report", lambda job, modes, two_by_two: {})
    run_compare(job, ("rl", "fst"))
    assert calls == [("fst", 0, f"{tmp_path}/fst/seed0"), ("rl", 1, f"{tmp_path}/rl/seed1"),
                     ("fst", 1, f"{tmp_path}/fst/seed1")]


def test_compare_runs_rl_gepa_fst_on_the_smoke_config_and_reports_the_2x2(tmp_path, monkeypatch):
    import fst_jax.jobs.compare as compare

    job = load_config(CompareJob, SMOKE, [
        f"output_dir={tmp_path}", "steps=2", "eval.every=1", "eval.num_examples=2", "eval.k=1",
        "eval.greedy=false", "eval.kl_samples=1", "eval.ood_tasks=[arithmetic]", "fast.gepa.max_metric_calls=8",
        "fast.gepa.max_proposals=1", "fast.gepa.reflection.backend=callable"])
    summary = run_compare(job, reflection_fn=lambda prompt: "```\nAnswer with the number only.\n```")
    assert summary["modes"] == ["rl", "gepa", "fst"]
    for mode in ("rl", "gepa", "fst"):
        run = RunFolder(tmp_path / mode).read(mode)
        assert [r["step"] for r in run.steps] == [0, 1]
        assert [r["step"] for r in run.eval] == [0, 1, 2]
        assert summary["per_mode"][mode]["finished"]
        assert "need >= 4" in summary["per_mode"][mode]["sigmoid"]["error"]  # 3 evaluations
    assert summary["per_mode"]["gepa"]["final_kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert "eval/ood/arithmetic/mean@1" in summary["per_mode"]["fst"]["ood"]
    table = summary["two_by_two"]["table"]
    assert set(table) == {"base/original", "base/evolved", "trained/original", "trained/evolved"}
    assert all(0.0 <= v <= 1.0 for v in table.values()) and summary["two_by_two"]["examples"] == 2
    fst_ctx = json.loads((tmp_path / "fst" / "contexts.json").read_text())[0]["components"]["context"]
    assert summary["two_by_two"]["contexts"]["evolved"] == fst_ctx
    assert {"reward_vs_step.png", "kl_vs_reward.png"} <= set(summary["figures"])
    assert (tmp_path / "report" / "summary.md").exists()
    rows = {r["quantity"]: r for r in summary["evidence"]["rows"]}
    assert {"fst-rl: final mean@1", "fst: KL at matched mean@1 (original prompt)",
            "gepa-rl: final ood/arithmetic mean@1"} <= set(rows)
    assert not any("2x2" in q for q in rows)  # eval.two_by_two is off: the report sampled its 2x2
    assert (tmp_path / "report" / "evidence.md").exists()
    # Rerunning finds every mode finished: nothing trains, the report is rebuilt.
    monkeypatch.setattr(compare, "run_train_job", lambda *a, **k: pytest.fail("trained again"))
    again = run_compare(job, two_by_two=False)
    assert again["per_mode"] == summary["per_mode"]


def test_compare_at_two_seeds_logs_per_problem_scores_on_the_same_problems_that_average_to_eval_jsonl(tmp_path):
    job = load_config(CompareJob, SMOKE, [
        f"output_dir={tmp_path}", "steps=1", "eval.every=1", "eval.num_examples=3", "eval.k=2",
        "eval.kl_samples=2", "seeds=[0, 1]", 'comparisons=["rl: final pass@1"]'])
    summary = run_compare(job, ("rl",))
    assert summary["seeds"] == [0, 1]
    ids, orders = [], []
    for seed in (0, 1):
        folder = tmp_path / "rl" / f"seed{seed}"
        orders.append(json.loads((folder / "result.json").read_text())["steps_done"])
        evals = {r["step"]: r for r in read_jsonl(folder / "eval.jsonl")}
        problems = read_jsonl(folder / "eval_problems.jsonl")
        assert [r["step"] for r in problems] == [0, 1]
        for rec in problems:
            logged = evals[rec["step"]]
            for key in ("eval/mean@2", "eval/pass@1", "eval/pass@1_original"):
                assert np.mean(rec["scores"][key]) == logged[key], key  # exactly
            assert np.shape(rec["scores"]["eval/mean@2"]) == (3, 2)
            for key in ("eval/kl_to_base", "eval/kl_to_base_original"):
                assert np.shape(rec["kl"][key]) == (3, 2)
                assert kl_token_mean(rec["kl"][key], rec["kl_tokens"][key]) == pytest.approx(logged[key], rel=1e-9)
            ids.append(rec["example_ids"])
        assert (tmp_path / "report" / f"seed{seed}" / "summary.md").exists()
    assert all(i == ids[0] for i in ids)  # the same validation problems at every seed
    rows = {r["quantity"]: r for r in summary["evidence"]["rows"]}
    assert rows["rl: final pass@1"]["pre_stated"] == "yes" and rows["rl: best mean@2"]["pre_stated"] == "no"
    assert summary["evidence"]["seeds"] == [0, 1] and summary["evidence"]["problems"] == 3
    assert "evidence.md" in (tmp_path / "report" / "summary.md").read_text()

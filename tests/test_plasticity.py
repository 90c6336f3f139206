"""The plasticity job: which weights each arm starts from, phase A first when unfinished, finished
arms skipped, and the report's numbers on hand-made arm folders."""

import json
from pathlib import Path

import pytest

import fst_jax.jobs.plasticity as plasticity
from fst_jax.config import ConfigError, load_config
from fst_jax.jobs.plasticity import PlasticityJob, report, run_plasticity

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke_fst.yaml"


def _job(tmp_path, *overrides) -> PlasticityJob:
    phase_a = tmp_path / "phase_a.yaml"
    phase_a.write_text(SMOKE.read_text().replace("output_dir: runs/smoke_fst", f"output_dir: {tmp_path}/a"))
    probe = {"mode": "rl", "model": "tiny:llama", "task": "arithmetic", "steps": 4, "output_dir": str(tmp_path / "b"),
             "eval": {"every": 2, "k": 2}}
    config = tmp_path / "plasticity.yaml"
    config.write_text(json.dumps({"phase_a": str(phase_a), "probe": probe}))
    return load_config(PlasticityJob, config, list(overrides))


def _finish(folder: Path, steps: int, means=None) -> None:
    """A finished run folder: result.json (and hf/ for weights) plus its evaluations."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hf").mkdir(exist_ok=True)
    (folder / "steps.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": 0.0}) + "\n"
                                                for s in range(steps)))
    (folder / "result.json").write_text(json.dumps({"steps_done": steps, "steps": steps}))
    if means is not None:
        (folder / "eval.jsonl").write_text("".join(
            json.dumps({"step": 2 * i, "mode": "rl", "eval/mean@2": m}) + "\n" for i, m in enumerate(means)))


def test_arms_start_from_the_base_model_and_phase_as_exported_weights(tmp_path):
    job = _job(tmp_path)
    assert job.arm_job("base").model == "tiny:llama"
    assert job.arm_job("rl").model == f"{tmp_path}/a/rl/hf" and job.arm_job("fst").model == f"{tmp_path}/a/fst/hf"
    assert job.arm_job("fst").output_dir == f"{tmp_path}/b/fst_init" and job.arm_job("fst").mode == "rl"


def test_bad_plasticity_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="probe.mode must be 'rl'"):
        _job(tmp_path, "probe.mode=fst")
    with pytest.raises(ConfigError, match="arms must be distinct names"):
        _job(tmp_path, "arms=[base, sft]")


def test_run_plasticity_runs_unfinished_phase_a_then_each_unfinished_arm(tmp_path, monkeypatch):
    job = _job(tmp_path)
    calls = []

    def compare(phase_a, modes, **kw):
        calls.append(("phase_a", tuple(modes)))
        for m in modes:
            _finish(Path(phase_a.output_dir) / m, phase_a.steps)

    def train(sub, **kw):
        calls.append((sub.output_dir.split("/")[-1], sub.model))
        _finish(Path(sub.output_dir), sub.steps, means=[0.1, 0.3, 0.2])
        return {"steps_done": sub.steps}

    monkeypatch.setattr(plasticity, "run_compare", compare)
    monkeypatch.setattr(plasticity, "run_train_job", train)
    _finish(tmp_path / "b" / "rl_init", 4, means=[0.1, 0.0, 0.0])  # this arm already finished
    summary = run_plasticity(job)
    assert calls == [("phase_a", ("rl", "fst")), ("base_init", "tiny:llama"),
                     ("fst_init", f"{tmp_path}/a/fst/hf")]
    assert summary["base_best"] == 0.3
    assert summary["per_arm"]["rl"] == {"model": f"{tmp_path}/a/rl/hf", "evaluations": 3, "final_mean": 0.0,
                                        "max_mean": 0.1, "mean_over_evaluations": pytest.approx(0.1 / 3),
                                        "first_step_at_base_best": None}
    assert summary["per_arm"]["fst"]["first_step_at_base_best"] == 2
    calls.clear()
    run_plasticity(job)  # everything finished: only the report is rewritten
    assert calls == []


def test_plasticity_report_writes_the_figure_and_a_table_per_arm(tmp_path):
    job = _job(tmp_path)
    for arm, means in (("base", [0.2, 0.4]), ("rl", [0.0, 0.1]), ("fst", [0.2, 0.5])):
        _finish(tmp_path / "b" / f"{arm}_init", 4, means=means)
    summary = report(job)
    out = tmp_path / "b" / "report"
    assert (out / "plasticity.png").stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "| fst | `" in md and "| 0.5000 |" in md and "Base arm's best eval/mean@2: 0.4000" in md
    assert json.loads((out / "summary.json").read_text()) == summary

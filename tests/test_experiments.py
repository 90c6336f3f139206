"""Every experiment config in experiments/ loads and validates against its job's dataclass; the
paper setups come in cpu and pod sizes with the paper's shapes; the pod configs' dry run fits."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fst_jax.config import load_config, save_config
from fst_jax.dryrun import GIB
from fst_jax.jobs.gepa import GEPAJob
from fst_jax.jobs.compare import CompareJob
from fst_jax.jobs.distill import DistillConfig
from fst_jax.jobs.plasticity import PlasticityJob
from fst_jax.jobs.preflight import batch_shape, model_config
from fst_jax.jobs.train import TrainJob
from fst_jax.models import configs
from fst_jax.tasks import make_task

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SETUPS = ("codeio", "math", "hover_hard", "star_graph", "continual", "plasticity")
JOBS = {"gepa_": GEPAJob, "smoke_": TrainJob, "fst_distill_": DistillConfig, "fst_": TrainJob,
        **{f"{setup}_": TrainJob for setup in SETUPS}, "plasticity_": PlasticityJob, "evidence_": CompareJob}


def _job_class(path: Path):
    return next((cls for prefix, cls in JOBS.items() if path.name.startswith(prefix)), None)


def _load(name: str) -> TrainJob:
    """The setup's training job (for plasticity: phase B, the probe)."""
    if name.startswith("plasticity_"):
        return load_config(PlasticityJob, EXPERIMENTS / name).probe
    return load_config(TrainJob, EXPERIMENTS / name)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_config_loads_into_its_job_and_round_trips(path, tmp_path):
    job_cls = _job_class(path)
    assert job_cls is not None, f"{path.name}: no job registered for its name prefix"
    job = load_config(job_cls, path)
    save_config(job, tmp_path / "saved.yaml")
    assert load_config(job_cls, tmp_path / "saved.yaml") == job


@pytest.mark.parametrize("setup", SETUPS)
def test_each_paper_setup_has_a_cpu_config_on_the_bundled_model_saying_what_it_stands_in_for(setup):
    path = EXPERIMENTS / f"{setup}_cpu.yaml"
    job = _load(path.name)
    text = path.read_text().lower()
    assert "stand" in text and "paper" in text, f"{path.name} must say which paper task it stands in for"
    assert job.model == "smollm2-135m-instruct"
    assert job.eval.every > 0 and job.target.device_memory_gib is None
    for stage in job.stages():  # the tasks and their options build here
        assert make_task(stage.task, **stage.task_options).examples("train", 2, seed=job.data.seed)


@pytest.mark.parametrize("setup", SETUPS)
def test_each_paper_setup_has_a_pod_config_with_the_papers_shapes_on_8_devices(setup):
    job = _load(f"{setup}_pod.yaml")
    assert (job.problems_per_step, job.samples_per_problem) == (32, 8)
    assert (job.fast.every, job.fast.gepa.top_k, job.fast.gepa.max_metric_calls) == (6, 4, 960)
    assert job.learner.kl.beta == 0.001 and job.learner.loss.name == "cispo"
    assert job.learner.loss.tau == 4.0 and job.learner.optimizer.clip_norm == 0.0
    assert job.dtype == "bfloat16" and job.target.architecture == "qwen3-8b"
    assert job.target.devices == job.mesh.data * job.mesh.fsdp * job.mesh.tensor == 8
    assert job.remat and model_config(job) == configs.QWEN3_8B
    rows, _ = batch_shape(job)
    assert rows % (job.learner.micro_batches * job.mesh.fsdp) == 0  # one row per device per micro-batch


def test_continual_configs_switch_between_three_tasks_with_the_same_task_agnostic_prompts():
    for name, per_stage in (("continual_cpu.yaml", 60), ("continual_pod.yaml", 200)):
        stages = _load(name).stages()
        assert len({st.task for st in stages}) == 3 and {st.steps for st in stages} == {per_stage}
        prompts = {(st.task_options["seed_context"], st.task_options["original_prompt"]) for st in stages}
        assert len(prompts) == 1


@pytest.mark.parametrize("size", ("cpu", "pod"))
def test_plasticity_arms_start_from_phase_as_exported_weights_and_the_base_model(size):
    job = load_config(PlasticityJob, EXPERIMENTS / f"plasticity_{size}.yaml")
    phase_a = job.phase_a_job()
    assert job.phase_a == f"experiments/math_{size}.yaml" and job.arms == ("base", "rl", "fst")
    assert job.arm_job("base").model == phase_a.model == job.probe.model
    for arm in ("rl", "fst"):
        assert job.arm_job(arm).model == f"{phase_a.output_dir}/{arm}/hf"
    assert len({job.arm_job(a).output_dir for a in job.arms}) == 3
    assert job.probe.task != phase_a.task


def test_fst_distill_cpu_distils_the_math_cpu_comparisons_fst_run_and_says_how_to_run_it():
    path = EXPERIMENTS / "fst_distill_cpu.yaml"
    cfg = load_config(DistillConfig, path)
    assert cfg.run_dir == f"{_load('math_cpu.yaml').output_dir}/fst" != cfg.output_dir
    command = "fst-distill --config experiments/fst_distill_cpu.yaml"
    assert command in path.read_text()


def test_star_graph_configs_use_reasoning_gyms_path_star():
    assert _load("star_graph_cpu.yaml").task == _load("star_graph_pod.yaml").task == "rg:path_star"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fst_jax.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=1200)


def test_train_dry_run_prints_bytes_and_exits_nonzero_when_the_device_is_too_small():
    smoke = str(EXPERIMENTS / "smoke_fst.yaml")
    ok = _cli("train", "--config", smoke, "--dry-run", "target.devices=2", "mesh.fsdp=2",
              "target.device_memory_gib=1", "target.prompt_tokens=64")
    assert ok.returncode == 0, ok.stderr
    assert "fits:" in ok.stdout and "sampler_weights" in ok.stdout and "2 devices" in ok.stdout
    small = _cli("train", "--config", smoke, "--dry-run", "target.device_memory_gib=0.0001")
    assert small.returncode == 1 and "over the 0.0001 GiB configured" in small.stderr
    unset = _cli("train", "--config", smoke, "--dry-run")
    assert unset.returncode == 1 and "target.device_memory_gib is not set" in unset.stderr


def test_plasticity_dry_run_is_the_probes_on_its_target():
    tiny = (str(EXPERIMENTS / "plasticity_cpu.yaml"), "--dry-run", "probe.model=tiny:llama",
            "probe.target.devices=2", "probe.mesh.fsdp=2", "probe.target.prompt_tokens=64")
    ok = _cli("plasticity", "--config", *tiny, "probe.target.device_memory_gib=1")
    assert ok.returncode == 0, ok.stderr
    assert "fits:" in ok.stdout and "2 devices" in ok.stdout and "rollout_decode" in ok.stdout
    small = _cli("plasticity", "--config", *tiny, "probe.target.device_memory_gib=0.0001")
    assert small.returncode == 1 and "over the 0.0001 GiB configured" in small.stderr


def test_codeio_pod_dry_run_fits_an_8_x_h100_node():
    from fst_jax.jobs.preflight import preflight

    # The config's documented H100 alternative to its TPU target (the fake-CPU compile).
    job = load_config(TrainJob, EXPERIMENTS / "codeio_pod.yaml",
                      ["target.topology=null", "target.device_memory_gib=72"])
    report = preflight(job)
    assert report["fits"] and report["num_devices"] == 8
    assert 8.1e9 < report["num_params"] < 8.3e9
    b = report["bytes"]
    # float32 master weights, the KL reference and the sampler's copy each split 8 ways.
    assert b["weights"] == b["reference"] == b["sampler_weights"]
    assert b["weights"] == pytest.approx(4 * report["num_params"] / 8, rel=1e-3)
    assert report["total_bytes"] <= 72 * GIB
    # The sampler's requests are compiled too: their caches come on top of the resident state.
    sampler = {f"{g}_{p}" for g in ("rollout", "eval", "reflection") for p in ("prefill", "decode")}
    assert sampler <= set(report["programs"])
    assert report["total_bytes"] == max(p["peak_bytes"] for p in report["programs"].values())
    print(json.dumps({k: round(v / GIB, 2) for k, v in b.items()} | {
        "total_gib": round(report["total_bytes"] / GIB, 2)}))


def test_pod_dry_run_compiles_the_rollout_the_largest_eval_call_and_the_reflection_requests():
    from fst_jax.dryrun import GenerateShape
    from fst_jax.jobs.preflight import _largest_call, generate_shapes

    job = _load("codeio_pod.yaml")
    rollout, ev, reflection = generate_shapes(job)
    # K = 4 contexts x 32 problems x 2 samples; prompts of 2048 tokens, up to 1024 of context.
    assert rollout == GenerateShape("rollout", 4, 32, 2, 1024, 1024, 1024)
    # 256 examples x (best, original) in calls of 64 prompts, each prompt's greedy, k = 4 and KL
    # samples in one request (the OOD examples are requests of their own, fewer samples).
    assert ev == GenerateShape("eval", 2, 32, 1 + 4 + job.eval.kl_samples, 1024, 1024, 1024)
    assert reflection == GenerateShape("reflection", 1, job.fast.gepa.parallel_proposals, 1, 256, 8192, 2048)
    # the call with the most slots (powers of two, a multiple of the devices rows shard over)
    assert _largest_call([["a", "b"] * 2 + ["a"], ["ood"] * 3], 1) == (2, 3)
    assert _largest_call([["a"], ["a", "b", "a"]], 2) == (2, 2)
    rl = generate_shapes(dataclasses.replace(job, mode="rl"))
    assert rl[0] == GenerateShape("rollout", 1, 32, 8, 1024, 1024, 1024) and len(rl) == 2

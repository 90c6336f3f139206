"""FST-distill (fst_jax/jobs/distill.py) on a tiny finished fst run folder: the reverse-KL step
against NumPy, its behaviour over steps, the run folder checks and the whole job."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from fst_jax.cli import distill_main
from fst_jax.config import ConfigError, load_config, save_config
from fst_jax.fast.candidates import Member
from fst_jax.jobs.distill import (DistillConfig, distill_batch, init_distill_state, load_sampler,
                                  make_distill_step, read_run, reverse_kl, run_distill)
from fst_jax.jobs.train import TrainJob
from fst_jax.metrics import read_jsonl
from fst_jax.models.loading import load_model
from fst_jax.models.weights import load_hf_folder, save_hf_folder
from fst_jax.tasks import make_task
from coin_task import NAME as COIN_TASK

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke_fst.yaml"
EVOLVED = "Answer with the number only."


def make_run_folder(folder: Path, mode: str = "fst", hf: bool = True,
                    contexts: bool = True) -> Path:
    """What a finished smoke run leaves (``jobs/train._finish``): config.yaml, hf/ (the tiny
    model's weights) and contexts.json (GEPA members, best first)."""
    folder.mkdir(parents=True, exist_ok=True)
    job = load_config(TrainJob, SMOKE, [f"output_dir={folder}", f"task={COIN_TASK}", f"mode={mode}",
                                        "export_hf=true", "logging.tensorboard=false"])
    save_config(job, folder / "config.yaml")
    if hf:
        save_hf_folder(load_model(job.model, seed=job.seed)[0], folder / "hf")
    if contexts:
        members = [Member(3, {"context": EVOLVED}, "reflection", [0], 2, 1),
                   Member(0, {"context": "Be brief."}, "carried", [], 0)]
        (folder / "contexts.json").write_text(json.dumps([dataclasses.asdict(m) for m in members]))
    return folder


def distill_config(run_dir, output_dir, *overrides) -> DistillConfig:
    return load_config(DistillConfig, None, [
        f"run_dir={run_dir}", f"output_dir={output_dir}", "steps=2", "problems_per_step=2",
        "samples_per_problem=2", "max_new_tokens=6", "optimizer.lr=1e-3", "kl_chunk=4",
        "eval.num_examples=2", "eval.k=1", "logging.tensorboard=false", "logging.progress=false",
        *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("fst_run"))


@pytest.fixture(scope="module")
def setup(run_dir):
    """The run's sampler, and one fixed batch: 2 problems x 2 samples of the student with the
    original prompt (rows padded to the 8 fake devices), teacher rows with the evolved context."""
    cfg = distill_config(run_dir, run_dir.parent / "unused")
    sampler = load_sampler(read_run(run_dir), cfg)
    task = make_task(COIN_TASK)
    problems = task.examples("train", 2, seed=0)
    samples = sampler.generate(sampler.params,
                               sampler.encode([(task.original_prompt, p.prompt) for p in problems]),
                               n=2, seed=0)
    batch = distill_batch(samples, sampler.encode([(EVOLVED, p.prompt) for p in problems]), 8)
    return cfg, sampler, task, problems, samples, batch


@pytest.fixture(scope="module")
def stepped(setup):
    """Five distillation steps on the fixed batch: their losses, and the teacher's and student's
    weights before and after."""
    _, sampler, *_, batch = setup
    cfg = distill_config("run", "out", "optimizer.lr=2e-5")  # Adam's steps overshoot a KL this small at 1e-4
    teacher = sampler.params
    host = lambda tree: [np.array(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    teacher_before = host(teacher)
    state = init_distill_state(teacher, cfg.optimizer, sampler.mesh)
    step = make_distill_step(sampler.graphdef, state, teacher, cfg.optimizer, sampler.mesh,
                             cfg.kl_chunk)
    metrics = []
    for _ in range(5):
        state, m = step(state, teacher, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return metrics, teacher_before, host(teacher), host(state.params)


def numpy_reverse_kl(sampler, problems, samples, student_ctx, teacher_ctx):
    """Each row on its own, unpadded: ``[context + task | completion]`` through the full model,
    float64 log-softmaxes, the KL at every completion token; the mean over all of them."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    model = nnx.merge(sampler.graphdef, sampler.params)

    def logp(context, question, completion):
        prompt = sum(sampler.tokenizer.encode(context, question), ())
        ids = np.array([list(prompt) + list(completion)], np.int32)
        n = len(completion)
        logits = model(ids, np.arange(ids.shape[1], dtype=np.int32)[None], np.ones_like(ids, bool))
        return log_softmax(logits[0, len(prompt) - 1:len(prompt) - 1 + n])

    kls = []
    for r in range(samples.tokens.shape[0]):
        y = samples.tokens[r, :samples.lengths[r]]
        question = problems[r // samples.n].prompt
        ls, lt = logp(student_ctx, question, y), logp(teacher_ctx, question, y)
        kls.extend((np.exp(ls) * (ls - lt)).sum(-1))
    return float(np.mean(kls))


def test_reverse_kl_equals_numpy_kl_of_student_with_original_to_teacher_with_context(setup):
    cfg, sampler, task, problems, samples, batch = setup
    loss, count = reverse_kl(sampler.graphdef, sampler.params, sampler.params, batch, chunk=4)
    assert int(count) == samples.lengths.sum() > 0
    want = numpy_reverse_kl(sampler, problems, samples, task.original_prompt, EVOLVED)
    assert want > 1e-4  # a tiny random model barely reads its system prompt
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_reverse_kl_is_zero_when_the_teacher_context_is_the_original_prompt(setup):
    cfg, sampler, task, problems, samples, _ = setup
    original = sampler.encode([(task.original_prompt, p.prompt) for p in problems])
    same = distill_batch(samples, original, 8)
    loss, _ = reverse_kl(sampler.graphdef, sampler.params, sampler.params, same, chunk=4)
    assert abs(float(loss)) < 1e-6


def test_distillation_steps_lower_the_kl_on_a_fixed_batch(stepped, setup):
    metrics, *_ = stepped
    kls = [m["kl"] for m in metrics]
    assert all(m["applied"] == 1 for m in metrics)
    assert all(b < a for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.5 * kls[0]
    assert metrics[0]["tokens"] == setup[4].lengths.sum()


def test_distillation_steps_leave_the_teacher_bit_identical_and_move_the_student(stepped):
    _, teacher_before, teacher_after, student = stepped
    assert all(np.array_equal(a, b) for a, b in zip(teacher_before, teacher_after))
    assert any(not np.array_equal(a, b) for a, b in zip(teacher_before, student))


@pytest.mark.parametrize("broken, message", [
    (dict(hf=False), "no exported weights"), (dict(contexts=False), "no contexts.json"),
    (dict(mode="rl"), "mode 'rl' run")])
def test_run_dir_without_weights_or_contexts_or_of_mode_rl_is_a_clear_config_error(
        tmp_path, broken, message):
    folder = make_run_folder(tmp_path / "run", **broken)
    with pytest.raises(ConfigError, match=message) as e:
        run_distill(distill_config(folder, tmp_path / "out"))
    assert str(folder) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_distill_reports_a_missing_run_folder_in_one_line_and_rejects_bad_config(tmp_path, capsys):
    assert distill_main([f"run_dir={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no config.yaml" in err and len(err.splitlines()) == 1
    assert distill_main(["steps=0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="output_dir"):
        DistillConfig(run_dir="runs/x", output_dir="runs/x")


def test_run_distill_logs_each_step_and_writes_eval_before_after_and_teacher(run_dir, tmp_path):
    out = tmp_path / "distill"
    summary = run_distill(distill_config(run_dir, out))
    steps = read_jsonl(out / "steps.jsonl")
    assert [r["step"] for r in steps] == [0, 1]
    assert all({"kl", "completion_tokens", "seconds_total", "grad_norm"} <= set(r) for r in steps)
    result = json.loads((out / "result.json").read_text())
    assert result == json.loads(json.dumps(summary))
    assert (result["kl_first"], result["kl_last"]) == (steps[0]["kl"], steps[-1]["kl"])
    for key in ("before", "after", "teacher"):
        assert {"eval/pass@1", "eval/mean@1"} <= set(result[key])
    assert result["before"]["eval/kl_to_base"] == 0.0 < result["after"]["eval/kl_to_base"]
    original = make_task(COIN_TASK).original_prompt
    assert result["contexts"] == {"student": original, "teacher": EVOLVED}
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 2]
    # the exported student loads, and is not the run's weights
    run_w = jax.tree.leaves(nnx.state(load_hf_folder(run_dir / "hf")[1]))
    new_w = jax.tree.leaves(nnx.state(load_hf_folder(result["hf_folder"])[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(run_w, new_w))


def test_run_distill_stopped_midway_resumes_to_the_uninterrupted_runs_weights_and_logs(run_dir, tmp_path):
    whole = run_distill(distill_config(run_dir, tmp_path / "whole", "steps=3", "eval.every=2"))
    out = tmp_path / "sliced"
    cfg = distill_config(run_dir, out, "steps=3", "eval.every=2", "checkpoint.save_every_steps=0")
    first = run_distill(cfg, max_steps_this_run=2)
    assert first["steps_done"] == 2 and first["after"] is None and not (out / "result.json").exists()
    assert [r["step"] for r in read_jsonl(out / "steps.jsonl")] == [0, 1]
    changed = distill_config(run_dir, out, "steps=3", "eval.every=2", "checkpoint.save_every_steps=0",
                             "optimizer.lr=0.5")
    with pytest.raises(ConfigError, match=r"changed at optimizer\.lr \("):
        run_distill(changed)  # a changed learning rate is another run, not this one resumed
    resumed = run_distill(cfg)
    assert resumed["steps_done"] == 3
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]  # noqa: E731
    for name in ("steps.jsonl", "eval.jsonl"):
        assert strip(read_jsonl(out / name)) == strip(read_jsonl(tmp_path / "whole" / name))
    for key in ("kl_first", "kl_last", "before", "after", "teacher", "completion_tokens"):
        assert resumed[key] == whole[key]
    a = jax.tree.leaves(nnx.state(load_hf_folder(whole["hf_folder"])[1]))
    b = jax.tree.leaves(nnx.state(load_hf_folder(resumed["hf_folder"])[1]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))

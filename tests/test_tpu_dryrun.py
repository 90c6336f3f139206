"""The dry run on a TPU slice (libtpu's compiler, no TPU attached), the FLOPs formulas against
XLA's own count on a loop-free model, and the roofline arithmetic on a hand-computed matmul."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from fst_jax.config import ConfigError
from fst_jax.dryrun import (GIB, DryRunError, GenerateShape, _cost, check_fits, collective_bytes,
                            collective_sizes, dry_run, format_report)
from fst_jax.jobs.preflight import TargetConfig
from fst_jax.models import configs
from fst_jax.rl.kl import KLConfig
from fst_jax.rl.train_step import LearnerConfig
from fst_jax.roofline import decode_step_flops, prefill_flops, train_step_flops
from fst_jax.sampling import SamplingConfig
from fst_jax.sharding import MeshConfig
from fst_jax.tpu import CHIPS, INSTALL, parse_topology

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu cannot be imported (pip install -e '.[tpu]')")
SAMPLING = SamplingConfig(prompt_buckets=(32, 64), max_context_tokens=32)


def test_roofline_of_a_matmul_is_the_larger_of_its_compute_and_memory_times():
    M, K, N = 256, 512, 1024
    f = jax.jit(lambda a, b: a @ b).lower(jax.ShapeDtypeStruct((M, K), jnp.float32),
                                          jax.ShapeDtypeStruct((K, N), jnp.float32)).compile()
    v5e = parse_topology("v5e:2x2")
    cost = _cost(f, 2 * M * K * N, 4 * (M * K + K * N + M * N), v5e)
    assert cost["xla_flops"] == 2 * M * K * N
    assert cost["bytes"] >= 4 * (M * K + K * N + M * N)
    # 268 MFLOP at 197 TFLOP/s = 1.36 us; >= 3.67 MB at 819 GB/s >= 4.48 us: memory-bound.
    assert cost["roofline_seconds"] == pytest.approx(max(2 * M * K * N / 197e12, cost["bytes"] / 819e9))
    assert cost["roofline_seconds"] >= 3.67e6 / 819e9 > 2 * M * K * N / 197e12
    big = _cost(f, 2 * 8192 ** 3, 3 * 2 * 8192 ** 2, v5e)  # an 8192^3 matmul is compute-bound
    assert big["roofline_seconds"] == pytest.approx(2 * 8192 ** 3 / 197e12)


def test_collective_sizes_count_every_result_of_every_collective_in_the_hlo():
    hlo = ("  %a = f32[8,512]{1,0:T(8,128)} all-reduce(%x), channel_id=1\n"
           "  %b = (bf16[4,2]{1,0}, bf16[32,2]{1,0}) all-gather-start(%y)\n"
           "  %c = s32[2,2]{1,0} reduce-scatter(%z)\n  %d = pred[3]{0} all-to-all(%w)\n"
           "  %e = f32[1000]{0} add(%a, %a)\n  %f = (f32[4]{0}, f32[2,2]{1,0}) all-reduce(%u, %v)\n"
           "  %g = (bf16[1,8]{1,0}, bf16[1,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%q)\n")
    # A -start: its result; a combined all-reduce: each of its results.
    assert collective_sizes(hlo) == [8 * 512 * 4, 32 * 2 * 2, 2 * 2 * 4, 3, 4 * 4, 2 * 2 * 4, 8 * 2]
    assert collective_bytes(hlo) == sum(collective_sizes(hlo))


def test_loop_collectives_are_those_of_while_bodies_conditions_and_what_they_call():
    hlo = ("%fused (p: f32[4]) -> f32[4] {\n  %ag = f32[4]{0} all-gather(%p), dimensions={0}\n}\n"
           "%body (s: (s32[])) -> (s32[]) {\n  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused\n"
           "  %r = f32[2]{0} all-reduce(%y), to_apply=%add\n}\n"
           "%cond (s: (s32[])) -> pred[] {\n  %c = pred[]{:T(128)} all-reduce(%z), to_apply=%or\n}\n"
           "ENTRY %main (a: f32[8]) -> f32[8] {\n  %top = f32[8]{0} all-gather(%a), dimensions={0}\n"
           "  %w = (s32[]) while(%t), condition=%cond, body=%body\n}\n")
    assert collective_sizes(hlo) == [16, 8, 1, 32]
    assert collective_sizes(hlo, in_loops=True) == [16, 8, 1]


def test_two_processes_can_compile_for_a_tpu_topology_at_once():
    import os
    import subprocess
    import sys

    from fst_jax.tpu import runtime_env

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu cannot be imported (pip install -e '.[tpu]')")
    code = ("import sys, time; from fst_jax.tpu import topology_devices; "
            "print(len(topology_devices('v5e:2x2')), flush=True); time.sleep(float(sys.argv[1]))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **runtime_env(parse_topology("v5e:2x2"))}
    first = subprocess.Popen([sys.executable, "-c", code, "30"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "4"  # it holds libtpu from here on
        second = subprocess.run([sys.executable, "-c", code, "0"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 0, second.stderr[-2000:]
        assert second.stdout.strip() == "4"
    finally:
        first.kill()
        first.wait()


def test_flops_formulas_match_xla_on_a_model_without_loops():
    # One layer, one micro-batch, one new token: no loop body for XLA to count only once.
    cfg = configs.tiny("llama", num_layers=1, hidden_size=256, intermediate_size=512, vocab_size=512,
                       head_dim=64)
    g = GenerateShape("rollout", contexts=2, prompts_per_context=2, samples=2, context_tokens=32,
                      task_tokens=32, new_tokens=1)
    report = dry_run(cfg, LearnerConfig(kl=KLConfig(beta=0.0)), MeshConfig(fsdp=2), 2, 4, 64, 1.0,
                     sampling=SAMPLING, generate=(g,))
    p = report["programs"]
    assert p["train_step"]["flops"] == train_step_flops(cfg, 0.0, 4, 64) / 2
    assert p["rollout_prefill"]["flops"] == prefill_flops(cfg, 2, 2, 32, 32) / 2
    assert p["rollout_decode"]["flops"] == decode_step_flops(cfg, 8, 32 + 32 + 1) / 2
    # With one layer XLA drops the contexts' work after their keys and values (nothing reads
    # it); with the layers scanned every layer does it, as the formula counts.
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    D, F = cfg.hidden_size, cfg.intermediate_size
    dead = 2 * 32 * (2 * (2 * D * q + 3 * D * F) + 4 * 32 * q) / 2
    live = {"train_step": p["train_step"]["flops"], "rollout_decode": p["rollout_decode"]["flops"],
            "rollout_prefill": p["rollout_prefill"]["flops"] - dead}
    for name, flops in live.items():
        # XLA also counts the element-wise work (norms, softmax, optimizer): a little more.
        assert 1.0 <= p[name]["xla_flops"] / flops < 1.3, name


def test_target_topology_sets_devices_and_memory_from_the_chip_table():
    t = TargetConfig(devices=8, topology="v5p:2x2x2")
    assert t.memory_gib == pytest.approx(95e9 / GIB)
    assert TargetConfig(devices=16, topology="v4:2x2x2").memory_gib == pytest.approx(16.0)
    assert parse_topology("v6e:2x4").accelerator_type == "v6e-8"
    assert parse_topology("v5p:2x2x2").accelerator_type == "v5p-16"
    assert CHIPS["v6e"].bf16_flops == 918e12
    with pytest.raises(ConfigError, match="topology v5p:2x2x2 has 8"):
        TargetConfig(devices=4, topology="v5p:2x2x2")
    with pytest.raises(ConfigError, match="chip 'v9' is not one of"):
        TargetConfig(devices=4, topology="v9:2x2")


def test_a_missing_libtpu_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'") as e:
        dry_run(configs.tiny("llama"), LearnerConfig(), MeshConfig(fsdp=4), 4, 4, 32, None,
                topology="v5e:2x2")
    assert str(e.value) == INSTALL


@needs_libtpu
def test_tiny_train_step_and_sampler_programs_compile_for_v5e_2x2():
    cfg = configs.tiny("qwen3")
    # 16 x 256 x 32 rows x 2048 new tokens of keys and values: 2 x 2 layers x 131072 x 2 kv heads
    # x 2048 x 24 x 4 bytes = 206 GB of per-sample caches, over 50 GB per chip of v5e's 16.
    shapes = (GenerateShape("rollout", 2, 4, 2, 32, 32, 16), GenerateShape("eval", 2, 8, 1, 32, 32, 16),
              GenerateShape("reflection", 1, 2, 1, 32, 64, 32))
    report = dry_run(cfg, LearnerConfig(micro_batches=2), MeshConfig(fsdp=4), 4, 8, 64, None,
                     sampling=SAMPLING, generate=shapes, sampler_copy=True, topology="v5e:2x2")
    assert report["compiler"] == "TPU compiler (libtpu) for v5e:2x2"
    assert report["device_memory_bytes"] == int(16e9)
    p = report["programs"]
    assert set(p) == {"train_step"} | {f"{g.name}_{x}" for g in shapes for x in ("prefill", "decode")}
    assert all(q["roofline_seconds"] > 0 and q["xla_bytes"] > 0 for q in p.values())
    assert p["rollout_decode"]["bytes_over_floor"] > 0
    assert "TPU compiler" in format_report(report) and "roofline" in format_report(report)
    # A v5e chip holds 16 GB; the program's peak must stay under the published figure.
    with pytest.raises(DryRunError, match=r"\(train_step: \d+ bytes\), over the 0\.0001"):
        check_fits(report, 1e-4)


@needs_libtpu
def test_fsdp_train_step_keeps_rows_on_their_chips_so_no_collective_exceeds_a_weight():
    # FSDP 8 on v5p:2x2x2, 8-row micro-batches: each chip holds one row. Its activations and
    # logits stay there; only weights (gathered) and their gradients (reduced) cross chips. A
    # [8, 32, 128] float32 logits chunk (131 kB) or [8, 64, 96] MLP activation (197 kB) in a
    # collective means a chip computed partial results for every row of the micro-batch.
    from fst_jax.models.transformer import init_model

    cfg = configs.tiny("qwen3")
    weight = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(lambda: init_model(cfg))))
    report = dry_run(cfg, LearnerConfig(micro_batches=2, logits_chunk=32), MeshConfig(fsdp=8), 8, 16,
                     64, None, topology="v5p:2x2x2")
    assert 0 < report["programs"]["train_step"]["xla_largest_collective_bytes"] <= weight


@needs_libtpu
def test_fsdp_sampler_gathers_the_weights_once_so_none_cross_chips_at_each_token():
    # FSDP 8 on v5p:2x2x2: every token step of the decode loop reads every weight. Gathered
    # inside the loop, a layer's weights (each over 6 kB here) cross chips at every token; gathered
    # once per request (Sampler.gathers), only the loop's stop flag does (under one [16 rows, 64]
    # bf16 block), and the decode takes the whole weights as its argument.
    from fst_jax.models.transformer import init_model

    cfg = configs.tiny("qwen3")
    model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(lambda: init_model(cfg))))
    report = dry_run(cfg, LearnerConfig(), MeshConfig(fsdp=8), 8, 8, 64, None, sampling=SAMPLING,
                     generate=(GenerateShape("rollout", 2, 4, 2, 32, 32, 16),), topology="v5p:2x2x2")
    decode = report["programs"]["rollout_decode"]
    assert decode["xla_collective_bytes"] < 16 * 64 * 2
    assert decode["argument_size_in_bytes"] >= model_bytes


@needs_libtpu
def test_a_batch_too_large_for_its_slice_is_refused_naming_the_program_and_its_bytes():
    # 4096 rows of 4096 tokens: terabytes of activations per v5e chip of 16 GB. The TPU compiler
    # itself refuses the program.
    with pytest.raises(DryRunError, match=r"train_step does not fit: .*temporaries "
                                          r"\(\d+\.\d+[GT]\) exceeds available HBM"):
        dry_run(configs.tiny("llama"), LearnerConfig(), MeshConfig(fsdp=4), 4, 4096, 4096, None,
                topology="v5e:2x2")


def test_forecast_prices_each_phase_of_the_loop_from_the_programs_roofline_times():
    from fst_jax.config import load_config
    from fst_jax.forecast import format_forecast, forecast
    from fst_jax.jobs.preflight import batch_shape, eval_requests, generate_shapes
    from fst_jax.jobs.train import TrainJob

    job = load_config(TrainJob, Path(__file__).parents[1] / "experiments" / "codeio_pod.yaml")
    seconds = {"train_step": 3.0, "rollout_prefill": 1.0, "rollout_decode": 9.0, "eval_prefill": 2.0,
               "eval_decode": 14.0, "reflection_prefill": 0.5, "reflection_decode": 4.5}
    rows, tokens = batch_shape(job)
    report = {"programs": {k: {"roofline_seconds": v} for k, v in seconds.items()},
              "batch_shape": [rows, tokens], "num_params": 8_000_000_000}
    f = forecast(job, report)
    assert f["rl_step"] == {"rollout": 10.0, "train": 3.0, "total": 13.0}
    calls, samples = eval_requests(job)  # 512 main prompts, then 256 OOD, in calls of <= 64
    assert len(calls) == 8 + 4 and samples == 1 + job.eval.k + job.eval.kl_samples
    assert f["evaluation"] == pytest.approx(len(calls) * 16.0)
    ev = {g.name: g for g in generate_shapes(job)}["eval"]
    g = job.fast.gepa  # 960 metric calls + 4 contexts re-scored on 32 x 6 anchor problems
    assert f["gepa_round"]["metric_calls"] == 960 + 4 * 32 * 6
    per_completion = 16.0 / (ev.contexts * ev.prompts_per_context * ev.samples)
    assert f["gepa_round"]["scoring"] == pytest.approx(f["gepa_round"]["metric_calls"] * per_completion)
    assert f["gepa_round"]["proposals"] == min(g.max_proposals, 960 // (2 * g.minibatch_size))
    assert f["cycle"] == pytest.approx(6 * 13.0 + f["gepa_round"]["total"] + f["evaluation"] * 6 / 30)
    assert f["run"]["total"] == pytest.approx(1500 * 13.0 + 250 * f["gepa_round"]["total"] + 50 * f["evaluation"])
    # 6 x 8e9 x 256 x 3072 tokens over 8 chips in 3 s at 459 TFLOP/s each
    assert f["train_mfu"] == pytest.approx(6 * 8e9 * rows * tokens / 8 / (3.0 * 459e12))
    assert "not a measurement" in format_forecast(f)

"""Memory dry run: exact state bytes per device, the AOT-compiled step, and the too-big error."""

import pytest

from fst_jax.config import ConfigError
from fst_jax.dryrun import GIB, DryRunError, check_fits, dry_run, format_report
from fst_jax.models import configs
from fst_jax.rl.kl import KLConfig
from fst_jax.rl.train_step import LearnerConfig
from fst_jax.sharding import MeshConfig


def test_tiny_dry_run_counts_fsdp_sharded_weights_reference_and_adam_moments():
    cfg = configs.tiny("llama")
    report = dry_run(cfg, LearnerConfig(kl=KLConfig(beta=0.01)), MeshConfig(fsdp=2),
                     num_devices=2, batch_rows=4, seq_len=32, device_memory_gib=1.0)
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norms = 2 * L * D + D  # replicated; every other weight has an "embed" axis split in two
    sharded = V * D + L * (D * q + 2 * D * kv + q * D + 3 * D * F)
    assert report["num_params"] == sharded + norms
    weights = 4 * (sharded // 2 + norms)
    b = report["bytes"]
    assert b["weights"] == b["reference"] == weights
    assert 2 * weights <= b["optimizer"] <= 2 * weights + 64  # Adam mu, nu (+ step counters)
    assert b["lora"] == 0
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert set(report["programs"]) == {"train_step"}
    step = report["programs"]["train_step"]
    assert step["temp_size_in_bytes"] > 0
    assert report["total_bytes"] >= sum(b.values()) + step["temp_size_in_bytes"]
    assert report["fits"] and "GiB" in format_report(report)


def test_qwen3_8b_fsdp8_fits_an_h100_and_a_small_device_gets_a_clear_error():
    learner = LearnerConfig(kl=KLConfig(beta=0.001), micro_batches=4, logits_chunk=512)
    report = dry_run(configs.QWEN3_8B, learner, MeshConfig(fsdp=8), num_devices=8,
                     batch_rows=32, seq_len=1024, device_memory_gib=80.0)
    assert 8.1e9 < report["num_params"] < 8.3e9
    # float32 master weights split 8 ways; only the norms (under 0.01%) are replicated.
    assert report["bytes"]["weights"] == pytest.approx(4 * report["num_params"] / 8, rel=1e-3)
    assert report["bytes"]["optimizer"] == pytest.approx(2 * report["bytes"]["weights"], rel=1e-6)
    assert report["fits"] and report["total_bytes"] < 80 * GIB
    with pytest.raises(DryRunError, match=r"over the 16.0 GiB configured.*weights 3\.8"):
        check_fits(report, 16.0)


def test_dry_run_rejects_a_mesh_that_does_not_fill_the_devices():
    with pytest.raises(ConfigError, match="does not fill 8 devices"):
        dry_run(configs.tiny("llama"), LearnerConfig(), MeshConfig(data=1, fsdp=4), 8, 8, 32, 1.0)


def test_sampler_programs_count_the_kv_caches_of_each_request_and_a_too_large_one_is_refused():
    from fst_jax.dryrun import GenerateShape
    from fst_jax.sampling import SamplingConfig

    cfg = configs.tiny("llama")
    sampling = SamplingConfig(prompt_buckets=(32, 64), max_context_tokens=32)
    small = GenerateShape("rollout", contexts=2, prompts_per_context=4, samples=2, context_tokens=32,
                          task_tokens=32, new_tokens=16)
    big = GenerateShape("eval", contexts=2, prompts_per_context=64, samples=8, context_tokens=32,
                        task_tokens=64, new_tokens=256)
    report = dry_run(cfg, LearnerConfig(), MeshConfig(fsdp=2), num_devices=2, batch_rows=4, seq_len=32,
                     device_memory_gib=1.0, sampling=sampling, generate=(small, big), sampler_copy=True)
    p = report["programs"]
    assert set(p) == {"train_step", "rollout_prefill", "rollout_decode", "eval_prefill", "eval_decode"}
    b = report["bytes"]
    assert b["sampler_weights"] == b["weights"]
    resident = sum(b.values())
    # The per-sample caches of 2 x 64 prompts x 8 samples x 256 new tokens, split over 2 devices:
    L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    suffix = 2 * L * (2 * 64 * 8 // 2) * K * 256 * hd * 4
    assert p["eval_decode"]["temp_size_in_bytes"] >= suffix
    assert p["eval_decode"]["peak_bytes"] >= resident + suffix > p["rollout_decode"]["peak_bytes"]
    # The prompt caches come out of the prefill and into the decode, on top of the resident state.
    prompt_cache = 2 * L * (2 * 64 // 2) * K * 64 * hd * 4
    assert p["eval_decode"]["argument_size_in_bytes"] >= prompt_cache
    assert report["total_bytes"] == max(q["peak_bytes"] for q in p.values()) == p["eval_decode"]["peak_bytes"]
    with pytest.raises(DryRunError, match="eval_decode temporaries"):
        check_fits(report, 0.9 * report["total_bytes"] / GIB)

"""Test session setup: 8 fake CPU devices, no hub access, deterministic float32 matmuls."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The 8 fake devices' collectives wait for each other's threads; on two busy cores a wait can pass
# XLA's default limit, which aborts the whole worker ("Fatal Python error: Aborted").
if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
    flags += " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

"""TPU slices that are not there: the chip table and compile-only devices from libtpu.

``parse_topology("v5p:2x2x2")`` names a slice (chip generation and its chip grid);
``topology_devices(name)`` gives that slice's devices for ahead-of-time compiles
(``jax.experimental.topologies.get_topology_desc``, the way MaxText's ``train_compile.py`` works):
``jit(f).lower(...).compile()`` over a mesh of them runs the real TPU compiler with no TPU
attached. ``runtime_env`` is what the compiling process sets so libtpu does not look for a TPU
host (metadata server, worker addresses). A missing libtpu raises ``ConfigError`` with the one
line to install it.

``CHIPS``: each chip generation's published per-chip peaks, from the Google Cloud TPU system
architecture pages (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): bf16
peak FLOP/s, HBM bandwidth and HBM capacity. v4's libtpu exposes each TensorCore of a chip as a
device (``devices_per_chip=2``); v5e, v5p (megacore) and v6e one device per chip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

from fst_jax.config import ConfigError, require

GB = 1e9
GIB = 1024 ** 3
INSTALL = "libtpu is not installed: pip install -e '.[tpu]' (brings jax[tpu])"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: ``bf16_flops`` (FLOP/s), ``hbm_bandwidth`` (bytes/s), ``hbm_bytes``
    per chip; ``accelerator``: the prefix of its Cloud accelerator type, whose number counts
    TensorCores (``cores_per_chip`` each) for v4/v5p and chips otherwise."""

    name: str
    bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    accelerator: str
    cores_per_chip: int = 1
    devices_per_chip: int = 1


# Published per-chip figures (Cloud TPU docs, system architecture tables; GB = 1e9 bytes).
CHIPS: dict[str, Chip] = {
    # v4: 275 TFLOPs bf16, HBM2 32 GiB at 1200 GBps (cloud.google.com/tpu/docs/v4)
    "v4": Chip("v4", 275e12, 1200 * GB, 32 * GIB, "v4", cores_per_chip=2, devices_per_chip=2),
    # v5e: 197 TFLOPs bf16, HBM2 16 GB at 819 GBps (cloud.google.com/tpu/docs/v5e)
    "v5e": Chip("v5e", 197e12, 819 * GB, 16 * GB, "v5litepod"),
    # v5p: 459 TFLOPs bf16, HBM2e 95 GB at 2765 GBps (cloud.google.com/tpu/docs/v5p)
    "v5p": Chip("v5p", 459e12, 2765 * GB, 95 * GB, "v5p", cores_per_chip=2),
    # v6e (Trillium): 918 TFLOPs bf16, HBM 32 GB at 1640 GBps (cloud.google.com/tpu/docs/v6e)
    "v6e": Chip("v6e", 918e12, 1640 * GB, 32 * GB, "v6e"),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice of ``chip`` shaped ``dims`` (chips along each axis)."""

    chip: Chip
    dims: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def device_memory_bytes(self) -> float:
        return self.chip.hbm_bytes / self.chip.devices_per_chip

    @property
    def device_flops(self) -> float:
        return self.chip.bf16_flops / self.chip.devices_per_chip

    @property
    def device_bandwidth(self) -> float:
        return self.chip.hbm_bandwidth / self.chip.devices_per_chip

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.accelerator}-{self.chips * self.chip.cores_per_chip}"


def parse_topology(name: str) -> Slice:
    """``"<chip>:<a>x<b>[x<c>]"`` as a ``Slice``; ``ConfigError`` on an unknown chip or shape."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
    require(m is not None, f"topology {name!r}: expected <chip>:<a>x<b>[x<c>], e.g. v5p:2x2x2")
    require(m.group(1) in CHIPS, f"topology {name!r}: chip {m.group(1)!r} is not one of {sorted(CHIPS)}")
    dims = tuple(int(d) for d in m.group(2).split("x"))
    require(all(d >= 1 for d in dims), f"topology {name!r}: every dimension must be >= 1")
    return Slice(CHIPS[m.group(1)], dims)


def runtime_env(slice_: Slice) -> dict[str, str]:
    """Environment for a process that compiles for ``slice_`` without a TPU: no metadata-server
    query, a named accelerator type, one local worker, and no libtpu lockfile (which lets one
    process at a time load libtpu: concurrent dry runs, e.g. tests under xdist, would abort)."""
    return {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": slice_.accelerator_type,
            "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def require_libtpu() -> None:
    """``ConfigError`` with the install line when libtpu cannot be found."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(INSTALL)


def topology_devices(name: str) -> list:
    """The devices of slice ``name`` for compile-only use (this process needs ``runtime_env``)."""
    from jax.experimental import topologies

    slice_ = parse_topology(name)
    require_libtpu()
    devices = list(topologies.get_topology_desc(topology_name=slice_.name, platform="tpu").devices)
    if len(devices) != slice_.devices:
        raise ConfigError(f"libtpu gives {len(devices)} devices for {name}, the chip table "
                          f"{slice_.devices}")
    return devices

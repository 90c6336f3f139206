"""Device meshes and logical-axis sharding rules.

A mesh has three named axes, ``data``, ``fsdp`` and ``tensor`` (any may have size 1). Model
parameters carry ``logical_axes`` metadata (``layers``, ``embed``, ``heads``, ...) that
``LOGICAL_RULES`` maps to mesh axes; batches shard their leading axis over ``("data", "fsdp")``.
Meshes use ``AxisType.Auto`` so XLA propagates shardings through the jitted core.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fst_jax.config import require

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``data=-1`` takes all devices not used by fsdp and tensor."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        require(self.fsdp >= 1 and self.tensor >= 1, "mesh fsdp and tensor must be >= 1")
        require(self.data == -1 or self.data >= 1, "mesh data must be -1 or >= 1")

    def data_size(self, num_devices: int) -> int:
        """The data axis' size on ``num_devices`` devices (``-1``: those fsdp and tensor leave)."""
        return num_devices // (self.fsdp * self.tensor) if self.data == -1 else self.data


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data = config.data_size(n)
    require(data * config.fsdp * config.tensor == n,
            f"mesh data={data} x fsdp={config.fsdp} x tensor={config.tensor} != {n} devices")
    arr = np.array(devices).reshape(data, config.fsdp, config.tensor)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for logical ``axes``; a mesh axis that does not divide a dim is dropped."""
    spec = []
    used = set()
    for name, dim in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(name) if name else None
        if mesh_axis and mesh_axis not in used and dim % mesh.shape[mesh_axis] == 0:
            spec.append(mesh_axis)
            used.add(mesh_axis)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for any pytree (an ``nnx.State``, a ``TrainState``, a dict of them):
    every ``nnx.Variable`` (weights, LoRA adapters, and the optimizer moments that mirror them)
    by its ``logical_axes`` metadata (none: replicated), every other leaf replicated. Works on
    abstract trees (``jax.eval_shape``) too."""

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("logical_axes") or (None,) * len(x.shape)
            return x.replace(NamedSharding(mesh, logical_to_spec(tuple(axes), x.shape, mesh)))
        return replicated(mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def fsdp_gathered(state: Any, mesh: Mesh) -> Any:
    """``state_shardings`` with the ``fsdp`` axis dropped: every leaf whole on each fsdp device,
    still split over ``tensor``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, P(*(None if a == "fsdp" else a for a in s.spec))),
                        state_shardings(state, mesh))


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place a pytree on ``mesh`` per ``state_shardings``."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_devices(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many parts the batch axis is split into on ``mesh`` (its ``BATCH_AXES`` sizes' product)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for an array whose leading axis is the batch."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_rows(x: jax.Array) -> jax.Array:
    """``x`` constrained to its leading (batch) axis over ``BATCH_AXES`` of the mesh in context
    (``jax.sharding.use_abstract_mesh``; the jitted programs that take a mesh set it), the rest
    replicated: under FSDP each chip then computes its own rows with gathered weights, where
    XLA would otherwise follow the weights' ``embed`` sharding and all-reduce every row's
    activations. Unchanged without a mesh, when the axes do not divide the rows, or on a mesh
    with ``tensor > 1`` (there the compiler's choice stands: with rows pinned, XLA's CPU
    collectives over the mixed device groups deadlocked a data 2 x fsdp 2 x tensor 2 step)."""
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh.empty or mesh.shape["tensor"] > 1
            or x.shape[0] % batch_devices(mesh)):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def in_mesh(mesh: Mesh | None) -> Callable[[Callable], Callable]:
    """Decorator: trace the function with ``mesh`` as the abstract mesh in context (none: as
    is), so the model's ``shard_rows`` constraints keep each batch row on its own devices."""
    def wrap(fn):
        if mesh is None:
            return fn

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)
        return inner
    return wrap

"""One process of the local multi-process test, and the training run it is compared against.

Run as ``python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR`` with
``JAX_PLATFORMS=cpu``: joins the run, receives process 0's contexts, trains a tiny model for a few
steps on a batch sharded over every process's devices, checkpoints the final state with the
contexts as host state, and writes ``OUT_DIR/process_<id>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fst_jax import distributed, sharding
from fst_jax.checkpoint import CheckpointConfig, Checkpointer
from fst_jax.models.configs import tiny
from fst_jax.models.transformer import init_model, positions_from_mask

CONTEXTS = ["Answer with a number only.", "Think step by step, then answer.", "Réponds vite."]
STEPS = 4
GLOBAL_BATCH = 8
SEQ_LEN = 16


def global_tokens() -> np.ndarray:
    """The global batch every run trains on, ``[GLOBAL_BATCH, SEQ_LEN]`` int32."""
    return np.random.default_rng(0).integers(0, tiny().vocab_size, (GLOBAL_BATCH, SEQ_LEN),
                                             dtype=np.int32)


def train(mesh, steps: int = STEPS):
    """AdamW on next-token loss of a tiny model; returns (losses, params) after ``steps`` steps.

    The batch is laid out over the mesh's batch axes; each process supplies only its own rows.
    """
    graphdef, params = nnx.split(init_model(tiny(), seed=0))
    params = sharding.shard_state(params, mesh)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    batch_sharding = sharding.batch_sharding(mesh, 2)
    tokens = global_tokens()
    local_rows = sorted({i for idx in batch_sharding.addressable_devices_indices_map(
        tokens.shape).values() for i in range(*idx[0].indices(GLOBAL_BATCH))})
    batch = jax.make_array_from_process_local_data(batch_sharding, tokens[local_rows],
                                                   tokens.shape)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            inputs, mask = tokens[:, :-1], jnp.ones(tokens[:, :-1].shape, bool)
            logits = nnx.merge(graphdef, p)(inputs, positions_from_mask(mask), mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss.addressable_data(0)))
    return losses, params


def main(port: str, process_id: str, num_processes: str, out_dir: str) -> None:
    distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
    contexts = distributed.broadcast_host_object(CONTEXTS if distributed.is_primary() else None)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    losses, params = train(mesh)
    config = CheckpointConfig(directory=str(Path(out_dir) / "ckpt"), save_every_steps=0,
                              save_every_minutes=1e-9)  # clock rule: decided by process 0
    with Checkpointer(config) as ckpt:
        saved = ckpt.maybe_save(STEPS, {"params": params}, {"contexts": contexts})
    result = {"contexts": contexts, "losses": losses, "saved": saved,
              "process_count": jax.process_count(), "device_count": jax.device_count()}
    (Path(out_dir) / f"process_{process_id}.json").write_text(json.dumps(result))
    distributed.sync("multihost_worker_done")


if __name__ == "__main__":
    main(*sys.argv[1:])

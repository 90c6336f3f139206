"""One process of the local multi-process test, and the training run it is compared against.

Run as ``python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR`` with
``JAX_PLATFORMS=cpu``: joins the run, receives process 0's contexts, runs the project's train_step
(``make_train_step`` on a mesh over every process's devices) for a few steps on a batch built by
``build_train_batch`` whose rows each process supplies for its own devices, checkpoints the final
TrainState with the contexts as host state, and writes ``OUT_DIR/process_<id>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from fst_jax import distributed, sharding
from fst_jax.checkpoint import CheckpointConfig, Checkpointer
from fst_jax.models.configs import tiny
from fst_jax.models.transformer import init_model
from fst_jax.rl.batch import TrainBatch, build_train_batch, process_rows, to_global
from fst_jax.rl.kl import KLConfig
from fst_jax.rl.optimizer import OptimizerConfig
from fst_jax.rl.train_step import (LearnerConfig, TrainState, init_train_state,
                                   make_ref_logprobs, make_train_step)
from fst_jax.tasks.base import Example

CONTEXTS = ["Answer with a number only.", "Think step by step, then answer.", "Réponds vite."]
STEPS = 4
GLOBAL_BATCH = 8
SCORED_ROWS = 7  # rows scored by distributed.scored_by_slices (not divisible by 2 on purpose)
# The project's learner: CISPO with a k3 KL penalty to a reference copy, AdamW with warm-up.
CFG = LearnerConfig(kl=KLConfig(estimator="k3", beta=0.01),
                    optimizer=OptimizerConfig(lr=1e-2, warmup_steps=2))


def global_batch() -> TrainBatch:
    """The host batch every run trains on: 4 problems x 2 rows, rows alternating between two
    contexts (other prompt lengths), sampler log-probs a little off the policy's."""
    rng = np.random.default_rng(0)
    vocab = tiny().vocab_size
    contexts = [rng.integers(1, vocab, n) for n in (3, 7)]
    tasks = [rng.integers(1, vocab, rng.integers(2, 6)) for _ in range(GLOBAL_BATCH // 2)]
    prompts = [np.concatenate([contexts[i % 2], tasks[i // 2]]) for i in range(GLOBAL_BATCH)]
    comps = [rng.integers(1, vocab, rng.integers(3, 12)) for _ in range(GLOBAL_BATCH)]
    logps = [-rng.random(len(c)) * 3 for c in comps]
    return build_train_batch(prompts, comps, logps, [float(i % 2) for i in range(GLOBAL_BATCH)],
                             [i // 2 for i in range(GLOBAL_BATCH)],
                             [i % 2 for i in range(GLOBAL_BATCH)], pad_id=0)


def scalar(x: jax.Array) -> float:
    """A replicated scalar's value (also when it spans other processes' devices)."""
    return float(np.asarray(x.addressable_data(0)))


def train(mesh, steps: int = STEPS) -> tuple[list[float], TrainState]:
    """``steps`` calls of the project's train_step on the global batch, sharded over every
    process's devices of ``mesh``; returns (losses, final TrainState)."""
    graphdef, state = init_train_state(init_model(tiny(), seed=0), CFG, mesh, seed=0)
    train_step = make_train_step(graphdef, state, CFG, mesh)
    ref_logprobs = make_ref_logprobs(graphdef, state, CFG, mesh)
    batch = to_global(global_batch(), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = train_step(state, batch)
        losses.append(scalar(metrics["loss"]))
    return losses, state


def main(port: str, process_id: str, num_processes: str, out_dir: str) -> None:
    distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
    contexts = distributed.broadcast_host_object(CONTEXTS if distributed.is_primary() else None)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    losses, state = train(mesh)
    config = CheckpointConfig(directory=str(Path(out_dir) / "ckpt"), save_every_steps=0,
                              save_every_minutes=1e-9)  # clock rule: decided by process 0
    with Checkpointer(config) as ckpt:
        saved = ckpt.maybe_save(STEPS, state, {"contexts": contexts})
    seen = []

    def score(examples, completions):  # records which rows this process scored
        seen.extend(examples)
        return [(float(x) / 10, f"row {x}: {c}") for x, c in zip(examples, completions)]

    scored = distributed.scored_by_slices(score)(list(range(SCORED_ROWS)), [f"c{r}" for r in range(SCORED_ROWS)])
    # process 1's third example differs (a generator that is not deterministic across processes)
    made = [Example(id=f"e{i}", prompt=f"p{i}" + ("!" if i == 2 and process_id == "1" else ""), answer=str(i))
            for i in range(5)]
    agreed = [e.id for e in distributed.same_examples(made, "worker")]
    result = {"contexts": contexts, "losses": losses, "saved": saved, "scored_here": seen, "scored": scored, "agreed": agreed,
              "local_rows": process_rows(mesh, GLOBAL_BATCH),
              "process_count": jax.process_count(), "device_count": jax.device_count()}
    (Path(out_dir) / f"process_{process_id}.json").write_text(json.dumps(result))
    distributed.sync("multihost_worker_done")


if __name__ == "__main__":
    main(*sys.argv[1:])

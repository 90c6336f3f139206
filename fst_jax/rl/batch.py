"""The train batch: token rows ``[context | task | completion]`` with per-token and per-row fields.

Row layout (``T = P + C``, both from static length buckets)::

    [pad ... pad | prompt (context + task) | completion | pad ... pad]
     <---------- P (left-padded) ---------> <------ C (right-padded) ---->

Alignment: every ``[B, T]`` array at index ``t`` refers to token ``t``, predicted from tokens
``< t``. ``completion_mask[b, t]`` is True iff token ``t`` is a real completion token;
``loss_mask`` is ``completion_mask`` on the rows the loss keeps;
``sampler_logp[b, t]`` / ``ref_logp[b, t]`` are the sampler's / reference model's
``log pi(tokens[b, t] | tokens[b, :t])`` there (0 elsewhere), both under
``log_softmax(logits / temperature[b])``, the row's sampling temperature; ``train_step`` computes
``ref_logp`` itself whenever the KL term is on, so callers never fill it. Positions count real tokens from 0
(``positions_from_mask``), the same convention the sampler uses. Padding rows (to reach a
static batch size) and rows of dropped groups have an all-False ``loss_mask``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import struct
from jax.sharding import Mesh

from fst_jax.padding import bucket, pad_rows
from fst_jax.rl.advantages import AdvantageConfig, compute_advantages
from fst_jax.sharding import batch_sharding


@struct.dataclass
class TrainBatch:
    """Leading axis ``B`` everywhere (sharded over ``("data", "fsdp")``).

    tokens, positions: int32 ``[B, T]``; mask, completion_mask, loss_mask: bool ``[B, T]``;
    sampler_logp, ref_logp: float32 ``[B, T]``; advantages, rewards: float32 ``[B]``;
    group_ids (problem, in ``[0, B)``), context_ids: int32 ``[B]``; temperature: float32 ``[B]``
    (> 0: the row's sampling temperature, which the trainer's log-probs use too);
    completion_budget: int32 ``[B]`` (>= 1 and >= the row's completion length: the generation
    budget the row was sampled under, ``max_new_tokens``; Dr. GRPO's per-row denominator).
    """

    tokens: jax.Array
    positions: jax.Array
    mask: jax.Array
    completion_mask: jax.Array
    loss_mask: jax.Array
    sampler_logp: jax.Array
    ref_logp: jax.Array
    advantages: jax.Array
    rewards: jax.Array
    group_ids: jax.Array
    context_ids: jax.Array
    temperature: jax.Array
    completion_budget: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape


def build_train_batch(prompt_tokens: Sequence[Sequence[int]], completion_tokens: Sequence[Sequence[int]],
                      completion_logps: Sequence[Sequence[float]], rewards: Sequence[float],
                      group_ids: Sequence, context_ids: Sequence[int], *, pad_id: int,
                      advantage: AdvantageConfig = AdvantageConfig(), num_rows: int | None = None,
                      prompt_buckets: Sequence[int] | None = None,
                      completion_buckets: Sequence[int] | None = None,
                      temperature: float | Sequence[float] = 1.0,
                      completion_budget: int | None = None) -> TrainBatch:
    """A host (NumPy) ``TrainBatch`` from per-row lists.

    ``completion_logps[i]`` holds the sampler's log-prob of each token of ``completion_tokens[i]``.
    ``group_ids`` may be any hashable problem keys; they are renumbered ``0..G-1``. Prompt and
    completion lengths are padded up to ``bucket`` sizes and the row count up to ``num_rows``
    (default: the number of rows), so shapes stay fixed from step to step. Advantages are
    computed here with ``advantage`` (rows of dropped groups get an empty ``loss_mask``).
    ``temperature`` (one, or one per row, each > 0): what the sampler's log-probs are under.
    ``completion_budget``: the generation budget (``max_new_tokens``) the completions were sampled
    under, at least the longest completion (ValueError otherwise); None: the completion width
    (the rollout's is the sampler's ``max_new_tokens``).
    """
    n = len(prompt_tokens)
    if not (len(completion_tokens) == len(completion_logps) == len(rewards) == len(group_ids)
            == len(context_ids) == n):
        raise ValueError("all per-row inputs must have the same length")
    if any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("every prompt needs at least one token")
    if any(len(c) != len(lp) for c, lp in zip(completion_tokens, completion_logps)):
        raise ValueError("completion_logps must match completion_tokens token for token")
    B = num_rows or n
    if B < n:
        raise ValueError(f"num_rows={B} < {n} rows")
    P = bucket(max(len(p) for p in prompt_tokens), prompt_buckets)
    longest = max(max((len(c) for c in completion_tokens), default=1), 1)
    C = bucket(longest, completion_buckets)
    budget = C if completion_budget is None else completion_budget
    if budget < longest:
        raise ValueError(f"completion_budget {budget} is below the longest completion ({longest} tokens)")
    prompt, prompt_mask = pad_rows(prompt_tokens, P, pad_id, left=True, num_rows=B)
    completion, generated = pad_rows(completion_tokens, C, pad_id, left=False, num_rows=B)
    tokens = np.concatenate([prompt, completion], axis=1)
    mask = np.concatenate([prompt_mask, generated], axis=1)
    sampler_logp = np.zeros((B, P + C), np.float32)
    for i, lp in enumerate(completion_logps):
        sampler_logp[i, P:P + len(lp)] = lp
    completion_mask = np.concatenate([np.zeros_like(prompt_mask), generated], axis=1)
    keys = {}
    gids = np.array([keys.setdefault(g, len(keys)) for g in group_ids] + [len(keys)] * (B - n),
                    np.int32)
    valid = np.arange(B) < n
    r = np.zeros(B, np.float32)
    r[:n] = rewards
    adv, keep = compute_advantages(advantage, r, gids, valid)
    loss_mask = completion_mask & np.asarray(keep)[:, None]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ctx = np.zeros(B, np.int32)
    ctx[:n] = context_ids
    temp = np.ones(B, np.float32)
    temp[:n] = temperature
    if not (temp > 0).all():
        raise ValueError("temperature must be > 0 (greedy rows' log-probs are at temperature 1)")
    return TrainBatch(tokens=tokens, positions=positions, mask=mask, completion_mask=completion_mask,
                      loss_mask=loss_mask, sampler_logp=sampler_logp,
                      ref_logp=np.zeros((B, P + C), np.float32), advantages=np.asarray(adv, np.float32),
                      rewards=r, group_ids=gids, context_ids=ctx, temperature=temp,
                      completion_budget=np.full(B, budget, np.int32))


def batch_shardings(mesh: Mesh) -> TrainBatch:
    """A ``TrainBatch`` of shardings: every field's leading (batch) axis over ``("data", "fsdp")``."""
    two, one = batch_sharding(mesh, 2), batch_sharding(mesh, 1)
    return TrainBatch(tokens=two, positions=two, mask=two, completion_mask=two, loss_mask=two,
                      sampler_logp=two, ref_logp=two, advantages=one, rewards=one, group_ids=one,
                      context_ids=one, temperature=one, completion_budget=one)


def shard_batch(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
    """Put a host batch on ``mesh`` (``B`` must be divisible by ``data * fsdp``)."""
    return jax.device_put(batch, batch_shardings(mesh))


def process_rows(mesh: Mesh, num_rows: int) -> list[int]:
    """The batch rows that live on this process's devices of ``mesh`` (contiguous)."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((num_rows,))
    rows = sorted({i for idx in index_map.values() for i in range(*idx[0].indices(num_rows))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError("this process's batch rows are not contiguous on the mesh")
    return rows


def to_global(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
    """A host batch (the same full batch on every process) as global arrays on ``mesh``, each
    process supplying only the rows of its own devices; works with one process too."""
    rows = process_rows(mesh, len(batch.tokens))

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(s, x[rows[0]:rows[-1] + 1], x.shape)

    return jax.tree.map(one, batch, batch_shardings(mesh))


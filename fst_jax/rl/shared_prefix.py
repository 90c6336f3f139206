"""Shared-prefix log-probs: each group's prompt computed once in the update and the reference pass.

In FST every row of a (context, problem) prompt's group repeats the same prompt columns (the
rollout lays out ``G / K`` consecutive rows per prompt, left-padded to one prompt bucket), and
the dense path runs them through the model once per row. Here a batch's groups are found from
its data (``make_prefix_layout``: runs of consecutive rows whose columns before the first
completion column are equal in tokens, positions and mask, so rows that do not share a prompt
are never grouped), and ``prefix_hidden`` runs each group's prompt once and its rows'
remaining columns against it.

Layout: prompt keys/values, then completions. One scan over the layers carries two streams,
the prompts ``[B / n, S]`` and the rows' remaining columns ``[B, T - S]``; in each layer the
prompts attend causally to themselves and every row attends to its group's prompt keys/values
(read once per group: ``shared_attention``, the sampler's own primitive) and causally to its
own columns. Gradients reach the prompt's computation through those keys/values and through
the last prompt column's hidden state, which predicts every row's first completion token; a
remat'd layer recomputes both streams. Chosen over a packed group with a block mask
(``[prompt | c_1 | ... | c_n]`` per group) because that scores ``(S + nC)^2`` pairs per group,
among them every ``c_i`` against every other ``c_j``, all masked, where this scores
``S^2 + nC (S + C)`` (the dense path: ``n (S + C)^2``), and because this keeps the rows, their
``[B, C]`` completion columns, their sharding over ``("data", "fsdp")`` and the per-row loss as
the dense path has them; and it needs no new attention code.

Numerics: every real token sees the same keys as in the dense forward, in the same order
(prompt, then own columns), scored alike, so log-probs, losses and gradients equal the dense
path's to float32 rounding. Columns of padding differ (they attend to nothing real in either
path and feed no real token), and the log-probs of the prompt columns are not computed (0).

The learner (``rl.train_step``, ``LearnerConfig.shared_prefix``) gives each micro-batch whole
groups and runs dense when no two rows share a prompt, and under tracing (an ahead-of-time
compile sees no data); a run's first step measures the two paths against each other.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fst_jax.distributed import fetch
from fst_jax.models.transformer import (Transformer, _mlp_block, _qkv, rms_norm, rope_inv_freq,
                                        shared_attention)
from fst_jax.rl.batch import TrainBatch, batch_shardings
from fst_jax.sharding import batch_devices, replicated, shard_rows


class PrefixLayout(NamedTuple):
    """A batch's shared prompts (static, hashable): in every run of ``rows`` consecutive rows
    (rows ``[i * rows, (i + 1) * rows)``) columns ``[0, prompt_len)`` hold the same tokens,
    positions and mask, and no row has a completion token there."""

    prompt_len: int
    rows: int


def prompt_runs(tokens, positions, mask, completion_mask):
    """``(first, same)``: the first column holding a completion token in any row (``T`` if none)
    and ``same [B - 1]`` bool, True where row ``b + 1`` equals row ``b`` in every column before
    ``first`` (tokens, positions and mask)."""
    T = tokens.shape[1]
    has = jnp.asarray(completion_mask).any(0)
    first = jnp.where(has.any(), jnp.argmax(has), T)
    eq = (tokens[1:] == tokens[:-1]) & (positions[1:] == positions[:-1]) & (mask[1:] == mask[:-1])
    return first, (eq | (jnp.arange(T) >= first)).all(1)


def choose_layout(first: int, same: np.ndarray, width: int, micro_batches: int,
                  devices: int) -> PrefixLayout | None:
    """The layout of a ``[B, width]`` batch from ``prompt_runs``: groups of ``rows``, the largest
    divisor of every run's length that leaves each of the ``micro_batches`` a whole number of
    groups (a multiple of ``devices`` of them where one exists, so the prompts shard evenly).
    None when no group would have two rows or there is no prompt column or completion token."""
    B = len(same) + 1
    if not 0 < first < width:
        return None
    starts = np.flatnonzero(np.concatenate([[True], ~np.asarray(same, bool)]))
    n = math.gcd(*np.diff(np.append(starts, B)).tolist())
    fits = [m for m in range(n, 1, -1) if n % m == 0 and (B // m) % micro_batches == 0]
    even = [m for m in fits if (B // m) % (micro_batches * devices) == 0]
    rows = (even or fits or [None])[0]
    return None if rows is None else PrefixLayout(int(first), rows)


def make_prefix_layout(mesh: Mesh, micro_batches: int) -> Callable[[TrainBatch], PrefixLayout | None]:
    """``layout(batch)``: the batch's ``PrefixLayout`` found from its data (``prompt_runs`` jitted
    on ``mesh``, its small result read back on every process; ``choose_layout``), or None (the
    dense path). A traced batch (an ahead-of-time compile) has no data to read: None."""
    sh = batch_shardings(mesh)
    runs = jax.jit(prompt_runs, in_shardings=(sh.tokens, sh.positions, sh.mask, sh.completion_mask),
                   out_shardings=replicated(mesh))
    devices = batch_devices(mesh)

    def layout(batch: TrainBatch) -> PrefixLayout | None:
        if isinstance(batch.tokens, jax.core.Tracer):
            return None
        first, same = (fetch(x) for x in
                       runs(batch.tokens, batch.positions, batch.mask, batch.completion_mask))
        return choose_layout(int(first), same, batch.tokens.shape[1], micro_batches, devices)

    return layout


def prefix_hidden(model: Transformer, tokens, positions, mask, layout: PrefixLayout,
                  adapters: dict | None = None) -> jax.Array:
    """The hidden states ``[B, T - S, D]`` at columns ``S - 1 .. T - 2`` (those that predict
    tokens ``S .. T - 1``; ``S = layout.prompt_len``), equal to
    ``model.hidden(tokens, positions, mask, adapters)[0][:, S - 1:-1]`` for a batch laid out as
    ``layout`` says: each group's prompt (its first row's columns ``< S``) runs once, and its rows'
    columns ``>= S`` attend to the prompt's keys/values and causally to their own. ``adapters``:
    LoRA, as in ``Transformer.hidden``; remat as the model's config says."""
    cfg = model.cfg
    S, n = layout
    B, T = tokens.shape
    K, hd = cfg.num_kv_heads, cfg.head_dim
    G, scale, eps = cfg.num_heads // K, hd ** -0.5, cfg.rms_norm_eps
    inv_freq = rope_inv_freq(cfg)
    first = lambda x: x.reshape(B // n, n, *x.shape[1:])[:, 0, :S]  # each group's first row
    p_pos, p_mask = first(positions), first(mask)
    r_pos, r_mask = positions[:, S:], mask[:, S:]
    causal = lambda m: (jnp.tril(jnp.ones((m.shape[1],) * 2, bool))[None] & m[:, None, :])[:, None, None]
    p_ok, r_ok = causal(p_mask), causal(r_mask)

    def project(x, w, ad, pos):
        q, k, v = _qkv(cfg, w, ad, rms_norm(x, w["attn_norm"], eps), pos, inv_freq)
        return q.reshape(*q.shape[:2], K, G, hd), k.swapaxes(1, 2), v.swapaxes(1, 2)

    def body(carry, layer):
        xp, xr = carry
        w, ad = layer
        qp, kp, vp = project(xp, w, ad, p_pos)
        qr, kr, vr = project(xr, w, ad, r_pos)
        # queries pre-scaled (scale 1 inside): ``shared_attention`` masks, then scales, and
        # differentiated under FSDP that gave NaN on XLA's CPU backend (jax 0.10.2)
        ap = shared_attention(qp * scale, [], [(kp, vp, p_ok)], 1.0)
        ar = shared_attention(qr * scale, [(kp, vp, p_mask)], [(kr, vr, r_ok)], 1.0)
        xp = shard_rows(_mlp_block(cfg, w, ad, xp, ap.reshape(*ap.shape[:2], -1, hd)))
        xr = shard_rows(_mlp_block(cfg, w, ad, xr, ar.reshape(*ar.shape[:2], -1, hd)))
        return (xp, xr), None

    x0 = (model.embed_tokens(first(tokens)), model.embed_tokens(tokens[:, S:]))
    (xp, xr), _ = model._scan(body, x0, (model.layers.weights(), adapters or {}))
    last = jnp.repeat(xp[:, -1:], n, axis=0)  # the prompt's last column predicts each row's token S
    return jnp.concatenate([last, xr[:, :-1]], axis=1)

"""The jitted sampler: prompts of [context | task] tokens in, completions and log-probs out.

Contexts (the fast weights) are data: every prompt row is left-padded to a length bucket, so a
new context text, or a mix of contexts in one batch, reuses the compiled programs as long as the
lengths stay inside the bucket. Temperature, top-p and top-k are traced per-row arrays.

Two-level prefix sharing: ``generate(prompts, n)`` splits each prompt row into its context
(``context_lengths``) and its task. Each distinct context is prefilled once and its keys/values
kept once; each (context, task) prompt is prefilled once against its context's cache and kept
once; the ``n`` samples of a prompt attend to both shared caches plus their own suffix cache. So
an RL batch of K contexts x m problems, or GEPA scoring one candidate over many problems, reads
each context's keys/values once per decode step instead of once per row. The compiled programs
depend on the length buckets, ``n``, ``max_new_tokens``, and the number of distinct contexts and
the most prompts sharing one (both rounded up to powers of two), never on the texts. Each row
draws from its own key, ``fold_in(fold_in(seed, prompt_id * n + sample_index), step)``, so
results do not depend on the batch they were computed in: ``prompt_id`` is the prompt's index in
the request, or an id the caller gives (``prompt_ids``; or each row's own id), which makes a
prompt's draws the same in any request (evaluations compare checkpoints and modes on equal
draws). Temperature, top-p and top-k may differ per sample index, so one request can hold a
prompt's greedy sample and its tempered ones over a single prefill.

Returned log-probs are those of the sampled tokens under the temperature-scaled, unfiltered
model distribution ``log_softmax(logits / T)`` (``T = 1`` for greedy rows).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fst_jax.checkpoint import abstract_target
from fst_jax.config import require
from fst_jax.distributed import fetch
from fst_jax.models.tokenizer import PromptTokenizer
from fst_jax.models.transformer import KV, SharedKV, Transformer, positions_from_mask
from fst_jax.padding import bucket, pad_rows, pow2
from fst_jax.sharding import (batch_devices, batch_sharding, fsdp_gathered, replicated, shard_state,
                              state_shardings)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampler settings. ``temperature <= 0`` means greedy; ``top_k = 0`` and ``top_p = 1`` are
    off. ``prompt_buckets`` are the allowed padded prompt lengths (tokens);
    ``max_prompts_per_batch`` bounds the unique prompts per device batch (larger requests are
    split into equal, padded chunks so they reuse one compiled program). ``stop_at_eos=False``
    always generates ``max_new_tokens`` (benchmarks, fixed-length rollouts). ``unroll_layers``:
    decode with per-layer weight and cache copies in an unrolled loop (faster on CPU, where XLA
    copies scanned slices every step; costs a second copy of the weights while generating) or
    with ``lax.scan`` over the stacked layers; None picks unrolled on the CPU backend only.
    ``prefill_query_chunk``: prompts longer than this are prefilled this many query positions
    at a time (``shared_attention``), bounding the attention scores' memory; None: all at once.
    ``gather_weights``: on a mesh with ``fsdp > 1``, gather the weights whole onto each fsdp device
    once per request (``Sampler.gathers``; they then cost their full bytes per device while it
    runs) instead of at every layer of every decoded token; false for a model too large for that;
    None: on TPU devices only (whose dry run compiles the copy as it runs; XLA's CPU compiler, the
    GPU dry run's, holds it again in float32)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    max_context_tokens: int = 512
    max_prompts_per_batch: int = 64
    stop_at_eos: bool = True
    unroll_layers: bool | None = None
    prefill_query_chunk: int | None = 512
    gather_weights: bool | None = None

    def __post_init__(self):
        require(self.max_new_tokens > 0, "max_new_tokens must be positive")
        require(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        require(self.top_k >= 0, "top_k must be >= 0 (0 = off)")
        require(len(self.prompt_buckets) > 0 and list(self.prompt_buckets) == sorted(self.prompt_buckets),
                "prompt_buckets must be a non-empty increasing list")
        require(self.max_prompts_per_batch > 0, "max_prompts_per_batch must be positive")
        require(self.prefill_query_chunk is None or self.prefill_query_chunk > 0,
                "prefill_query_chunk must be positive or null")


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Host-side prompts, left-padded: ``tokens``/``mask`` ``[P, Lp]``; ``context_lengths`` and
    ``lengths`` ``[P]`` count the context tokens and all real tokens of each row."""

    tokens: np.ndarray
    mask: np.ndarray
    context_lengths: np.ndarray
    lengths: np.ndarray

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class Samples:
    """Completions for ``P * n`` rows; row ``r`` continues ``prompts`` row ``r // n``.

    tokens int32 ``[P*n, N]`` (``pad_id`` after the end), logprobs float32 ``[P*n, N]``
    (under ``log_softmax(logits / temperature)``), mask bool ``[P*n, N]`` (generated tokens, the
    EOS included), lengths int32 ``[P*n]``, finished bool ``[P*n]`` (ended with EOS rather than
    by the length limit), temperature float32 ``[P*n]`` (the one the log-probs are under: 1 for
    greedy rows).
    """

    prompts: PromptBatch
    n: int
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    temperature: np.ndarray

    @property
    def prompt_index(self) -> np.ndarray:
        return np.arange(self.tokens.shape[0]) // self.n

    def subset(self, samples: Sequence[int]) -> "Samples":
        """Of every prompt, the samples ``samples`` (indices ``< n``, in that order):
        ``len(samples)`` rows per prompt."""
        js = np.asarray(samples, np.int64)
        require(js.size > 0 and js.min() >= 0 and js.max() < self.n,
                f"no samples {list(js)} among {self.n} per prompt")
        rows = (np.arange(self.prompts.num_prompts)[:, None] * self.n + js).reshape(-1)
        return Samples(self.prompts, len(js), *(a[rows] for a in (
            self.tokens, self.logprobs, self.mask, self.lengths, self.finished, self.temperature)))


@dataclasses.dataclass(frozen=True)
class SharePlan:
    """Host layout of a ``PromptBatch`` for two-level sharing: ``C`` context slots of ``m``
    prompt slots each (both powers of two; spare slots repeat a real prompt and are dropped).

    ctx_tokens/ctx_mask ``[C, Lc]`` (left-padded contexts); task_tokens/task_mask ``[C*m, Lt]``
    (left-padded tasks, slot ``s`` in context slot ``s // m``); task_start ``[C*m]`` (position of
    the slot's first task token = its context length); prompt_of_slot ``[C*m]``;
    slot_of_prompt ``[P]``.
    """

    ctx_tokens: np.ndarray
    ctx_mask: np.ndarray
    task_tokens: np.ndarray
    task_mask: np.ndarray
    task_start: np.ndarray
    prompt_of_slot: np.ndarray
    slot_of_prompt: np.ndarray

    @property
    def num_slots(self) -> int:
        return self.task_tokens.shape[0]


def slot_shape(contexts: int, most_prompts: int, multiple: int = 1) -> tuple[int, int]:
    """``(C, m)``: the context slots and prompt slots per context that ``share_plan`` lays out
    for ``contexts`` distinct contexts with at most ``most_prompts`` prompts under one: powers of
    two (few compiled programs), ``m`` doubled until ``C * m`` is a multiple of ``multiple`` (the
    devices the rows shard over; for a ``multiple`` not a power of two, until ``C * m`` reaches
    it, and rows that do not divide evenly are replicated)."""
    C, m = pow2(contexts), pow2(most_prompts)
    while (C * m) % multiple and C * m < multiple:
        m *= 2
    return C, m


def share_plan(prompts: PromptBatch, buckets: Sequence[int], pad_id: int, multiple: int = 1) -> SharePlan:
    """Group ``prompts`` by identical context tokens (first appearance order); contexts and tasks
    are padded to ``buckets`` lengths, slots to ``slot_shape(..., multiple)``. A prompt keeps at
    least one task token (the last)."""
    rows = [prompts.tokens[i][prompts.mask[i]] for i in range(prompts.num_prompts)]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    splits = [min(int(c), len(r) - 1) for c, r in zip(prompts.context_lengths, rows)]
    ids: dict[bytes, int] = {}
    ctx_of = [ids.setdefault(r[:c].tobytes(), len(ids)) for r, c in zip(rows, splits)]
    groups: list[list[int]] = [[] for _ in ids]
    for p, c in enumerate(ctx_of):
        groups[c].append(p)
    C, m = slot_shape(len(groups), max(map(len, groups)), multiple)
    groups += [groups[0]] * (C - len(groups))
    prompt_of_slot = np.asarray([g[j % len(g)] for g in groups for j in range(m)], np.int32)
    slot_of_prompt = np.zeros(len(rows), np.int32)
    for c, g in enumerate(groups[:len(ids)]):
        slot_of_prompt[g] = c * m + np.arange(len(g))
    ctx_rows = [rows[g[0]][:splits[g[0]]] for g in groups]
    ctx_tokens, ctx_mask = pad_rows(ctx_rows, bucket(max(1, max(map(len, ctx_rows))), buckets),
                                    pad_id, left=True)
    task_rows = [rows[p][splits[p]:] for p in prompt_of_slot]
    task_tokens, task_mask = pad_rows(task_rows, bucket(max(map(len, task_rows)), buckets),
                                      pad_id, left=True)
    return SharePlan(ctx_tokens, ctx_mask, task_tokens, task_mask,
                     np.asarray([splits[p] for p in prompt_of_slot], np.int32), prompt_of_slot,
                     slot_of_prompt)


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask ``logits [B, V]`` outside each row's top-k (``top_k [B]``, 0 = off) and top-p
    nucleus (``top_p [B]``, 1 = off) to -inf. Ties at the threshold are kept."""
    sorted_desc = -jnp.sort(-logits, axis=-1)
    V = logits.shape[-1]
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
    kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= jnp.maximum(kth, pth), logits, -jnp.inf)


def first_argmax(x: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first maximal index), as two plain reductions: XLA's CPU
    backend runs the variadic-reduce ``argmax`` about 5x slower on a vocabulary-sized row."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)


def inverse_cdf_draw(weights: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Index ``i`` per row with ``cdf[i-1] <= u * total < cdf[i]`` for non-negative
    ``weights [B, V]`` and ``u [B]`` in [0, 1): a categorical draw from one uniform per row.

    Two-level search (block totals, then one block's running sum) keeps the work O(V) with no
    full-vocabulary cumulative sum, which XLA's CPU backend computes slowly."""
    B, V = weights.shape
    w = jnp.pad(weights, ((0, 0), (0, -V % block))).reshape(B, -1, block)
    nb = w.shape[1]
    cum_blocks = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)
    target = u * cum_blocks[:, -1]
    j = jnp.minimum(jnp.sum(cum_blocks <= target[:, None], axis=-1), nb - 1)
    before = jnp.where(j > 0, jnp.take_along_axis(cum_blocks, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.cumsum(jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0], axis=-1)
    i = jnp.minimum(jnp.sum(inner <= (target - before)[:, None], axis=-1), block - 1)
    idx = jnp.minimum(j * block + i, V - 1)
    # Rounding can land on a zero-weight entry at a block's end: fall back to the mode.
    ok = jnp.take_along_axis(weights, idx[:, None], -1)[:, 0] > 0
    return jnp.where(ok, idx, first_argmax(weights))


def sample_tokens(keys, logits, temperature, top_p, top_k):
    """One token per row. ``keys [B]`` (typed keys), ``logits [B, V]`` float32, sampling arrays
    ``[B]``. Returns (tokens int32 ``[B]``, log-probs float32 ``[B]`` under
    ``log_softmax(logits / T)``)."""
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    needs_filter = jnp.any((top_p < 1.0) | (top_k > 0))
    filtered = jax.lax.cond(needs_filter, filter_logits, lambda x, *_: x, scaled, top_p, top_k)
    top = jnp.max(scaled, axis=-1, keepdims=True)
    drawn = inverse_cdf_draw(jnp.exp(filtered - top), jax.vmap(jax.random.uniform)(keys))
    tokens = jnp.where(greedy, first_argmax(logits), drawn).astype(jnp.int32)
    lse = top[:, 0] + jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))
    return tokens, jnp.take_along_axis(scaled, tokens[:, None], -1)[:, 0] - lse


def chunks(num_pairs: int, max_prompts: int) -> list[range]:
    """The calls ``generate_many`` splits ``num_pairs`` pairs into: as few as ``max_prompts``
    allows, of equal sizes (to one), consecutive. No pair is repeated to fill a call:
    ``share_plan`` rounds slot counts itself."""
    n = -(-num_pairs // max_prompts)
    edges = [round(i * num_pairs / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


class Sampler:
    """Batched, jitted sampling from a ``Transformer``; see the module docstring.

    ``params`` passed to ``generate`` is the model's ``nnx.State`` (e.g. the current slow
    weights); ``self.params`` holds the weights the sampler was built with. ``trace_counts``
    counts how often each jitted program was traced (= compiled). ``gathers``: on a mesh with
    ``fsdp > 1`` (``config.gather_weights``; by default on TPU), ``generate`` first gathers
    ``params``, in the compute dtype, whole onto each fsdp device (still split over ``tensor``):
    every decode step reads every weight, so they cross chips once per request instead of at
    every token, for their bytes in the compute dtype per device while the request runs.
    """

    def __init__(self, model: Transformer, tokenizer: PromptTokenizer,
                 config: SamplingConfig = SamplingConfig(), mesh: Mesh | None = None):
        self.config = config
        if tokenizer.max_context_tokens != config.max_context_tokens:
            # The sampler's limit governs its prompts (and GEPA's proposals, which read it here).
            tokenizer = copy.copy(tokenizer)
            tokenizer.max_context_tokens = config.max_context_tokens
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.graphdef, params = nnx.split(model)
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            # an abstract model (nnx.eval_shape): programs can be compiled (compile_generate), not run
            self.params = abstract_target(params, state_shardings(params, mesh)) if mesh is not None else params
        else:
            self.params = shard_state(params, mesh) if mesh is not None else params
        self.trace_counts: collections.Counter = collections.Counter()
        gather = config.gather_weights
        if gather is None:
            gather = mesh is not None and mesh.devices.flat[0].platform == "tpu"
        self.gathers = gather and mesh is not None and mesh.shape["fsdp"] > 1
        self._compute_dtype = jnp.dtype(model.cfg.dtype)
        self._gather = jax.jit(self._gathered)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("n",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("max_new",))

    @classmethod
    def load(cls, model: str, config: SamplingConfig = SamplingConfig(), dtype: str = "float32",
             mesh: Mesh | None = None) -> "Sampler":
        """A sampler over a local model (see ``fst_jax.models.loading.load_model``)."""
        from fst_jax.models.loading import load_model

        net, tokenizer = load_model(model, dtype, config.max_context_tokens)
        return cls(net, tokenizer, config, mesh)

    def _gathered(self, params):
        """``params`` in the compute dtype (the model casts every weight to it where it is used),
        whole on each fsdp device."""
        params = jax.tree.map(lambda x: x.astype(self._compute_dtype)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        return jax.lax.with_sharding_constraint(params, fsdp_gathered(params, self.mesh))

    # -- host side ------------------------------------------------------------------------
    def encode(self, pairs: Sequence[tuple[str, str]]) -> PromptBatch:
        """Encode (context, task) pairs as left-padded prompt rows in one length bucket."""
        rows, ctx_lens = [], []
        for context, task in pairs:
            c, t = self.tokenizer.encode(context, task)
            rows.append(c + t)
            ctx_lens.append(len(c))
        Lp = bucket(max(len(r) for r in rows), self.config.prompt_buckets)
        tokens, mask = pad_rows(rows, Lp, self.tokenizer.pad_id, left=True)
        return PromptBatch(tokens, mask, np.asarray(ctx_lens, np.int32), mask.sum(1).astype(np.int32))

    def _unroll_layers(self) -> bool:
        if self.config.unroll_layers is None:
            return jax.default_backend() == "cpu"
        return self.config.unroll_layers

    def _batch_devices(self) -> int:
        if self.mesh is None:
            return 1
        return batch_devices(self.mesh)

    def _row_sharding(self, shape: tuple[int, ...]):
        """Rows split over the batch axes when they divide evenly, else replicated."""
        shard = shape[0] % self._batch_devices() == 0
        return batch_sharding(self.mesh, len(shape)) if shard else replicated(self.mesh)

    def _put(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self._row_sharding(x.shape))

    def compile_generate(self, contexts: int, prompts_per_context: int, n: int, context_tokens: int,
                         task_tokens: int, max_new_tokens: int) -> dict[str, jax.stages.Compiled]:
        """Ahead-of-time compiles of the prefill and decode programs that ``generate`` runs for
        ``contexts`` distinct contexts of up to ``context_tokens`` tokens with
        ``prompts_per_context`` prompts each of up to ``task_tokens`` more, ``n`` samples per
        prompt and ``max_new_tokens`` new tokens (counts rounded as ``slot_shape`` and lengths
        to the prompt buckets, as ``share_plan`` pads them), over ``self.params``' shapes and
        shardings. Nothing runs: for memory analysis (``fst_jax.dryrun``)."""
        C, m = slot_shape(contexts, prompts_per_context, self._batch_devices())
        Lc, Lt = (bucket(t, self.config.prompt_buckets) for t in (context_tokens, task_tokens))

        def arg(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=None if self.mesh is None
                                        else self._row_sharding(shape))

        params = self.params
        if self.gathers:
            shapes = jax.eval_shape(self._gathered, params)
            params = abstract_target(shapes, fsdp_gathered(shapes, self.mesh))
        prefill = self._prefill.lower(self.graphdef, params, arg((C, Lc), jnp.int32),
                                      arg((C, Lc), jnp.bool_), arg((C * m, Lt), jnp.int32),
                                      arg((C * m, Lt), jnp.bool_), arg((C * m,), jnp.int32), n=n).compile()
        logits, levels = prefill.out_info  # shapes and shardings of the prefill's outputs
        B = C * m * n
        rows = [arg((B,), dt) for dt in (jnp.int32, jnp.int32)]
        knobs = [arg((B,), dt) for dt in (jnp.float32, jnp.float32, jnp.int32)]
        decode = self._decode.lower(self.graphdef, params, logits, levels, *rows, jax.random.key(0),
                                    *knobs, max_new=max_new_tokens).compile()
        return {"prefill": prefill, "decode": decode}

    def generate(self, params, prompts: PromptBatch, n: int = 1, seed: int = 0,
                 temperature=None, top_p=None, top_k=None, max_new_tokens: int | None = None,
                 prompt_ids: Sequence[int] | None = None) -> Samples:
        """Sample ``n`` completions per prompt row (see ``Samples``). ``None`` arguments take the
        config's values; ``temperature``, ``top_p`` and ``top_k`` are one value or one per sample
        index (``n`` of them, None entries the config's: e.g. a greedy sample and k tempered ones
        of each prompt from one prefill); each distinct ``max_new_tokens`` compiles its own
        decode program.
        ``prompt_ids``: one id per prompt row naming its draws (default: the row's index; sample
        ``j`` of prompt id ``i`` draws as row ``i * n + j``), with ``0 <= id`` and
        ``(id + 1) * n <= 2**31``; or ``[P, n]`` ids in ``[0, 2**31)``, each row's own (draws
        that do not depend on which other samples a request holds)."""
        cfg = self.config
        P = prompts.num_prompts
        ids = np.arange(P) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
        require(ids.shape in ((P,), (P, n)), f"prompt_ids of shape {ids.shape} for {P} prompts x {n}")
        if ids.ndim == 1:
            require(ids.min() >= 0 and (ids.max() + 1) * n <= 2**31, "prompt_ids must be in [0, 2**31 / n)")
            ids = ids[:, None] * n + np.arange(n)
        require(ids.min() >= 0 and ids.max() < 2**31, "per-row prompt_ids must be in [0, 2**31)")
        plan = share_plan(prompts, cfg.prompt_buckets, self.tokenizer.pad_id, self._batch_devices())

        def per_row(value, default, dtype, name):
            values = [value] * n if value is None or np.ndim(value) == 0 else list(value)
            require(len(values) == n, f"{name}: one value or one per sample ({n}), got {len(values)}")
            return np.tile(np.array([default if v is None else v for v in values], dtype), plan.num_slots)

        temp = per_row(temperature, cfg.temperature, np.float32, "temperature")
        tp = per_row(top_p, cfg.top_p, np.float32, "top_p")
        tk = per_row(top_k, cfg.top_k, np.int32, "top_k")
        samples = np.arange(n, dtype=np.int32)
        row_ids = ids[plan.prompt_of_slot].reshape(-1).astype(np.int32)
        start_pos = np.repeat(plan.task_start + plan.task_mask.sum(1).astype(np.int32), n)
        if self.gathers:
            params = self._gather(params)
        first_logits, levels = self.prefill(params, plan, n)
        out = self._decode(self.graphdef, params, first_logits, levels, self._put(start_pos),
                           self._put(row_ids), jax.random.key(seed), self._put(temp),
                           self._put(tp), self._put(tk), max_new=max_new_tokens or cfg.max_new_tokens)
        take = (plan.slot_of_prompt[:, None] * n + samples).reshape(-1)
        tokens, logprobs, mask, finished = (fetch(a)[take] for a in out)
        scale = np.where(temp > 0, temp, 1.0).astype(np.float32)[take]
        return Samples(prompts, n, tokens, logprobs, mask, mask.sum(1).astype(np.int32), finished, scale)

    def prefill(self, params, plan: SharePlan, n: int = 1):
        """Device prefill of a ``share_plan``: (first logits ``[C*m*n, V]``, the two
        ``SharedKV`` levels: contexts, then prompts)."""
        return self._prefill(self.graphdef, params, self._put(plan.ctx_tokens),
                             self._put(plan.ctx_mask), self._put(plan.task_tokens),
                             self._put(plan.task_mask), self._put(plan.task_start), n=n)

    def generate_many(self, params, pairs: Sequence[tuple[str, str]], n: int = 1, seed: int = 0,
                      temperature=None, top_p=None, top_k=None, max_new_tokens: int | None = None,
                      prompt_ids: Sequence[int] | None = None) -> list[Samples]:
        """``generate`` over (context, task) pairs in ``chunks`` of at most
        ``max_prompts_per_batch`` prompts: one ``Samples`` per chunk, in order. ``prompt_ids``
        (one per pair, see ``generate``) make each pair's draws independent of the request;
        without them the chunk starting at pair ``i`` draws with ``seed + i``."""
        require(prompt_ids is None or len(prompt_ids) == len(pairs), "one prompt id per pair")
        return [self.generate(params, self.encode(pairs[c.start:c.stop]), n,
                              seed if prompt_ids is not None else seed + c.start, temperature, top_p,
                              top_k, max_new_tokens, None if prompt_ids is None else prompt_ids[c.start:c.stop])
                for c in chunks(len(pairs), self.config.max_prompts_per_batch)]

    def generate_text(self, params, pairs: Sequence[tuple[str, str]], n: int = 1, seed: int = 0,
                      temperature=None, top_p=None, top_k=None, max_new_tokens: int | None = None,
                      prompt_ids: Sequence[int] | None = None) -> list[list[str]]:
        """``n`` completion texts per (context, task) pair, in order (``generate_many``)."""
        return [[self.decode_row(s, p * n + j) for j in range(n)]
                for s in self.generate_many(params, pairs, n, seed, temperature, top_p, top_k,
                                            max_new_tokens, prompt_ids)
                for p in range(s.prompts.num_prompts)]

    def decode_row(self, samples: Samples, row: int) -> str:
        """Completion text of one row, special tokens (EOS) removed."""
        return self.tokenizer.decode(samples.tokens[row, :samples.lengths[row]])

    # -- device side ----------------------------------------------------------------------
    def _prefill_fn(self, graphdef, params, ctx_tokens, ctx_mask, task_tokens, task_mask,
                    task_start, *, n):
        """The contexts' caches, then the prompts' (attending to their context's). Returns the
        last prompt logits repeated per sample ``[C*m*n, V]`` and the two ``SharedKV`` levels."""
        self.trace_counts["prefill"] += 1
        model = nnx.merge(graphdef, params)
        chunk = self.config.prefill_query_chunk
        _, ctx_kv = model.extend(ctx_tokens, positions_from_mask(ctx_mask), ctx_mask, query_chunk=chunk)
        ctx = SharedKV(ctx_kv.k, ctx_kv.v, ctx_mask)
        positions = task_start[:, None] + positions_from_mask(task_mask)
        x, task_kv = model.extend(task_tokens, positions, task_mask, [ctx], query_chunk=chunk)
        logits = model.logits(x[:, -1])
        return jnp.repeat(logits, n, axis=0), (ctx, SharedKV(task_kv.k, task_kv.v, task_mask))

    def _decode_fn(self, graphdef, params, logits, levels, start_pos, row_ids, key,
                   temperature, top_p, top_k, *, max_new):
        self.trace_counts["decode"] += 1
        model = nnx.merge(graphdef, params)
        B = logits.shape[0]
        L, _, K, _, hd = levels[0].k.shape
        cache_dtype = levels[0].k.dtype
        if self._unroll_layers():
            layer_weights = model.unstack_layers()
            levels = [SharedKV(list(lv.k), list(lv.v), lv.mask) for lv in levels]
            suffix = KV(*([jnp.zeros((B, K, max_new, hd), cache_dtype) for _ in range(L)]
                          for _ in range(2)))
        else:
            layer_weights = None
            suffix = KV(jnp.zeros((L, B, K, max_new, hd), cache_dtype),
                        jnp.zeros((L, B, K, max_new, hd), cache_dtype))
        row_keys = jax.vmap(functools.partial(jax.random.fold_in, key))(row_ids)
        eos = self.tokenizer.eos_id if self.config.stop_at_eos else -1
        pad = self.tokenizer.pad_id
        init = (jnp.int32(0), logits, suffix, jnp.full((B, max_new), pad, jnp.int32),
                jnp.zeros((B, max_new), jnp.float32), jnp.zeros((B, max_new), bool),
                jnp.zeros((B,), bool))

        def cond(state):
            step, *_, done = state
            return (step < max_new) & ~jnp.all(done)

        def body(state):
            step, logits, suffix, toks, lps, live, done = state
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
            tok, lp = sample_tokens(keys, logits, temperature, top_p, top_k)
            tok = jnp.where(done, pad, tok)
            toks = toks.at[:, step].set(tok)
            lps = lps.at[:, step].set(jnp.where(done, 0.0, lp))
            live = live.at[:, step].set(~done)
            done = done | (tok == eos)
            logits, new = model.decode(tok, start_pos + step, levels, suffix, step, layer_weights)
            suffix = jax.tree.map(
                lambda cache, kv: jax.lax.dynamic_update_slice_in_dim(cache, kv.astype(cache.dtype),
                                                                      step, axis=-2), suffix, new)
            return step + 1, logits, suffix, toks, lps, live, done

        _, _, _, toks, lps, live, done = jax.lax.while_loop(cond, body, init)
        return toks, lps, live, done

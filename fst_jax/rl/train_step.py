"""The slow-weights learner: ``TrainState``, the jitted ``train_step`` and reference log-probs.

``init_train_state`` splits a model into trained weights, LoRA adapters, frozen weights and (for
full fine-tuning with a KL term) one reference copy; only the trained part has optimizer state.
``make_train_step`` builds ``train_step(state, batch) -> (state, metrics)``: jitted once with
explicit shardings (weights by logical axes, batch over ``("data", "fsdp")``), the state donated.
The batch is split into ``micro_batches`` strided slices (row ``i`` goes to micro-batch
``i % k``; rows sharing a prompt go together, see below); each slice's loss is an unreduced sum
over the whole batch's denominator, so the accumulated gradient equals the full-batch one. A
step whose loss or gradients are not finite (or that has no completion tokens) leaves weights
and optimizer state unchanged and counts in ``state.skipped``. With ``shared_prefix`` the rows
of each batch that share a prompt are found from its data and each such prompt runs once
(``rl.shared_prefix``); the dense path stays as the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from fst_jax.config import ConfigError, require
from fst_jax.models.transformer import Transformer
from fst_jax.rl.advantages import AdvantageConfig
from fst_jax.rl.batch import TrainBatch, batch_shardings
from fst_jax.rl.kl import KL_ESTIMATORS, KLConfig
from fst_jax.rl.lora import LoraConfig, init_lora, lora_adapters
from fst_jax.rl.losses import (POLICY_LOSSES, LossConfig, aggregation_weights, loss_input,
                               policy_loss, weighted_sum)
from fst_jax.rl.optimizer import OptimizerConfig, apply_if, learning_rate, make_optimizer
from fst_jax.distributed import fetch
from fst_jax.rl.shared_prefix import PrefixLayout, make_prefix_layout, prefix_hidden
from fst_jax.sharding import batch_sharding, in_mesh, replicated, state_shardings

log = logging.getLogger(__name__)
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Everything the slow-weights learner needs.

    ``trainable``: regex (``re.search``) over ``/``-joined weight paths such as ``layers/wq``,
    ``embed``, ``final_norm``; None means every weight without LoRA and none with LoRA.
    ``micro_batches`` must divide the batch size (and ``B / micro_batches`` should be a multiple
    of ``data * fsdp``). With LoRA and a KL term the reference is the frozen backbone, so then
    no base weight may be trained. ``logits_chunk > 0`` computes log-probs over sequence chunks
    of that many tokens, recomputing each chunk's logits in the backward pass, so the float32
    ``[B, T, V]`` logits are never held at once (0: all at once). ``shared_prefix``: the update
    and the reference pass compute each shared prompt once per micro-batch (``rl.shared_prefix``;
    equal to the dense path to float32 rounding, which ``train_step(..., check_shared_prefix=True)``
    measures); a batch whose rows share no prompt runs dense either way.
    """

    loss: LossConfig = LossConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    kl: KLConfig = KLConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()
    trainable: str | None = None
    micro_batches: int = 1
    logits_chunk: int = 0
    shared_prefix: bool = True

    def __post_init__(self):
        require(self.micro_batches >= 1, "micro_batches must be >= 1")
        require(self.logits_chunk >= 0, "logits_chunk must be >= 0")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise ConfigError(f"trainable is not a valid regex: {e}") from None
        require(not (self.lora.enabled and self.kl.beta > 0 and self.trainable is not None),
                "with LoRA and kl.beta > 0 the frozen base is the reference: set trainable=None")


@struct.dataclass
class TrainState:
    """A plain pytree (orbax-saveable).

    params: trained model weights (``nnx.State``; empty with LoRA unless ``trainable`` is set);
    lora: LoRA adapters (empty without LoRA); frozen: weights not trained (no optimizer state);
    ref: the reference weights for full fine-tuning with ``beta > 0`` (empty otherwise; with
    LoRA the reference is ``frozen``); opt_state: optax state of ``(params, lora)``;
    step: int32 train_step calls; skipped: int32 steps skipped by the guard; rng: uint32 ``[2]``
    key, split every step.
    """

    params: nnx.State
    lora: nnx.State
    frozen: nnx.State
    ref: nnx.State
    opt_state: Any
    step: jax.Array
    skipped: jax.Array
    rng: jax.Array

    def weights(self) -> nnx.State:
        """The base model weights (adapters not applied)."""
        return nnx.merge_state(self.params, self.frozen)


def _trainable_filter(cfg: LearnerConfig) -> Callable:
    if cfg.trainable is None:
        return lambda path, x: not cfg.lora.enabled
    pattern = re.compile(cfg.trainable)
    return lambda path, x: bool(pattern.search("/".join(map(str, path))))


def init_train_state(model: Transformer, cfg: LearnerConfig, mesh: Mesh,
                     seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` per ``cfg``, build optimizer state, and place everything on ``mesh``.

    The state may share (and the train step then donates) the model's arrays: do not use
    ``model`` afterwards; ``nnx.merge(graphdef, state.weights())`` rebuilds it."""
    graphdef, params, frozen = nnx.split(model, _trainable_filter(cfg), ...)
    lora = init_lora(frozen, cfg.lora, seed) if cfg.lora.enabled else nnx.State({})
    full_ref = cfg.kl.beta > 0 and not cfg.lora.enabled
    ref = jax.tree.map(jnp.copy, nnx.merge_state(params, frozen)) if full_ref else nnx.State({})
    state = TrainState(params=params, lora=lora, frozen=frozen, ref=ref,
                       opt_state=make_optimizer(cfg.optimizer).init((params, lora)),
                       step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(seed)))
    return graphdef, jax.device_put(state, state_shardings(state, mesh))


def _logp_entropy(model: Transformer, x, targets, inv_temp):
    """Hidden states ``x [B, T, D]``, next tokens ``targets [B, T]`` and ``1 / temperature``
    ``[B]`` -> float32 log-probs and entropies (no gradient) ``[B, T]`` of ``logits / temperature``."""
    logits = model.logits(x) * inv_temp[:, None, None]  # [B, T, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lg, lse_c = sg(logits), sg(lse)
    ent = lse_c - jnp.sum(jnp.exp(lg - lse_c[..., None]) * lg, axis=-1)
    return picked - lse, ent


def _chunked_logp_entropy(model: Transformer, x, targets, inv_temp, chunk: int):
    """``_logp_entropy`` over ``chunk``-token slices of the sequence (zero-padded to a multiple),
    each rematerialised in the backward pass: only ``[B, chunk, V]`` logits live at a time."""
    B, T, D = x.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)
    logp, ent = jax.lax.map(jax.checkpoint(lambda c: _logp_entropy(model, *c, inv_temp)), (xs, ts))
    unchunk = lambda v: v.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
    return unchunk(logp), unchunk(ent)


def token_logprobs(model: Transformer, tokens, positions, mask, with_entropy: bool = False,
                   adapters: dict | None = None, chunk: int = 0, temperature=None,
                   prefix: PrefixLayout | None = None):
    """``logp [B, T]`` float32 of each token given the ones before (0 at ``t = 0``) and, if
    asked, the policy's entropy ``[B, T]`` at each predicted position (no gradient), both of
    ``logits / temperature`` (``temperature [B]``, None: 1), the distribution a row was sampled from.

    ``adapters``: LoRA adapters applied on the activations (see ``Transformer.hidden``);
    ``chunk > 0``: compute over sequence chunks of that length (see ``LearnerConfig``);
    ``prefix``: the rows' shared prompts, each run once (``shared_prefix.prefix_hidden``), the
    prompt columns' log-probs and entropies then 0."""
    if prefix is None:
        x, start = model.hidden(tokens, positions, mask, adapters)[0][:, :-1], 1
    else:
        x, start = prefix_hidden(model, tokens, positions, mask, prefix, adapters), prefix.prompt_len
    targets = tokens[:, start:]
    inv_temp = jnp.ones(x.shape[0], jnp.float32) if temperature is None else 1.0 / temperature
    if chunk:
        logp, ent = _chunked_logp_entropy(model, x, targets, inv_temp, chunk)
    else:
        logp, ent = _logp_entropy(model, x, targets, inv_temp)
    shift = lambda v: jnp.pad(v, ((0, 0), (start, 0)))
    return shift(logp), (shift(ent) if with_entropy else None)


def _split(x, k, rows=1):
    """``[B, ...]`` -> ``[k, B/k, ...]`` with run ``i`` of ``rows`` consecutive rows in slice
    ``i % k`` (keeps each device's rows on that device, and a shared prompt's rows together)."""
    x = x.reshape(x.shape[0] // (k * rows), k, rows, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(k, -1, *x.shape[3:])


def _unsplit(x, rows=1):
    x = x.reshape(x.shape[0], -1, rows, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])


def _check_batch(batch: TrainBatch, cfg: LearnerConfig):
    B = batch.tokens.shape[0]
    if B % cfg.micro_batches:
        raise ValueError(f"batch size {B} is not divisible by micro_batches={cfg.micro_batches}")


def _masked_stats(mask, logp, sampler_logp):
    """Sampler-vs-trainer log-prob mismatch over completion tokens."""
    n = jnp.maximum(mask.sum(), 1)
    diff = jnp.where(mask, jnp.abs(logp - sampler_logp), 0.0)
    mx, my = (jnp.where(mask, v, 0.0).sum() / n for v in (logp, sampler_logp))
    dx, dy = jnp.where(mask, logp - mx, 0.0), jnp.where(mask, sampler_logp - my, 0.0)
    corr = (dx * dy).sum() / jnp.sqrt(jnp.maximum((dx * dx).sum() * (dy * dy).sum(), 1e-30))
    return {"logp_diff_mean": diff.sum() / n, "logp_diff_max": diff.max(), "logp_pearson": corr}


def make_train_step(graphdef: nnx.GraphDef, state: TrainState, cfg: LearnerConfig,
                    mesh: Mesh) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)``, jitted with ``state`` donated.

    ``state`` (a TrainState or its ``jax.eval_shape``) only fixes the structure and shardings.
    With ``cfg.kl.beta > 0`` the step first computes ``batch.ref_logp`` with the reference
    weights (``make_ref_logprobs``; whatever the batch held is replaced); pass a dict as
    ``train_step(state, batch, timings=d)`` to have that phase's seconds added to
    ``d["reference"]``; ``train_step(state, batch, check_shared_prefix=True)`` (a run's first
    step) also computes the loss and log-probs on the dense path and adds to the metrics
    ``shared_prefix_logp_diff`` (max abs difference over completion tokens) and
    ``shared_prefix_loss_diff`` (none when the batch ran dense).
    Metrics (float32 scalars): loss, loss_policy, entropy, clip_high/clip_low (token fractions),
    grad_norm, logp_diff_mean, logp_diff_max, logp_pearson (sampler vs trainer over completion
    tokens), tokens, reward_mean, lr, applied (1 or 0), skipped (total so far); with beta > 0
    also kl (the estimator's value, a token mean over every completion of the batch, dropped
    groups included, of policy vs reference log-probs both of logits / the row's sampling
    temperature) and loss_kl (the penalty term over the rows the loss keeps, beta included).
    """
    opt = make_optimizer(cfg.optimizer)
    schedule = learning_rate(cfg.optimizer)
    k, beta = cfg.micro_batches, cfg.kl.beta
    kl_fn = KL_ESTIMATORS[cfg.kl.estimator]
    prefix_layout = _layout_finder(cfg, mesh)

    def model_for(trainable, frozen):
        """The model on the base weights and the LoRA adapters (None without LoRA); ``frozen``
        is not differentiated, so frozen weights get no gradient."""
        params, lora = trainable
        model = nnx.merge(graphdef, nnx.merge_state(params, frozen))
        return model, lora_adapters(lora, cfg.lora) if cfg.lora.enabled else None

    def micro_loss(trainable, frozen, mb: TrainBatch, row_w, denom, prefix):
        model, adapters = model_for(trainable, frozen)
        logp, ent = token_logprobs(model, mb.tokens, mb.positions, mb.mask, with_entropy=True,
                                   adapters=adapters, chunk=cfg.logits_chunk,
                                   temperature=mb.temperature, prefix=prefix)
        inp = loss_input(mb, logp, ent)
        token_loss, _ = POLICY_LOSSES[cfg.loss.name].fn(inp, cfg.loss)
        total = weighted_sum(token_loss, inp.mask, row_w)
        if beta > 0:
            total = total + beta * weighted_sum(kl_fn(inp.logp, inp.ref_logp), inp.mask, row_w)
        return total / denom, (logp, ent)

    def loss_weights(batch: TrainBatch):
        row_w, row_d = aggregation_weights(cfg.loss, batch.loss_mask, batch.group_ids,
                                           batch.completion_budget)
        denom_raw = row_d.sum()
        return row_w, row_d, denom_raw, jnp.where(denom_raw > 0, denom_raw, 1.0)

    def micro_batches(batch: TrainBatch, row_w, layout: PrefixLayout | None):
        rows = 1 if layout is None else layout.rows
        return (jax.tree.map(lambda x: _split(x, k, rows), batch), _split(row_w, k, rows)), rows

    @in_mesh(mesh)
    def step_fn(state: TrainState, batch: TrainBatch, layout: PrefixLayout | None):
        mask = batch.loss_mask
        row_w, row_d, denom_raw, denom = loss_weights(batch)
        trainable = (state.params, state.lora)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, xs):
            g_acc, l_acc = carry
            mb, w = xs
            (loss, aux), g = grad_fn(trainable, state.frozen, mb, w, denom, layout)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss), aux

        if k == 1:  # no loop: lets XLA fuse the gradient with the update
            (loss, (logp, ent)), grads = grad_fn(trainable, state.frozen, batch, row_w, denom, layout)
        else:
            zeros = jax.tree.map(jnp.zeros_like, trainable)
            xs, rows = micro_batches(batch, row_w, layout)
            (grads, loss), (logp, ent) = jax.lax.scan(body, (zeros, jnp.zeros(())), xs)
            logp, ent = _unsplit(logp, rows), _unsplit(ent, rows)

        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (denom_raw > 0)

        (params, lora), opt_state = apply_if(ok, opt, grads, trainable, state.opt_state)
        skipped = state.skipped + (~ok).astype(jnp.int32)
        new_state = state.replace(params=params, lora=lora, opt_state=opt_state,
                                  step=state.step + 1, skipped=skipped,
                                  rng=jax.random.split(state.rng)[0])

        # Metrics from the full batch's pre-update log-probs (the values the loss used).
        pol_sum, _, flags = policy_loss(cfg.loss, loss_input(batch, logp, ent), row_w, row_d)
        ntok = mask.sum()
        tmean = lambda v: jnp.where(mask, v, 0.0).sum() / jnp.maximum(ntok, 1)
        metrics = {"loss": loss, "loss_policy": pol_sum / denom, "grad_norm": grad_norm,
                   "entropy": tmean(ent), "tokens": ntok.astype(jnp.float32),
                   "reward_mean": batch.rewards.mean(),
                   "lr": schedule(state.step - state.skipped),
                   "applied": ok.astype(jnp.float32), "skipped": skipped.astype(jnp.float32),
                   **{name: tmean(f.astype(jnp.float32)) for name, f in flags.items()},
                   **_masked_stats(mask, logp, batch.sampler_logp)}
        if beta > 0:
            kl_tok = kl_fn(logp, batch.ref_logp)
            done = batch.completion_mask
            metrics["kl"] = jnp.where(done, kl_tok, 0.0).sum() / jnp.maximum(done.sum(), 1)
            metrics["loss_kl"] = beta * weighted_sum(kl_tok, mask, row_w) / denom
        return new_state, metrics

    @in_mesh(mesh)
    def compare_fn(state: TrainState, batch: TrainBatch, layout: PrefixLayout):
        """Max abs differences, dense path vs ``layout``, of the completion log-probs and the loss."""
        row_w, _, _, denom = loss_weights(batch)
        trainable = (state.params, state.lora)
        out = []
        for prefix in (None, layout):
            xs, rows = micro_batches(batch, row_w, prefix)
            loss, (logp, _) = jax.lax.map(
                lambda x: micro_loss(trainable, state.frozen, *x, denom, prefix), xs)
            out.append((loss.sum(), _unsplit(logp, rows)))
        (loss0, logp0), (loss1, logp1) = out
        return {"shared_prefix_logp_diff": jnp.where(batch.completion_mask, jnp.abs(logp0 - logp1),
                                                     0.0).max(),
                "shared_prefix_loss_diff": jnp.abs(loss0 - loss1)}

    state_sh, batch_sh = state_shardings(state, mesh), batch_shardings(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, replicated(mesh)), static_argnums=2,
                     donate_argnums=0)
    compare = jax.jit(compare_fn, in_shardings=(state_sh, batch_sh),
                      out_shardings=replicated(mesh), static_argnums=2)
    reference = _ref_program(graphdef, state, cfg, mesh) if beta > 0 else None

    def train_step(state: TrainState, batch: TrainBatch, timings: dict | None = None,
                   check_shared_prefix: bool = False):
        _check_batch(batch, cfg)
        layout = prefix_layout(batch)
        if reference is not None:  # never trust a caller-filled reference
            t0 = time.perf_counter()
            batch = batch.replace(ref_logp=jax.block_until_ready(reference(state, batch, layout)))
            if timings is not None:
                timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - t0
        checked = {}
        if check_shared_prefix and layout is not None:
            checked = compare(state, batch, layout)
            log.info("shared prefix vs dense: max |logp diff| %.3g, |loss diff| %.3g",
                     *(float(fetch(v)) for v in checked.values()))
        state, metrics = jitted(state, batch, layout)
        return state, {**metrics, **checked}

    return train_step


def make_ref_logprobs(graphdef: nnx.GraphDef, state: TrainState, cfg: LearnerConfig,
                      mesh: Mesh) -> Callable[[TrainState, TrainBatch], jax.Array]:
    """``ref_logprobs(state, batch) -> [B, T] float32``: the reference model's log-probs of the
    batch's tokens (same rows, so the same context as the policy), micro-batched like the
    train step. The reference is ``state.ref`` (full fine-tuning) or the frozen backbone with
    adapters off (LoRA). Only for ``cfg.kl.beta > 0``; the state is not donated. ``train_step``
    calls it itself; it is public for evaluation and tests. With ``cfg.shared_prefix`` each
    shared prompt runs once, and a batch whose rows share prompts gets 0 in the prompt columns."""
    require(cfg.kl.beta > 0, "reference log-probs are only needed when kl.beta > 0")
    jitted, prefix_layout = _ref_program(graphdef, state, cfg, mesh), _layout_finder(cfg, mesh)

    def ref_logprobs(state: TrainState, batch: TrainBatch) -> jax.Array:
        _check_batch(batch, cfg)
        return jitted(state, batch, prefix_layout(batch))

    return ref_logprobs


def _layout_finder(cfg: LearnerConfig, mesh: Mesh) -> Callable[[TrainBatch], PrefixLayout | None]:
    """``batch -> PrefixLayout | None``: ``shared_prefix.make_prefix_layout`` with
    ``cfg.shared_prefix``, else always None (the dense path)."""
    return make_prefix_layout(mesh, cfg.micro_batches) if cfg.shared_prefix else (lambda batch: None)


def _ref_program(graphdef: nnx.GraphDef, state: TrainState, cfg: LearnerConfig, mesh: Mesh):
    """The jitted ``(state, batch, layout) -> [B, T]`` reference log-probs of
    ``make_ref_logprobs`` for a layout already found (``train_step`` finds it once per step)."""
    k = cfg.micro_batches

    @in_mesh(mesh)
    def fn(state: TrainState, batch: TrainBatch, layout: PrefixLayout | None):
        weights = state.weights() if cfg.lora.enabled else state.ref
        model = nnx.merge(graphdef, weights)
        rows = 1 if layout is None else layout.rows

        def one(mb):
            return token_logprobs(model, mb.tokens, mb.positions, mb.mask, chunk=cfg.logits_chunk,
                                  temperature=mb.temperature, prefix=layout)[0]

        if k == 1:
            return one(batch)
        return _unsplit(jax.lax.map(one, jax.tree.map(lambda x: _split(x, k, rows), batch)), rows)

    return jax.jit(fn, in_shardings=(state_shardings(state, mesh), batch_shardings(mesh)),
                   out_shardings=batch_sharding(mesh, 2), static_argnums=2)
